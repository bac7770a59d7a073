"""The whole job for one prompt: NeRF stage, mesh stage (optional), export and turntable. Writes
`result.json` in the run folder: what was produced and the final metrics."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

from .config import Config
from .fsio import atomic_write
from .assets import export_mesh, turntable_from_mesh
from .mesh_stage import AlbedoField, extract_from_nerf, run_mesh_stage
from .train import run_nerf_stage


def generate(prompt: str, cfg: Config, run_dir: Path, resume: bool = False, show_progress: bool = True,
             callbacks: tuple[Callable, ...] = ()) -> dict:
    run_dir = Path(run_dir)
    start = time.perf_counter()
    nerf = run_nerf_stage(prompt, cfg, run_dir, resume=resume, show_progress=show_progress, callbacks=callbacks)
    last = nerf["last"]
    stage = nerf["stage"]
    timings = {"nerf": time.perf_counter() - start}
    t = time.perf_counter()
    if cfg.mesh.enabled:
        mesh = run_mesh_stage(stage, run_dir, resume=resume, show_progress=show_progress)
        vertices, faces = mesh.mesh.export_arrays()
        color = mesh.texture
        timings["mesh"] = time.perf_counter() - t
    else:
        vertices, faces, _ = extract_from_nerf(stage.field, cfg)
        color = AlbedoField(stage.field)
    t = time.perf_counter()
    exported = export_mesh(run_dir, vertices, faces, color, cfg)
    timings["export"] = time.perf_counter() - t
    if cfg.export.turntable:
        t = time.perf_counter()
        turntable_from_mesh(run_dir, vertices, faces, color, cfg)
        timings["turntable"] = time.perf_counter() - t
    result = {
        "prompt": prompt.strip(),
        "seed": cfg.train.seed,
        "engine": cfg.guidance.engine,
        "steps": nerf["step"],
        "seconds": time.perf_counter() - start,
        "final": {k: last[k] for k in ("loss", "opacity", "mu", "variance") if k in last},
        "mesh": {"vertices": int(len(vertices)), "faces": int(len(faces)), "texture_coverage": exported.get("texture_coverage")},
        "timings": timings,
        "files": sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.is_file() and not p.name.startswith(".")),
    }
    atomic_write(run_dir / "result.json", json.dumps(result, indent=2))
    result["stage"] = nerf["stage"]
    return result
