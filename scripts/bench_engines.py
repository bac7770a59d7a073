#!/usr/bin/env python
"""Variance, convergence and cost of SDS, VSD and SSD on the built-in model (JSON + PNG out).

    python scripts/bench_engines.py --out benchmarks/engines_cpu.json --png benchmarks/engines_cpu.png
    python scripts/bench_engines.py --quick --out /tmp/engines.json     # CI-sized

(a) Gradient variance at fixed theta: one SDS run is stopped at several checkpoints; at each, every
    engine draws K independent (t, eps, camera) samples of G and of the theta-gradient it induces
    (mean per-element variance). Stateful engines first adapt at that theta for `--adapt` draws
    (SSD fits its weights, VSD trains its LoRA), then draw without learning.
(b) Quality against steps: one run per engine from the same seed; the 3D check (silhouette IoU with
    the true shape, foreground colour error) every `--eval-every` steps. Quality = IoU - colour
    error; SSD "reaches" SDS's final quality (mean of its last two checks) at the first step from
    which its own two-check running mean stays at or above it.
(c) Time per step and its breakdown, from the same runs.
Top-level numbers: variance_ratio_ssd_sds, variance_ratio_ssd_vsd, step_time_ratio_ssd_sds,
step_time_ratio_ssd_vsd, steps_ratio_ssd_to_sds_quality (null when SDS's final quality is never reached).
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from steindreamer.config import load_config  # noqa: E402
from steindreamer.guidance.config import ENGINES  # noqa: E402
from steindreamer.guidance.diffusion import DiffusionGuidance  # noqa: E402
from steindreamer.guidance.variance import gradient_variance, induced_theta_grad  # noqa: E402
from steindreamer.toy.check3d import evaluate_field  # noqa: E402
from steindreamer.stages import Context, NeRFStage  # noqa: E402


def make_stage(engine: str, args, extra=()) -> NeRFStage:
    cfg = load_config(args.preset, None, [f"engine={engine}", f"seed={args.seed}", "train.variance_every=0", *args.override, *extra])
    guidance = DiffusionGuidance(cfg.guidance.model, torch.device("cpu"), True, cfg.guidance.cache_dir)
    return NeRFStage(Context(args.prompt, cfg, guidance))


def draw_g(stage: NeRFStage, update: bool):
    ctx = stage.ctx
    out, cams = stage.render_train()
    x = ctx.guidance.encode(out["rgb"].permute(0, 3, 1, 2))
    t, noise = ctx.draw_noise(x, *stage.t_range())
    grad, _ = ctx.distiller.gradient(x, out, cams, ctx.text_for(cams), ctx.uncond, t, noise, update=update, generator=ctx.generator)
    return x, grad


def variance_at(stage: NeRFStage, field_state: dict, step: int, args) -> dict:
    """Variance of G and of its theta gradient at the field state of `step`, rendered as training
    renders at that step (its shading schedule, t annealing). `stage` must be fresh: what an
    estimator fits (mu sums, the LoRA) is fitted here, at this state, and nowhere else."""
    stage.field.load_state_dict(field_state)
    stage.step_index = step
    for _ in range(args.adapt):  # SSD fits (mu, nu), VSD trains its LoRA, at this theta
        with torch.no_grad():
            draw_g(stage, update=True)
    params = [p for p in stage.field.parameters() if p.requires_grad]

    def draw(_):
        x, grad = draw_g(stage, update=False)
        return grad.detach(), induced_theta_grad(x, grad, params)

    report = gradient_variance(draw, args.draws)
    return {"var_image": report.var_image, "var_theta": report.var_theta}


def variance_table(states: dict, make, args) -> dict:
    """{engine: {step: variance_at(...)}}, each (engine, step) on a stage of its own from `make`
    (a stage reused across states would carry one state's mu sums into the next)."""
    return {e: {step: variance_at(make(e), state, step, args) for step, state in states.items()} for e in ENGINES}


def run_quality(engine: str, args) -> dict:
    stage = make_stage(engine, args)
    series, times = [], []
    for step in range(args.steps + 1):
        if step % args.eval_every == 0 or step == args.steps:
            q = evaluate_field(stage.field, stage.background, stage.cfg, args.prompt, views=8, resolution=32)
            series.append({"step": step, "mean_iou": q["mean_iou"], "colour_error": q["colour_error"], "best_shape": q["best_shape"]})
        if step < args.steps:
            info = stage.step()
            times.append({k: v for k, v in info.items() if k.startswith("time_")} | {"step": sum(v for k, v in info.items() if k.startswith("time_"))})
    keys = times[0].keys()
    med = {k: statistics.median(t[k] for t in times[1:] or times) for k in keys}
    return {"series": series, "step_seconds": med["step"], "breakdown": {k: med[k] for k in keys if k != "step"}, "stage": stage}


def quality(point: dict) -> float:
    """One number per 3D check: silhouette IoU with the true shape, less the foreground colour error."""
    return point["mean_iou"] - point["colour_error"]


def final_quality(series: list[dict]) -> float:
    # The mean of the last two checks: one noisy check must not set the bar.
    return float(np.mean([quality(p) for p in series[-2:]]))


def variance_ratio(variance: dict, a: str, b: str, key: str = "var_theta") -> float:
    """Engine a's variance over engine b's, averaged over the checkpoints: variance[engine][step][key]."""
    return float(np.mean([variance[a][s][key] / variance[b][s][key] for s in variance[a]]))


def steps_to_reach(series: list[dict], level: float) -> int | None:
    """First step from which the (two-check running mean) quality stays at or above `level` to the end."""
    smooth = [float(np.mean([quality(p) for p in series[max(0, i - 1):i + 1]])) for i in range(len(series))]
    for i, point in enumerate(series):
        if all(q >= level for q in smooth[i:]):
            return point["step"]
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="toy")
    parser.add_argument("--prompt", default="a red cube")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--checkpoints", type=int, default=3, help="points of the SDS run where variance is measured")
    parser.add_argument("--draws", type=int, default=16)
    parser.add_argument("--adapt", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="CI-sized: 20 steps, 2 checkpoints, 4 draws")
    parser.add_argument("override", nargs="*", help="config overrides for every run, key=value")
    parser.add_argument("--out")
    parser.add_argument("--png")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.eval_every, args.checkpoints, args.draws, args.adapt = 20, 10, 2, 4, 3
    t0 = time.perf_counter()
    torch.manual_seed(args.seed)

    # (b) + (c): one run per engine, same seed.
    runs = {e: run_quality(e, args) for e in ENGINES}
    # (a): checkpoints of the SDS run's trajectory, re-created by re-running SDS to each point.
    ref = make_stage("sds", args)
    marks = sorted({max(1, round(args.steps * (i + 1) / args.checkpoints)) for i in range(args.checkpoints)})
    states = {}
    for step in range(1, args.steps + 1):
        ref.step()
        if step in marks:
            states[step] = copy.deepcopy(ref.field.state_dict())
    variance = variance_table(states, lambda engine: make_stage(engine, args), args)

    def ratio(a, b, key="var_theta"):
        return variance_ratio(variance, a, b, key)

    sds_final = final_quality(runs["sds"]["series"])
    reach = steps_to_reach(runs["ssd"]["series"], sds_final)
    result = {
        "prompt": args.prompt, "preset": args.preset, "steps": args.steps, "draws": args.draws, "seconds": None,
        "variance_ratio_ssd_sds": ratio("ssd", "sds"), "variance_ratio_ssd_vsd": ratio("ssd", "vsd"),
        "variance_ratio_ssd_sds_image": ratio("ssd", "sds", "var_image"), "variance_ratio_ssd_vsd_image": ratio("ssd", "vsd", "var_image"),
        "step_time_ratio_ssd_sds": runs["ssd"]["step_seconds"] / runs["sds"]["step_seconds"],
        "step_time_ratio_ssd_vsd": runs["ssd"]["step_seconds"] / runs["vsd"]["step_seconds"],
        "steps_ratio_ssd_to_sds_quality": (reach / args.steps) if reach is not None else None,
        "quality_measure": "3D check: mean IoU with the true shape minus foreground colour error; final = mean of the last two checks",
        "final_quality": {e: final_quality(runs[e]["series"]) for e in ENGINES},
        "variance": {e: {str(s): v for s, v in variance[e].items()} for e in ENGINES},
        "quality": {e: runs[e]["series"] for e in ENGINES},
        "time": {e: {"step_seconds": runs[e]["step_seconds"], "breakdown": runs[e]["breakdown"]} for e in ENGINES},
    }
    result["seconds"] = time.perf_counter() - t0
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        from steindreamer.fsio import atomic_write

        atomic_write(args.out, text)
    if args.png:
        plot(result, Path(args.png))
    return 0


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from steindreamer.fsio import atomic_save

    fig, ax = plt.subplots(1, 3, figsize=(14, 4))
    for e in ENGINES:
        v = result["variance"][e]
        steps = sorted(int(s) for s in v)
        ax[0].plot(steps, [v[str(s)]["var_theta"] for s in steps], "o-", label=e)
        q = result["quality"][e]
        ax[1].plot([p["step"] for p in q], [quality(p) for p in q], label=e)
        ax[2].bar(e, result["time"][e]["step_seconds"])
    ax[0].set(title="theta-gradient variance at fixed theta", xlabel="checkpoint step (SDS run)", yscale="log")
    ax[1].set(title=f"3D check: IoU - colour error ({result['prompt']})", xlabel="step")
    ax[2].set(title="seconds per step")
    ax[0].legend(), ax[1].legend()
    fig.tight_layout()
    atomic_save(path, lambda tmp: fig.savefig(tmp, format="png", dpi=90))


if __name__ == "__main__":
    sys.exit(main())
