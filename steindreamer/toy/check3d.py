"""The 3D check: a run's NeRF (and mesh) against the true shape of its prompt, from fixed views.

Silhouette IoU (rendered opacity > 0.5 vs the world's exact mask) and the foreground colour (the
albedo render's mean over the predicted silhouette vs the palette colour, and the majority palette
colour by chromaticity)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..cameras import orbit_cameras
from ..render.volume import render_views
from .checker import pixel_colours
from .world import COLOURS, PALETTE, SHAPES, parse_caption, render_shape


def compare(pred_mask: torch.Tensor, pred_rgb: torch.Tensor, true_mask: torch.Tensor, colour: str) -> dict:
    """pred_mask/true_mask [B, H, W] bool, pred_rgb [B, H, W, 3] albedo render."""
    inter = (pred_mask & true_mask).flatten(1).sum(1).float()
    union = (pred_mask | true_mask).flatten(1).sum(1).float().clamp(min=1)
    iou = (inter / union).tolist()
    out = {"iou": iou, "mean_iou": float(np.mean(iou))}
    if pred_mask.any():
        fg = pred_rgb[pred_mask]
        out["colour_error"] = float((fg.mean(0) - torch.tensor(PALETTE[colour])).norm())
        votes = torch.bincount(pixel_colours(fg), minlength=len(COLOURS))
        out["colour"] = COLOURS[int(votes.argmax())]
    else:
        out["colour_error"], out["colour"] = float("nan"), None
    out["colour_right"] = out["colour"] == colour
    return out


def _scorer(prompt: str, cfg, views: int, resolution: int, elevation: float):
    colour, shape = parse_caption(prompt)
    cams = orbit_cameras(views, elevation, float(np.mean(cfg.camera.distance)), float(np.mean(cfg.camera.fov)))
    masks = {s: render_shape(s, colour, cams, resolution, resolution)["mask"][..., 0].bool() for s in SHAPES}

    # IoU against every shape: a blob overlaps a cube well too, so the check also reports whether
    # the prompt's shape matches better than the others ("shape_right").
    def score(pred_mask, pred_rgb):
        res = compare(pred_mask, pred_rgb, masks[shape], colour)
        res["iou_by_shape"] = {s: compare(pred_mask, pred_rgb, m, colour)["mean_iou"] for s, m in masks.items()}
        res["best_shape"] = max(res["iou_by_shape"], key=res["iou_by_shape"].get)
        res["shape_right"] = res["best_shape"] == shape
        return res

    return cams, score, colour, shape


@torch.no_grad()
def evaluate_field(field, background, cfg, prompt: str, views: int = 8, resolution: int = 64, elevation: float = 15.0) -> dict:
    """The check for a NeRF in memory (benchmarks evaluate along a run without reloading)."""
    cams, score, _, _ = _scorer(prompt, cfg, views, resolution, elevation)
    out = render_views(field, background, cams.to(next(field.parameters()).device), cfg.render, resolution, perturb=False)
    return score(out["opacity"][..., 0].cpu() > 0.5, out["rgb"].cpu())


def evaluate_run(run_dir: Path, views: int = 8, resolution: int = 64, elevation: float = 15.0) -> dict:
    from ..field.mesh import MeshField
    from ..runfolder import RunFolder

    run = RunFolder(run_dir)
    cfg = run.read_config()
    prompt = run.prompt_file.read_text().strip()
    cams, score, colour, shape = _scorer(prompt, cfg, views, resolution, elevation)
    result = {"run": str(run_dir), "prompt": prompt, "shape": shape, "colour": colour, "views": views, "resolution": resolution}
    field, background, step = run.load_nerf(cfg)
    result["nerf"] = {"step": step, **evaluate_field(field, background, cfg, prompt, views, resolution, elevation)}
    found = run.load_mesh(cfg)
    if found is not None:
        with torch.no_grad():
            mesh = MeshField(found[0], found[1], found[2], learn_offsets=False)
            out = mesh.render(cams, resolution, resolution, background=1.0)
        result["mesh"] = {"faces": int(len(found[1])), **score(out["opacity"][..., 0] > 0.5, out["rgb"])}
    return result
