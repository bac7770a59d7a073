"""The whole job for one prompt: NeRF stage, then (later stages) mesh and export. Writes
`result.json` in the run folder: what was produced and the final metrics."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

from .config import Config
from .fsio import atomic_write
from .train import run_nerf_stage


def generate(prompt: str, cfg: Config, run_dir: Path, resume: bool = False, show_progress: bool = True,
             callbacks: tuple[Callable, ...] = ()) -> dict:
    run_dir = Path(run_dir)
    start = time.perf_counter()
    nerf = run_nerf_stage(prompt, cfg, run_dir, resume=resume, show_progress=show_progress, callbacks=callbacks)
    last = nerf["last"]
    result = {
        "prompt": prompt.strip(),
        "seed": cfg.train.seed,
        "engine": cfg.guidance.engine,
        "steps": nerf["step"],
        "seconds": time.perf_counter() - start,
        "final": {k: last[k] for k in ("loss", "opacity") if k in last},
        "files": sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.is_file() and not p.name.startswith(".")),
    }
    atomic_write(run_dir / "result.json", json.dumps(result, indent=2))
    result["stage"] = nerf["stage"]
    return result
