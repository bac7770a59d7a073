"""What people take away from a run: textured mesh files and turntables, from a live stage or from
the run folder's checkpoints (`steindreamer export` / `render`)."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from .cameras import orbit_cameras
from .config import Config
from .errors import UserError
from .export.extract import extract_field_surface
from .export.pipeline import export_textured, turntable_frames
from .export.video import save_contact_sheet, write_turntable
from .field.nerf import AlbedoField
from .render.volume import render_views, to_uint8
from .runfolder import RunFolder

STEMS = {"glb": "model", "obj": "mesh", "ply": "mesh"}  # file name of each format


def export_mesh(run_dir: Path, vertices: np.ndarray, faces: np.ndarray, color_fn, cfg: Config, formats=None) -> dict:
    formats = tuple(formats or cfg.export.formats)
    with torch.no_grad():
        return export_textured(run_dir, vertices, faces, color_fn, texture_size=cfg.export.texture_size, formats=formats, stems=STEMS)


def turntable_from_mesh(run_dir: Path, vertices, faces, color_fn, cfg: Config, frames: int | None = None, size: int | None = None) -> Path:
    e = cfg.export
    light = torch.tensor([0.3, 0.8, 0.5])
    images = turntable_frames(vertices, faces, color_fn, n_frames=frames or e.turntable_frames, size=size or e.turntable_size,
                              elevation=e.turntable_elevation, distance=float(np.mean(cfg.camera.distance)), fov=float(np.mean(cfg.camera.fov)),
                              light_direction=light / light.norm())
    return _write_turntable(run_dir, images)


@torch.no_grad()
def turntable_from_nerf(run_dir: Path, field, background, cfg: Config, frames: int | None = None, size: int | None = None) -> Path:
    e = cfg.export
    cams = orbit_cameras(frames or e.turntable_frames, e.turntable_elevation, float(np.mean(cfg.camera.distance)), float(np.mean(cfg.camera.fov)))
    device = next(field.parameters()).device
    images = []
    for i in range(len(cams)):
        out = render_views(field, background, cams[i].to(device), cfg.render, size or e.turntable_size, perturb=False)
        images.append(to_uint8(out["rgb"][0]))
    return _write_turntable(run_dir, images)


def _write_turntable(run_dir: Path, images: list) -> Path:
    run_dir = Path(run_dir)
    save_contact_sheet(images[:: max(1, len(images) // 8)], run_dir / "renders" / "contact_sheet.png")
    return write_turntable(images, run_dir / "turntable.mp4")


# --- from a run folder ---------------------------------------------------------------------------------
def mesh_of(run: RunFolder, cfg: Config, stage: str = "auto", device="cpu"):
    """(vertices, faces, albedo module) of the mesh stage for stage auto or mesh (None for auto when
    the mesh stage never ran; a user error for mesh), None for stage nerf."""
    if stage == "nerf":
        return None
    found = run.load_mesh(cfg, device)
    if found is None and stage == "mesh":
        raise UserError(f"no mesh-stage checkpoint in {run.checkpoints}")
    return found


def surface_of(run: RunFolder, cfg: Config, stage: str = "auto", device="cpu"):
    """(vertices, faces, colour fn, which) from the mesh stage if it ran (or asked for), else
    extracted from the NeRF."""
    found = mesh_of(run, cfg, stage, device)
    if found is not None:
        return (*found, "mesh")
    field, _, _ = run.load_nerf(cfg, device)
    v, f, _ = extract_field_surface(field, cfg.mesh)
    return v, f, AlbedoField(field), "nerf"


def export_run(run_dir: Path, formats, stage: str = "auto") -> dict:
    run = RunFolder(run_dir)
    cfg = run.read_config()
    t = time.perf_counter()
    v, f, color, which = surface_of(run, cfg, stage)
    result = export_mesh(run_dir, v, f, color, cfg, formats)
    result["stage"], result["total_seconds"] = which, time.perf_counter() - t
    return result


def render_run(run_dir: Path, stage: str = "auto", frames: int | None = None, size: int | None = None) -> Path:
    run = RunFolder(run_dir)
    cfg = run.read_config()
    found = mesh_of(run, cfg, stage)
    if found is not None:
        return turntable_from_mesh(run_dir, *found, cfg, frames, size)
    field, background, _ = run.load_nerf(cfg)
    return turntable_from_nerf(run_dir, field, background, cfg, frames, size)
