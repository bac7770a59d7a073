"""The mesh stage's scene: a triangle mesh with learnable vertex offsets and a texture field.

`MeshField.render` returns the same dict as the NeRF renderer (rgb, opacity, depth, disparity,
normal), so guidance and losses do not care which stage produced an image. Geometry gradients flow
through the rasteriser's barycentrics (interpolated positions feed the texture field, normals feed
shading and normal losses); coverage itself is not differentiable (see render/raster.py).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from steindreamer.render.raster import interpolate, rasterize, world_to_clip
from steindreamer.render.shading import shade


def _edges(faces: np.ndarray) -> np.ndarray:
    e = np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]], 0)
    return np.unique(np.sort(e, axis=1), axis=0)


def _face_adjacency(faces: np.ndarray) -> np.ndarray:
    """Pairs [E, 2] of faces sharing an edge (manifold edges only: non-manifold edges are skipped)."""
    n = faces.shape[0]
    e = np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]], 0)
    e = np.sort(e, axis=1)
    face_of = np.tile(np.arange(n), 3)
    _, inverse, counts = np.unique(e, axis=0, return_inverse=True, return_counts=True)
    inverse = inverse.reshape(-1)
    keep = counts[inverse] == 2
    order = np.argsort(inverse[keep], kind="stable")
    pairs = face_of[keep][order].reshape(-1, 2)
    return pairs


class MeshField(torch.nn.Module):
    def __init__(
        self,
        vertices,
        faces,
        texture_field: torch.nn.Module,
        learn_offsets: bool = True,
        near: float = 0.01,
        far: float = 100.0,
        raster_backend: str = "auto",
    ):
        """vertices [V, 3], faces [F, 3] (numpy or torch); texture_field maps world points [N, 3] to albedo [N, 3] in [0, 1]."""
        super().__init__()
        v = torch.as_tensor(np.asarray(vertices, dtype=np.float32) if not torch.is_tensor(vertices) else vertices).float()
        f_np = np.asarray(faces.cpu() if torch.is_tensor(faces) else faces, dtype=np.int64)
        if f_np.ndim != 2 or f_np.shape[1] != 3 or f_np.shape[0] == 0:
            raise ValueError(f"faces must be a non-empty [F, 3] array, got shape {f_np.shape}")
        self.register_buffer("base_vertices", v.detach().clone())
        self.register_buffer("faces", torch.from_numpy(f_np))
        self.register_buffer("edges", torch.from_numpy(_edges(f_np)))
        self.register_buffer("face_pairs", torch.from_numpy(_face_adjacency(f_np)))
        degree = torch.zeros(v.shape[0]).index_add_(0, self.edges.reshape(-1), torch.ones(self.edges.numel()))
        self.register_buffer("degree", degree.clamp_min(1.0))
        self.offsets = torch.nn.Parameter(torch.zeros_like(v), requires_grad=learn_offsets)
        self.texture_field = texture_field
        self.near, self.far = near, far
        self.raster_backend = raster_backend

    @property
    def vertices(self) -> torch.Tensor:
        return self.base_vertices + self.offsets

    def face_normals(self, vertices: torch.Tensor | None = None) -> torch.Tensor:
        v = self.vertices if vertices is None else vertices
        tri = v[self.faces]
        return F.normalize(torch.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0], dim=-1), dim=-1, eps=1e-12)

    def vertex_normals(self, vertices: torch.Tensor | None = None) -> torch.Tensor:
        """Area-weighted vertex normals [V, 3] (the unnormalised face cross product is 2x area)."""
        v = self.vertices if vertices is None else vertices
        tri = v[self.faces]
        fn = torch.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0], dim=-1)
        vn = torch.zeros_like(v).index_add_(0, self.faces.reshape(-1), fn.repeat_interleave(3, 0))
        return F.normalize(vn, dim=-1, eps=1e-12)

    def render(
        self,
        cameras,
        height: int,
        width: int,
        background: torch.Tensor | float | None = None,
        light_direction: torch.Tensor | None = None,
        ambient: float = 0.3,
        shading: str = "albedo",
    ) -> dict[str, torch.Tensor]:
        """Render `cameras` (steindreamer.cameras.Cameras, B views) at height x width.

        background: None (white), a float grey level, an RGB [3], or images [B, H, W, 3].
        shading: a mode of render.shading.shade (albedo, lambertian, textureless), the same shading
        as the NeRF renderer's; lambertian and textureless need light_direction, a world direction
        [3] or [B, 3] towards the light.
        Returns rgb [B,H,W,3], opacity [B,H,W,1], depth [B,H,W,1] (distance from the camera centre
        along the ray, as the NeRF renderer's depth with unit ray directions; 0 where empty),
        disparity [B,H,W,1] (1/depth, 0 where empty), normal [B,H,W,3] (world, unit, 0 where empty)."""
        device = self.base_vertices.device
        cameras = cameras.to(device)
        b = len(cameras)
        verts = self.vertices
        clip = world_to_clip(verts, cameras, height, width, self.near, self.far)
        rast = rasterize(clip, self.faces, height, width, backend=self.raster_backend)
        mask = rast.mask.unsqueeze(-1)  # [B, H, W, 1]
        maskf = mask.to(verts.dtype)

        position = interpolate(verts, rast, self.faces)  # [B, H, W, 3]
        normal = F.normalize(interpolate(self.vertex_normals(verts), rast, self.faces), dim=-1, eps=1e-12) * maskf

        # Query the texture field only where something is visible.
        sel = mask.reshape(-1).nonzero().squeeze(1)
        albedo = verts.new_zeros(b * height * width, 3)
        if sel.numel() > 0:
            albedo = albedo.index_put((sel,), self.texture_field(position.reshape(-1, 3)[sel]).to(verts.dtype))
        albedo = albedo.view(b, height, width, 3)
        light = None
        if shading != "albedo":
            if light_direction is None:
                raise ValueError(f"shading={shading!r} needs a light_direction")
            light = F.normalize(torch.as_tensor(light_direction, dtype=verts.dtype, device=device).reshape(-1, 3), dim=-1).view(-1, 1, 1, 3)
        color = shade(albedo, normal, light, shading, ambient)

        bg = self._background(background, b, height, width, verts)
        rgb = color * maskf + bg * (1.0 - maskf)
        depth = (position - cameras.position.to(verts).view(b, 1, 1, 3)).norm(dim=-1, keepdim=True) * maskf
        disparity = torch.where(mask, 1.0 / depth.clamp_min(1e-8), torch.zeros_like(depth))
        return {"rgb": rgb, "opacity": maskf, "depth": depth, "disparity": disparity, "normal": normal}

    @staticmethod
    def _background(background, b, h, w, like) -> torch.Tensor:
        if background is None:
            background = 1.0
        bg = torch.as_tensor(background, dtype=like.dtype, device=like.device)
        if bg.dim() == 0:
            return bg.expand(b, h, w, 3)
        if bg.dim() == 1:
            return bg.view(1, 1, 1, 3).expand(b, h, w, 3)
        return bg.expand(b, h, w, 3)

    def laplacian_loss(self) -> torch.Tensor:
        """Mean squared uniform-Laplacian length: |mean(neighbours) - v|^2, penalises bumps."""
        v = self.vertices
        i, j = self.edges[:, 0], self.edges[:, 1]
        summed = torch.zeros_like(v).index_add_(0, i, v[j]).index_add_(0, j, v[i])
        lap = summed / self.degree.unsqueeze(-1) - v
        return (lap * lap).sum(-1).mean()

    def normal_consistency_loss(self) -> torch.Tensor:
        """Mean (1 - cos) between the normals of faces sharing an edge; 0 for a flat sheet."""
        if self.face_pairs.numel() == 0:
            return self.vertices.sum() * 0.0
        n = self.face_normals()
        return (1.0 - (n[self.face_pairs[:, 0]] * n[self.face_pairs[:, 1]]).sum(-1)).mean()

    @torch.no_grad()
    def export_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """Current vertices [V, 3] float32 and faces [F, 3] int64, as numpy."""
        return self.vertices.detach().cpu().numpy().astype(np.float32), self.faces.cpu().numpy().astype(np.int64)
