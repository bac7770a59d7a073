"""One call from a mesh and a colour function to files: unwrap, bake, write GLB / OBJ / PLY; and
turntable frames of a mesh."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Iterable, Literal, get_args

import numpy as np
import torch

from steindreamer.export.bake import bake_texture, unwrap, vertex_normals
from steindreamer.export.gltf import write_glb, write_obj, write_ply
from steindreamer.render.volume import to_uint8

ExportFormat = Literal["glb", "obj", "ply"]
FORMATS: tuple[str, ...] = get_args(ExportFormat)


def _eval_colors(color_fn, points: np.ndarray, device, chunk: int = 1 << 16) -> np.ndarray:
    with torch.no_grad():
        p = torch.as_tensor(points, dtype=torch.float32, device=device)
        return torch.cat([color_fn(c).float().clamp(0, 1) for c in p.split(chunk)]).cpu().numpy()


def repair_mesh(vertices: np.ndarray, faces: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict]:
    """What a glTF validator refuses, removed before export: faces with repeated corners or (near)
    zero area, and vertices no face uses. Returns (vertices float32, faces int64, counts removed)."""
    import trimesh  # noqa: PLC0415

    mesh = trimesh.Trimesh(np.asarray(vertices, dtype=np.float64), np.asarray(faces, dtype=np.int64), process=False)
    n_faces, n_vertices = len(mesh.faces), len(mesh.vertices)
    mesh.update_faces(mesh.nondegenerate_faces(height=1e-12))
    mesh.remove_unreferenced_vertices()
    if len(mesh.faces) == 0:
        raise ValueError("the mesh has no face with a non-zero area")
    removed = {"degenerate_faces": n_faces - len(mesh.faces), "unreferenced_vertices": n_vertices - len(mesh.vertices)}
    return np.asarray(mesh.vertices, dtype=np.float32), np.asarray(mesh.faces, dtype=np.int64), removed


def export_textured(
    out_dir,
    vertices: np.ndarray,
    faces: np.ndarray,
    color_fn: Callable[[torch.Tensor], torch.Tensor],
    texture_size: int = 1024,
    formats: Iterable[str] = FORMATS,
    stem: str = "mesh",
    device: str | torch.device = "cpu",
    stems: dict | None = None,
) -> dict:
    """Unwrap (xatlas), bake `color_fn` (world points [N,3] -> RGB [N,3] in [0,1]) into a
    texture_size^2 texture and write `<stem>.glb`, `<stem>.obj` (+ .mtl, .png) and `<stem>.ply`
    (vertex colours) under out_dir; `stems` may name each format's file differently ({"glb": "model"}).
    The mesh is repaired first (`repair_mesh`). Returns {"paths": {format: Path}, "seconds": {...},
    "texture_coverage": fraction of texels covered by charts, "removed": what the repair dropped}."""
    out_dir = Path(out_dir)
    formats = tuple(formats)
    name = {fmt: (stems or {}).get(fmt, stem) for fmt in FORMATS}
    unknown = set(formats) - set(FORMATS)
    if unknown:
        raise ValueError(f"unknown export formats {sorted(unknown)}")
    vertices, faces, removed = repair_mesh(vertices, faces)
    seconds, paths = {}, {}
    t = time.perf_counter()
    if "glb" in formats or "obj" in formats:
        vmapping, faces_uv, uvs = unwrap(vertices, faces, texture_size)
        seconds["unwrap"] = time.perf_counter() - t
        t = time.perf_counter()
        texture, covered = bake_texture(color_fn, vertices, faces, uvs, faces_uv, size=texture_size, device=device)
        seconds["bake"] = time.perf_counter() - t
        t = time.perf_counter()
        v_uv = vertices[vmapping]
        n_uv = vertex_normals(vertices, faces)[vmapping]  # normals of the unsplit mesh: no seams
        if "glb" in formats:
            paths["glb"] = write_glb(out_dir / f"{name['glb']}.glb", v_uv, faces_uv, uvs, texture, n_uv)
        if "obj" in formats:
            paths["obj"] = write_obj(out_dir / f"{name['obj']}.obj", v_uv, faces_uv, uvs, texture, n_uv)["obj"]
        seconds["write_textured"] = time.perf_counter() - t
        coverage = float(covered.mean())
    else:
        coverage = None
    if "ply" in formats:
        t = time.perf_counter()
        paths["ply"] = write_ply(out_dir / f"{name['ply']}.ply", vertices, faces, _eval_colors(color_fn, vertices, device))
        seconds["write_ply"] = time.perf_counter() - t
    return {"paths": paths, "seconds": seconds, "texture_coverage": coverage, "removed": removed}


class _ColorModule(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def turntable_frames(
    vertices: np.ndarray,
    faces: np.ndarray,
    color_fn: Callable[[torch.Tensor], torch.Tensor],
    n_frames: int = 36,
    size: int = 256,
    elevation: float = 15.0,
    distance: float = 1.75,
    fov: float = 55.0,
    background: float = 1.0,
    light_direction=None,
    batch: int = 4,
    device: str | torch.device = "cpu",
) -> list[np.ndarray]:
    """uint8 [size, size, 3] frames of the mesh on `orbit_cameras` (azimuth 0 = front, +Y up)."""
    from steindreamer.cameras import orbit_cameras  # noqa: PLC0415
    from steindreamer.field.mesh import MeshField  # noqa: PLC0415

    color = color_fn if isinstance(color_fn, torch.nn.Module) else _ColorModule(color_fn)
    field = MeshField(vertices, faces, color, learn_offsets=False).to(device)
    cams = orbit_cameras(n_frames, elevation, distance, fov)
    frames = []
    with torch.no_grad():
        for i in range(0, n_frames, batch):
            out = field.render(cams[i : i + batch], size, size, background=background, light_direction=light_direction,
                               shading="albedo" if light_direction is None else "lambertian")
            frames += list(to_uint8(out["rgb"]))
    return frames
