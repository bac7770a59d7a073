"""UV unwrapping (xatlas) and texture baking with our rasteriser.

UV convention: u right, v UP, texture image row 0 at v = 1 (OBJ and trimesh's convention; trimesh
flips v itself when it writes glTF, whose v points down).
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from steindreamer.render.raster import interpolate, rasterize_uv

ColorFn = Callable[[torch.Tensor], torch.Tensor]


def unwrap(vertices: np.ndarray, faces: np.ndarray, texture_size: int = 1024, padding: int = 2) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """xatlas UV atlas. Returns (vmapping [V'] int64: the original vertex of each UV vertex,
    faces_uv [F, 3] int64 into the UV vertices, uvs [V', 2] float32 in [0, 1]).

    Charts are packed for a `texture_size` texture with `padding` texels between charts, so that
    bilinear lookups near a seam do not read the neighbouring chart."""
    import xatlas  # noqa: PLC0415

    atlas = xatlas.Atlas()
    atlas.add_mesh(np.ascontiguousarray(vertices, dtype=np.float32), np.ascontiguousarray(faces, dtype=np.uint32))
    pack = xatlas.PackOptions()
    pack.resolution = int(texture_size)
    pack.padding = int(padding)
    pack.bilinear = True
    atlas.generate(xatlas.ChartOptions(), pack)
    vmapping, faces_uv, uvs = atlas[0]
    return vmapping.astype(np.int64), faces_uv.astype(np.int64), uvs.astype(np.float32)


def vertex_normals(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Area-weighted unit vertex normals [V, 3] float32. Compute them on the unsplit mesh and index
    with `vmapping`, so vertices duplicated along UV seams keep one normal (no shading seams)."""
    v = np.asarray(vertices, dtype=np.float64)
    tri = v[faces]
    fn = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    vn = np.zeros_like(v)
    for k in range(3):
        np.add.at(vn, faces[:, k], fn)
    norm = np.linalg.norm(vn, axis=1, keepdims=True)
    # Where the area-weighted sum cancels (a vertex between opposite faces, a fin), any adjacent
    # face's normal keeps the normal unit length, as glTF requires; +Y where no face has an area.
    face_len = np.linalg.norm(fn, axis=1)
    tiny = norm[:, 0] <= 1e-12 * max(1.0, float(face_len.max(initial=0.0)))
    if tiny.any():
        fallback = np.tile([0.0, 1.0, 0.0], (len(v), 1))
        usable = face_len > 0
        for k in range(3):
            fallback[faces[usable, k]] = fn[usable] / face_len[usable, None]
        vn[tiny], norm[tiny] = fallback[tiny], 1.0
    return (vn / np.where(norm > 0, norm, 1.0)).astype(np.float32)


def dilate(texture: torch.Tensor, mask: torch.Tensor, iterations: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Grow the covered region by `iterations` texels: an empty texel with covered 8-neighbours
    takes their mean. texture [H, W, C] float, mask [H, W] bool; returns (texture, grown mask)."""
    img = texture.permute(2, 0, 1).unsqueeze(0) * mask[None, None]
    m = mask[None, None].to(img.dtype)
    for _ in range(int(iterations)):
        # 3x3 neighbourhood means via avg_pool (zero padding counts as empty): faster than conv2d.
        summed = F.avg_pool2d(img, 3, stride=1, padding=1)
        count = F.avg_pool2d(m, 3, stride=1, padding=1)
        grow = (count > 0) & (m == 0)
        img = torch.where(grow, summed / count.clamp_min(1e-12), img)
        m = torch.where(grow, torch.ones_like(m), m)
    return img[0].permute(1, 2, 0), m[0, 0] > 0


def fill_holes(texture: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Fill every empty texel by pull-push: average covered texels down an image pyramid, then fill
    holes from the coarser level on the way up. Cheap (O(texels)) and smooth, so mip-mapped
    lookups far from charts do not blend in black."""
    img = texture.permute(2, 0, 1).unsqueeze(0).float() * mask[None, None]
    m = mask[None, None].float()
    levels = []
    while True:
        levels.append((img, m))
        h, w = img.shape[-2:]
        if h == 1 and w == 1:
            break
        img = F.pad(img, (0, w % 2, 0, h % 2))
        m = F.pad(m, (0, w % 2, 0, h % 2))
        s = F.avg_pool2d(img, 2) * 4.0  # sums of covered colours (empty texels hold 0)
        n = F.avg_pool2d(m, 2) * 4.0
        img = torch.where(n > 0, s / n.clamp_min(1e-12), torch.zeros_like(s)) * (n > 0)
        m = (n > 0).float()
    filled = levels[-1][0]
    for img, m in reversed(levels[:-1]):
        up = F.interpolate(filled, size=img.shape[-2:], mode="nearest")
        filled = torch.where(m > 0, img, up)
    return filled[0].permute(1, 2, 0).to(texture.dtype)


def bake_texture(
    color_fn: ColorFn,
    vertices: np.ndarray | torch.Tensor,
    faces: np.ndarray | torch.Tensor,
    uvs: np.ndarray | torch.Tensor,
    faces_uv: np.ndarray | torch.Tensor | None = None,
    size: int = 1024,
    dilation: int = 4,
    fill: bool = True,
    chunk: int = 1 << 16,
    device: str | torch.device = "cpu",
) -> tuple[np.ndarray, np.ndarray]:
    """Bake `color_fn` (world points [N, 3] -> colours [N, C] in [0, 1]) into a size x size texture.

    Corner k of face i has 3D position vertices[faces[i, k]] and UV uvs[faces_uv[i, k]] (faces_uv
    defaults to faces, for meshes already split at seams). Each covered texel gets the colour at the
    3D point its UV maps to; then `dilation` texels of seam dilation, then (fill=True) pull-push
    filling of the rest. Returns (texture uint8 [size, size, C], covered bool [size, size])."""
    faces_uv = faces if faces_uv is None else faces_uv
    v = torch.as_tensor(np.asarray(vertices, dtype=np.float32) if not torch.is_tensor(vertices) else vertices, device=device).float()
    f = torch.as_tensor(np.asarray(faces, dtype=np.int64) if not torch.is_tensor(faces) else faces, device=device).long()
    uv = torch.as_tensor(np.asarray(uvs, dtype=np.float32) if not torch.is_tensor(uvs) else uvs, device=device).float()
    fuv = torch.as_tensor(np.asarray(faces_uv, dtype=np.int64) if not torch.is_tensor(faces_uv) else faces_uv, device=device).long()
    if f.shape != fuv.shape:
        raise ValueError(f"faces {tuple(f.shape)} and faces_uv {tuple(fuv.shape)} differ")
    with torch.no_grad():
        rast = rasterize_uv(uv, fuv, size)
        points = interpolate(v, rast, f)[0].reshape(-1, 3)  # the 3D point behind each texel
        covered = rast.mask[0].reshape(-1)
        sel = covered.nonzero().squeeze(1)
        colors = [color_fn(p).float().clamp(0.0, 1.0) for p in points[sel].split(chunk)]
        channels = colors[0].shape[-1] if colors else 3
        tex = torch.zeros(size * size, channels, device=device)
        if colors:
            tex[sel] = torch.cat(colors)
        tex = tex.view(size, size, channels)
        mask = covered.view(size, size)
        if dilation > 0:
            tex, grown = dilate(tex, mask, dilation)
        else:
            grown = mask
        if fill and bool(grown.any()):
            tex = fill_holes(tex, grown)
    texture = (tex.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8).cpu().numpy()
    return texture, mask.cpu().numpy()
