"""The whole job for one prompt: NeRF stage, mesh stage (optional), export and turntable, in one run
folder. Writes `result.json` there: what was produced and the final metrics."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

from .assets import export_mesh, turntable_from_mesh
from .config import Config
from .export.extract import extract_field_surface
from .field.nerf import AlbedoField
from .fsio import atomic_write
from .guidance.diffusion import DiffusionGuidance, pick_device
from .guidance.distill import Distiller
from .runfolder import RunFolder
from .stages import Context, MeshStage, NeRFStage, run_stage


def build_stages(prompt: str, cfg: Config, resume_from: RunFolder | None = None, show_progress: bool = True,
                 make_distiller: Callable[..., Distiller] = Distiller):
    """The context and the NeRF stage, restored from `resume_from`'s newest NeRF checkpoint if given
    (and it has one). `make_distiller`: see Context."""
    device = pick_device(cfg.train.device)
    guidance = DiffusionGuidance(cfg.guidance.model, device, cfg.guidance.half_precision, cfg.guidance.cache_dir)
    ctx = Context(prompt, cfg, guidance, show_progress, make_distiller)
    nerf = NeRFStage(ctx)
    state = resume_from.resume_state("nerf", cfg, prompt, device) if resume_from is not None else None
    if state is not None:
        nerf.load_state(state)
    return ctx, nerf


def mesh_stage(ctx: Context, nerf: NeRFStage, resume_from: RunFolder | None = None) -> MeshStage:
    """The mesh stage from the NeRF's surface, or restored from `resume_from`'s newest mesh checkpoint."""
    state = resume_from.resume_state("mesh", ctx.cfg, ctx.prompt, ctx.device) if resume_from is not None else None
    if state is None:
        return MeshStage(ctx, nerf.field)
    stage = MeshStage(ctx, nerf.field, state["mesh"]["base_vertices"].cpu(), state["mesh"]["faces"].cpu())
    stage.load_state(state)
    return stage


def generate(prompt: str, cfg: Config, run_dir: Path, resume: bool = False, show_progress: bool = True,
             callbacks: tuple[Callable, ...] = (), make_distiller: Callable[..., Distiller] = Distiller) -> dict:
    """`prompt` as `steindreamer.prompt.check_prompt` returns it. Returns result.json's contents plus
    "stopped" (a callback ended training; nothing was exported)."""
    run = RunFolder(run_dir)
    start = time.perf_counter()
    ctx, nerf = build_stages(prompt, cfg, run if resume else None, show_progress, make_distiller)
    trained = run_stage(nerf, run, callbacks=callbacks, show_progress=show_progress)
    timings = {"nerf": time.perf_counter() - start}
    last = trained["last"]
    if not trained["stopped"] and cfg.mesh.enabled:
        t = time.perf_counter()
        mesh = mesh_stage(ctx, nerf, run if resume else None)
        refined = run_stage(mesh, run, offset=nerf.step_index, callbacks=callbacks, show_progress=show_progress)
        trained["stopped"] = refined["stopped"]
        vertices, faces = mesh.mesh.export_arrays()
        color = mesh.texture
        timings["mesh"] = time.perf_counter() - t
    elif not trained["stopped"]:
        vertices, faces, _ = extract_field_surface(nerf.field, cfg.mesh)
        color = AlbedoField(nerf.field)
    if trained["stopped"]:
        return {"prompt": prompt, "steps": nerf.step_index, "seconds": time.perf_counter() - start, "stopped": True}
    t = time.perf_counter()
    exported = export_mesh(run.root, vertices, faces, color, cfg)
    timings["export"] = time.perf_counter() - t
    if cfg.export.turntable:
        t = time.perf_counter()
        turntable_from_mesh(run.root, vertices, faces, color, cfg)
        timings["turntable"] = time.perf_counter() - t
    result = {
        "prompt": prompt,
        "seed": cfg.train.seed,
        "engine": cfg.guidance.engine,
        "steps": nerf.step_index,
        "seconds": time.perf_counter() - start,
        "final": {k: last[k] for k in ("loss", "opacity", "mu", "variance") if k in last},
        "mesh": {"vertices": int(len(vertices)) - exported["removed"]["unreferenced_vertices"],  # as exported, after the repair
                 "faces": int(len(faces)) - exported["removed"]["degenerate_faces"], "removed_at_export": exported["removed"],
                 "texture_coverage": exported.get("texture_coverage")},
        "timings": timings,
        "files": run.files(),
    }
    atomic_write(run.result, json.dumps(result, indent=2))
    return {**result, "stopped": False}
