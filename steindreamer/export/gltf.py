"""Mesh files: binary glTF 2.0 (GLB), OBJ + MTL + PNG, and PLY with vertex colours.

All go through trimesh's exporters and `steindreamer.fsio` (atomic: a crash leaves the old file or
the new one). World up is +Y, glTF's up, so positions are written as they are. UVs follow the
OBJ/trimesh convention (v up, see export/bake.py); trimesh flips v for glTF itself.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from steindreamer.fsio import atomic_write, atomic_write_all


def _image(texture_uint8: np.ndarray):
    from PIL import Image  # noqa: PLC0415

    tex = np.asarray(texture_uint8)
    if tex.dtype != np.uint8 or tex.ndim != 3 or tex.shape[2] not in (3, 4):
        raise ValueError(f"texture must be uint8 [H, W, 3 or 4], got {tex.dtype} {tex.shape}")
    return Image.fromarray(np.ascontiguousarray(tex))


def _textured_mesh(vertices, faces, uvs, material, normals=None):
    import trimesh  # noqa: PLC0415

    v = np.asarray(vertices, dtype=np.float64)
    f = np.asarray(faces, dtype=np.int64)
    uv = np.asarray(uvs, dtype=np.float64)
    if uv.shape != (v.shape[0], 2):
        raise ValueError(f"uvs must be [V, 2] matching vertices [V, 3]: got {uv.shape} for V={v.shape[0]}")
    kwargs = {}
    if normals is not None:
        kwargs["vertex_normals"] = np.asarray(normals, dtype=np.float64)
    visual = trimesh.visual.TextureVisuals(uv=uv, material=material)
    # process=False: merging vertices would weld UV seams and break the vertex <-> uv pairing.
    return trimesh.Trimesh(v, f, visual=visual, process=False, **kwargs)


def write_glb(
    path,
    vertices: np.ndarray,
    faces: np.ndarray,
    uvs: np.ndarray,
    texture_uint8: np.ndarray,
    normals: np.ndarray | None = None,
    metallic: float = 0.0,
    roughness: float = 1.0,
) -> Path:
    """Binary glTF 2.0 with one PBR metallic-roughness material whose baseColorTexture is the
    texture (PNG inside the GLB), vertex normals (computed if not given) and UVs. Returns the path."""
    import trimesh  # noqa: PLC0415

    material = trimesh.visual.material.PBRMaterial(
        name="albedo",
        baseColorTexture=_image(texture_uint8),
        baseColorFactor=[255, 255, 255, 255],
        metallicFactor=float(metallic),
        roughnessFactor=float(roughness),
    )
    mesh = _textured_mesh(vertices, faces, uvs, material, normals)
    data = trimesh.exchange.gltf.export_glb(trimesh.Scene(mesh), include_normals=True)
    path = Path(path)
    atomic_write(path, data)
    return path


def write_obj(
    path,
    vertices: np.ndarray,
    faces: np.ndarray,
    uvs: np.ndarray,
    texture_uint8: np.ndarray,
    normals: np.ndarray | None = None,
) -> dict[str, Path]:
    """`path` (e.g. mesh.obj) plus `<stem>.mtl` and the texture `<stem>.png` beside it. The texture
    is written first and the OBJ last, so an OBJ on disk always has its material files.
    Returns {"obj", "mtl", "texture"} paths."""
    import trimesh  # noqa: PLC0415

    path = Path(path)
    stem = path.stem
    material = trimesh.visual.material.SimpleMaterial(image=_image(texture_uint8), name=stem, diffuse=[255, 255, 255, 255])
    mesh = _textured_mesh(vertices, faces, uvs, material, normals)
    text, files = trimesh.exchange.obj.export_obj(
        mesh, include_normals=True, include_texture=True, return_texture=True, write_texture=False, mtl_name=f"{stem}.mtl"
    )
    if f"{stem}.mtl" not in files or "map_Kd" not in files[f"{stem}.mtl"].decode():
        raise RuntimeError("trimesh did not produce a textured MTL")  # its exporter swallows errors
    out = {}
    items = []
    for name, data in sorted(files.items(), key=lambda kv: kv[0].endswith(".mtl")):
        items.append((path.parent / name, data))
        out["mtl" if name.endswith(".mtl") else "texture"] = path.parent / name
    # All or none (a full disk must not leave an old OBJ beside a new texture); the OBJ goes last.
    atomic_write_all([*items, (path, text)])
    out["obj"] = path
    return out


def write_ply(path, vertices: np.ndarray, faces: np.ndarray, colors: np.ndarray | None = None) -> Path:
    """Binary PLY with per-vertex colours (uint8 [V, 3|4] or float [V, 3|4] in [0, 1])."""
    import trimesh  # noqa: PLC0415

    kwargs = {}
    if colors is not None:
        c = np.asarray(colors)
        if c.dtype != np.uint8:
            c = (np.clip(c, 0.0, 1.0) * 255.0).round().astype(np.uint8)
        kwargs["vertex_colors"] = c
    mesh = trimesh.Trimesh(np.asarray(vertices, dtype=np.float64), np.asarray(faces, dtype=np.int64), process=False, **kwargs)
    path = Path(path)
    atomic_write(path, trimesh.exchange.ply.export_ply(mesh, encoding="binary"))
    return path


def save_png(path, image_uint8: np.ndarray) -> Path:
    """Write an image [H, W, 3|4] uint8 as PNG, atomically."""
    buf = io.BytesIO()
    _image(image_uint8).save(buf, format="PNG")
    path = Path(path)
    atomic_write(path, buf.getvalue())
    return path
