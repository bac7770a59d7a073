"""The one training loop, for every stage: steps, the divergence guard, metrics, validation
renders, step callbacks (the live viewer, tests) and the checkpoint cadence."""
from __future__ import annotations

import json
import time

from ..plots import plot_run
from ..progress import StepProgress
from ..runfolder import RunFolder
from .guard import DivergenceGuard
from .stage import Stage


class StopTraining(Exception):
    """Raised by a step callback to end the run cleanly (a checkpoint is written first)."""


def run_stage(stage: Stage, run: RunFolder, offset: int = 0, callbacks: tuple = (), show_progress: bool = True) -> dict:
    """Train `stage` from its step_index to `stage.cadence.steps`. `offset` is the global step of its
    step 0 (the mesh stage's steps follow the NeRF's in metrics.jsonl). Each callback is called as
    cb(stage, info) after every step; one may raise StopTraining to end the run after a checkpoint.
    Returns {"step", "seconds", "last" (the last step's info), "stopped"}."""
    cad, name = stage.cadence, stage.name
    engine = stage.cfg.guidance.engine
    run.trim_metrics(name, offset + stage.step_index)
    run.prune(name, cad.keep)
    guard = DivergenceGuard(stage, stage.cfg.train)
    last: dict = {}
    stopped = False
    start = last_plot = time.perf_counter()
    with StepProgress(cad.steps, stage.step_index, enabled=show_progress, label=name) as bar, run.metrics_log() as log:
        for line in stage.notes():
            bar.log(line)
        while stage.step_index < cad.steps:
            t0 = time.perf_counter()
            info = stage.step()
            info = {"stage": name, "step": offset + stage.step_index, "stage_step": stage.step_index, **info,
                    "seconds": time.perf_counter() - t0, "engine": engine}
            note = guard.check(info)
            if note:
                info["recovery"] = note
                bar.log(note)
            log.write(json.dumps(info) + "\n")
            log.flush()
            bar.update(stage.step_index, info["loss"])
            last = info
            end = stage.step_index == cad.steps
            validate = cad.val_every > 0 and (stage.step_index % cad.val_every == 0 or end)
            if validate:
                suffix = "" if name == "nerf" else f"{name}_"
                run.save_png(f"renders/val_{suffix}{stage.step_index:07d}.png", stage.validation_grid())
            if end or (validate and time.perf_counter() - last_plot >= stage.cfg.train.plot_every_s):
                plot_run(run.root)
                last_plot = time.perf_counter()
            for callback in callbacks:
                try:
                    callback(stage, info)
                except StopTraining:
                    stopped = True
            if (stopped or stage.step_index % cad.ckpt_every == 0 or end) and guard.healthy():
                run.save_checkpoint(name, stage.step_index, stage.state(), cad.keep)
                guard.remember()
            if stopped:
                break
    if run.latest(name) is None:  # steps=0, or resumed at the end: still leave a checkpoint
        run.save_checkpoint(name, stage.step_index, stage.state(), cad.keep)
    return {"step": stage.step_index, "seconds": time.perf_counter() - start, "last": last, "stopped": stopped}
