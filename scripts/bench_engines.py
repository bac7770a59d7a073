#!/usr/bin/env python
"""Variance, cost and convergence of the estimators (SDS, SSD, VSD and the exact noise reducers) on
the built-in model, measured honestly (JSON + PNG out; docs/method.md, "Variance, measured honestly").

    python scripts/bench_engines.py --out benchmarks/engines_cpu.json --png benchmarks/engines_cpu.png
    python scripts/bench_engines.py --quick --out /tmp/engines.json     # CI-sized

(a) Where SDS's variance lives: at checkpoints of one SDS run, a nested design (C renders, T
    timesteps per render, E noises per (render, t)), the same draws for every engine, splits the
    theta-gradient variance into camera, t and eps parts (`inner_fraction`: the eps share, the most
    any eps control variate can remove); per t bucket, each engine's (and the antithetic pair's)
    eps variance over SDS's, with bootstrap intervals.
(b) Per step and per unit cost: every configuration in CONFIGS draws independent windows of `--window`
    L consecutive steps at the same checkpoints (each on a stage of its own, rendered at those steps;
    SSD's weights and VSD's LoRA first adapt there, then are frozen; a fresh replicate of the run's
    sequence per window). The theta variance per step is L x the variance of a window's mean gradient:
    what Adam's momentum (beta1 0.9) averages, so negatively correlated successive steps (the
    low-discrepancy sequence) count, and for independent steps it is the one-step variance.
    `variance_per_cost_vs_sds` = that variance x measured seconds per step over SDS's, mean over
    checkpoints, with a 90 % bootstrap interval (also per UNet call, and the one-step variance ratio
    from each window's first step). A configuration that spends more must beat simply taking more draws.
(c) Convergence: SDS and the configuration with the lowest variance per cost train from the same
    seeds (`--convergence-seeds`, their checks averaged) on several prompts; every `--eval-every`
    steps the NeRF's surface (the mesh stage's extraction) is scored by volumetric IoU with the true
    shape (steindreamer.toy.shape3d).
    `steps_to_sds_quality` = the fraction of SDS's steps after which the configuration's two-check
    running IoU stays at or above SDS's final IoU (mean of its last two checks); null if never.
    The engines (and the biased ablation ssd_paper) also train on the main prompt for the plot.
Every configuration starts from plain sampling (iid cameras and t, one draw), whatever the preset
turns on, so "sds" is plain SDS and each reducer is in the configuration's name.
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
from steindreamer.export.extract import extract_field_surface  # noqa: E402
from steindreamer.guidance.diffusion import DiffusionGuidance  # noqa: E402
from steindreamer.guidance.engines import injected_loss  # noqa: E402
from steindreamer.guidance.variance import (NestedMoments, StepSamples, bootstrap_ratio, bucket_ratios, group_moments,  # noqa: E402
                                            induced_theta_grad, nested_components)
from steindreamer.stages import Context, NeRFStage  # noqa: E402
from steindreamer.toy import shape3d  # noqa: E402
from steindreamer.toy.world import parse_caption  # noqa: E402

PAIR = ["guidance.noise.draws=2", "guidance.noise.antithetic=true"]
STRAT = ["guidance.noise.t_sampling=stratified"]
CAM_SEQ = ["camera.sampling=sequence"]
T_SEQ = ["guidance.noise.t_sampling=sequence"]
SEQ = CAM_SEQ + T_SEQ  # cameras, shading and t from the run's low-discrepancy view sequence
# Every configuration starts from plain sampling (iid cameras and t), whatever the preset turns on:
# "sds" is plain SDS, the reference of every ratio, and each reducer is named where it is used.
PLAIN = ["camera.sampling=iid", "guidance.noise.t_sampling=iid", "guidance.noise.draws=1", "guidance.noise.antithetic=false"]
# name -> (engine, overrides): the estimator configurations compared per step and per cost
CONFIGS = {
    "sds": ("sds", []),
    "ssd": ("ssd", []),
    "vsd": ("vsd", []),
    "sds_draws2": ("sds", ["guidance.noise.draws=2"]),
    "sds_antithetic": ("sds", PAIR),
    "sds_stratified": ("sds", STRAT),
    "sds_antithetic_stratified": ("sds", PAIR + STRAT),
    "sds_1view_antithetic_stratified": ("sds", PAIR + STRAT + ["train.batch_size=1"]),
    "sds_draws4_antithetic_stratified": ("sds", ["guidance.noise.draws=4", "guidance.noise.antithetic=true"] + STRAT),
    "ssd_antithetic_stratified": ("ssd", PAIR + STRAT),
    "vsd_antithetic_stratified": ("vsd", PAIR + STRAT),
    "sds_camera_sequence": ("sds", CAM_SEQ),
    "sds_t_sequence": ("sds", T_SEQ),
    "sds_sequence": ("sds", SEQ),
    "sds_sequence_antithetic": ("sds", SEQ + PAIR),
    "ssd_sequence": ("ssd", SEQ),
    "vsd_sequence": ("vsd", SEQ),
    "vsd_kl": ("vsd", ["guidance.vsd.divergence=kl"]),  # f-distill's forward KL
    "vsd_js": ("vsd", ["guidance.vsd.divergence=js"]),  # ... and Jensen-Shannon
}
DEFAULT_CONFIGS = ("sds", "ssd", "vsd", "sds_antithetic", "sds_camera_sequence", "sds_t_sequence", "sds_sequence", "sds_sequence_antithetic",
                   "ssd_sequence")
# trained on the main prompt for the quality plot; ssd_paper is the project page's literal (biased) term
QUALITY_RUNS = {"sds": ("sds", []), "ssd": ("ssd", []), "vsd": ("vsd", []), "ssd_paper": ("ssd", ["guidance.ssd.stein_form=paper"]),
                "vsd_kl": CONFIGS["vsd_kl"], "vsd_js": CONFIGS["vsd_js"]}
DEFAULT_QUALITY_RUNS = ("sds", "ssd", "vsd", "ssd_paper")
# bench_quality's quick six: the prior's fixed point lies ahead of SDS's end (cube, cylinder, torus),
# level with it (pyramid, cone) or behind it (sphere: the starting blob is one), docs/method.md
CONVERGENCE_PROMPTS = ("a red cube", "a orange pyramid", "a green sphere", "a blue cone", "a yellow torus", "a purple cylinder")
UNBIASED_ENGINES = ("sds", "ssd", "vsd")


def make_stage(engine: str, args, extra=(), prompt: str | None = None, seed: int | None = None) -> NeRFStage:
    seed = args.seed if seed is None else seed
    cfg = load_config(args.preset, None, [f"engine={engine}", f"seed={seed}", "train.variance_every=0", *PLAIN, *args.override, *extra])
    guidance = DiffusionGuidance(cfg.guidance.model, torch.device("cpu"), True, cfg.guidance.cache_dir)
    return NeRFStage(Context(prompt or args.prompt, cfg, guidance))


def draw_g(stage: NeRFStage, update: bool, independent: bool = True):
    """One whole step's estimate (its renders, its draws) without updating the field; `independent`:
    its t from a fresh replicate of the sequence (else the stage's, at its step index)."""
    ctx = stage.ctx
    out, cams = stage.render_train()
    x = ctx.guidance.encode(out["rgb"].permute(0, 3, 1, 2))
    t, noise = ctx.draw_noise(x, *stage.t_range(), step=stage.step_index, independent=independent)
    grad, _ = ctx.distiller.gradient(x, out, cams, ctx.text_for(cams), ctx.uncond, t, noise, update=update, generator=ctx.generator)
    return x, grad


def at_state(stage: NeRFStage, field_state: dict, step: int, adapt: int) -> NeRFStage:
    """The stage at the field state of `step`, rendering as training renders there (its shading
    schedule, t annealing); SSD fits (mu, nu) and VSD trains its LoRA for `adapt` draws, then both
    stay frozen (update=False) while they are measured."""
    stage.field.load_state_dict(field_state)
    stage.step_index = step
    for _ in range(adapt):
        with torch.no_grad():
            draw_g(stage, update=True)
    return stage


def count_unet_rows(stage: NeRFStage) -> list[int]:
    """A counter of the samples the UNet sees (CFG's two halves, VSD's LoRA calls included)."""
    rows = [0]
    stage.ctx.guidance.unet.register_forward_hook(lambda m, a, kw, out: rows.__setitem__(0, rows[0] + int((a[0] if a else kw["sample"]).shape[0])),
                                                  with_kwargs=True)
    return rows


def window_g(stage: NeRFStage, params, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean theta-gradient of `length` consecutive steps at the stage's fixed state, on a fresh
    replicate of the run's sequence (new random shift), and the first step's own."""
    start, total, first = stage.step_index, None, None
    stage.ctx.reshift()
    for k in range(length):
        stage.step_index = start + k
        x, grad = draw_g(stage, update=False, independent=False)
        g = torch.cat([q.flatten() for q in induced_theta_grad(x, grad.detach(), params)])
        first = g if first is None else first
        total = g if total is None else total + g
    stage.step_index = start
    return total / length, first


def step_measure(name: str, state: dict, step: int, args) -> dict:
    """(b) for one configuration at one state: M independent windows of L steps' theta gradients at
    the state, their means and their first steps (the stage is kept for the timing rounds)."""
    engine, extra = CONFIGS[name]
    stage = at_state(make_stage(engine, args, extra), state, step, args.adapt if engine != "sds" else 0)
    params = [p for p in stage.field.parameters() if p.requires_grad]
    samples, single = StepSamples(), StepSamples()
    for _ in range(args.draws):
        mean, first = window_g(stage, params, args.window)
        samples.add(mean), single.add(first)
    samples.close(), single.close()
    return {"samples": samples, "single": single, "window": args.window, "stage": stage}


def time_steps(stages: dict, rounds: int) -> dict:
    """Seconds and UNet samples per real training step of each stage, timed round-robin (one step of
    each in turn, `rounds` times, the first round dropped) so the machine's drift hits all alike."""
    rows = {n: count_unet_rows(s) for n, s in stages.items()}
    seconds = {n: [] for n in stages}
    for _ in range(rounds + 1):
        for n, stage in stages.items():
            t0 = time.perf_counter()
            stage.step()
            seconds[n].append(time.perf_counter() - t0)
    return {n: {"seconds": statistics.median(seconds[n][1:]), "unet_rows": rows[n][0] / (rounds + 1)} for n in stages}


def nested_measure(state: dict, step: int, args) -> dict:
    """(a) at one state: the same (render, t, eps) draws for every engine and for the antithetic pair."""
    render = at_state(make_stage("sds", args), state, step, 0)
    engines = {e: at_state(make_stage(e, args), state, step, args.adapt if e != "sds" else 0) for e in UNBIASED_ENGINES}
    params = [p for p in render.field.parameters() if p.requires_grad]
    ctx, sched = render.ctx, render.ctx.guidance.schedule
    names = list(UNBIASED_ENGINES) + ["sds_antithetic"]
    moments = {n: NestedMoments([], [], args.nested[2]) for n in names}
    ts = []
    for _ in range(args.nested[0]):
        out, cams = render.render_train()
        x = ctx.guidance.encode(out["rgb"].permute(0, 3, 1, 2))
        cond = ctx.text_for(cams)
        for n in names:
            moments[n].means.append([]), moments[n].inner.append([])
        ts.append([])
        for _ in range(args.nested[1]):
            t = sched.sample_t(1, *render.t_range(), ctx.generator).repeat(x.shape[0])
            ts[-1].append(int(t[0]))
            draws = {n: [] for n in names}
            for _ in range(args.nested[2]):
                noise = torch.randn(x.shape, generator=ctx.generator)
                grads = {}
                for e in UNBIASED_ENGINES:
                    grads[e] = engines[e].ctx.distiller.gradient(x, out, cams, cond, ctx.uncond, t, noise, update=False)[0].detach()
                grads["sds_antithetic"] = 0.5 * (grads["sds"] + engines["sds"].ctx.distiller.gradient(
                    x, out, cams, cond, ctx.uncond, t, -noise, update=False)[0].detach())
                for n, g in grads.items():
                    draws[n].append(torch.cat([q.flatten() for q in induced_theta_grad(x, g, params)]))
            for n in names:
                mean, inner = group_moments(draws[n])
                moments[n].means[-1].append(mean), moments[n].inner[-1].append(inner)
    return {"components": {n: nested_components(moments[n]) for n in names}, "t": ts,
            "inner": {n: moments[n].inner for n in names}}


def per_cost(measures: dict, timing: dict, args) -> dict:
    """Each configuration's theta variance x cost over SDS's (mean over checkpoints), 90 % intervals."""
    out = {}
    ref, tref = measures["sds"], timing["sds"]
    for name, by_state in measures.items():
        steps = list(by_state)
        sec = timing[name]["seconds"] / tref["seconds"]
        unet = timing[name]["unet_rows"] / tref["unet_rows"]
        var = bootstrap_ratio([(by_state[s]["samples"], ref[s]["samples"]) for s in steps], seed=args.seed)
        one = bootstrap_ratio([(by_state[s]["single"], ref[s]["single"]) for s in steps], seed=args.seed)
        out[name] = {"ratio": var["ratio"] * sec, "interval": [v * sec for v in var["interval"]],
                     "variance_ratio": var["ratio"], "variance_interval": var["interval"], "seconds_ratio": sec,
                     "unet_calls_ratio": unet, "per_unet_call": var["ratio"] * unet,
                     "seconds_per_step": timing[name]["seconds"], "unet_samples_per_step": timing[name]["unet_rows"],
                     "single_step_variance_ratio": one["ratio"], "single_step_variance_interval": one["interval"],
                     "variance_by_step": {str(s): by_state[s]["window"] * by_state[s]["samples"].variance() for s in steps}}
    return out


def nerf_iou(stage: NeRFStage, prompt: str) -> float:
    """The 3D benchmark's volumetric IoU of the NeRF's surface (the mesh stage's extraction) with the truth."""
    _, shape = parse_caption(prompt)
    v, f, _ = extract_field_surface(stage.field, stage.cfg.mesh)
    occ, truth = shape3d.voxelise(v, f), shape3d.true_occupancy(shape)
    return float((occ & truth).sum() / max(1, (occ | truth).sum()))


def train_series(engine: str, extra, prompt: str, args, seed: int | None = None) -> dict:
    stage = make_stage(engine, args, extra, prompt, seed)
    series, seconds = [], []
    for step in range(args.steps + 1):
        if step % args.eval_every == 0 or step == args.steps:
            series.append({"step": step, "volumetric_iou": nerf_iou(stage, prompt)})
        if step < args.steps:
            t0 = time.perf_counter()
            stage.step()
            seconds.append(time.perf_counter() - t0)
    return {"series": series, "step_seconds": statistics.median(seconds)}


def quality(point: dict) -> float:
    return point["volumetric_iou"]


def final_quality(series: list[dict]) -> float:
    # The mean of the last two checks: one noisy check must not set the bar.
    return float(np.mean([quality(p) for p in series[-2:]]))


def steps_to_reach(series: list[dict], level: float) -> int | None:
    """First step from which the (two-check running mean) quality stays at or above `level` to the end."""
    smooth = [float(np.mean([quality(p) for p in series[max(0, i - 1):i + 1]])) for i in range(len(series))]
    for i, point in enumerate(series):
        if all(q >= level for q in smooth[i:]):
            return point["step"]
    return None


def steps_fraction(series: list[dict], level: float, steps: int) -> float | None:
    """steps_to_reach as a fraction of the run's `steps` (None: never)."""
    reach = steps_to_reach(series, level)
    return None if reach is None else reach / steps


def mean_series(runs: list[dict]) -> list[dict]:
    """The check-by-check mean quality of runs with the same checks (seeds of one configuration)."""
    return [{"step": p["step"], "volumetric_iou": float(np.mean([quality(r["series"][i]) for r in runs]))}
            for i, p in enumerate(runs[0]["series"])]


def convergence(best: str, args, runs: dict) -> dict:
    """SDS and `best` from the same seeds on each prompt; the fraction is read off the mean over seeds
    (one seed's final IoU moves by up to 0.08 with the noise stream alone)."""
    engine, extra = CONFIGS[best]
    out = {"config": best, "seeds": args.convergence_seeds, "prompts": {}}
    for prompt in args.convergence_prompts:
        sds, other = [], []
        for k in range(args.convergence_seeds):
            seed = args.seed + k
            reuse = prompt == args.prompt and k == 0 and "sds" in runs
            sds.append(runs["sds"] if reuse else train_series("sds", [], prompt, args, seed))
            other.append(train_series(engine, extra, prompt, args, seed))
        sds_mean, other_mean = mean_series(sds), mean_series(other)
        level = final_quality(sds_mean)
        out["prompts"][prompt] = {"fraction": steps_fraction(other_mean, level, args.steps), "sds_final_iou": level,
                                  "final_iou": final_quality(other_mean), "sds": sds_mean, best: other_mean,
                                  "per_seed": {"sds": [r["series"] for r in sds], best: [r["series"] for r in other]}}
    fractions = [p["fraction"] for p in out["prompts"].values()]
    out["at_most_0.7"] = sum(f is not None and f <= 0.7 for f in fractions)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="toy")
    parser.add_argument("--prompt", default="a red cube")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--checkpoints", type=int, default=3, help="points of the SDS run where variance is measured")
    parser.add_argument("--draws", type=int, default=64, help="windows of steps per configuration and checkpoint")
    parser.add_argument("--window", type=int, default=8, help="consecutive steps per window (~ Adam's momentum horizon)")
    parser.add_argument("--nested", type=int, nargs=3, default=[6, 4, 4], metavar=("C", "T", "E"))
    parser.add_argument("--adapt", type=int, default=20)
    parser.add_argument("--timing-steps", type=int, default=30)
    parser.add_argument("--configs", default=",".join(DEFAULT_CONFIGS), help=f"of {', '.join(CONFIGS)}")
    parser.add_argument("--convergence-prompts", default=",".join(CONVERGENCE_PROMPTS))
    parser.add_argument("--convergence-seeds", type=int, default=3, help="seeds per prompt and configuration, averaged")
    parser.add_argument("--quality-runs", default=",".join(DEFAULT_QUALITY_RUNS), help=f"of {', '.join(QUALITY_RUNS)}")
    parser.add_argument("--quick", action="store_true", help="CI-sized: 20 steps, 1 checkpoint, few draws")
    parser.add_argument("override", nargs="*", help="config overrides for every run, key=value")
    parser.add_argument("--out")
    parser.add_argument("--png")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.eval_every, args.checkpoints, args.draws, args.window, args.adapt, args.timing_steps = 20, 10, 1, 4, 2, 3, 2
        args.convergence_seeds = 1
        args.nested = [2, 2, 2]
    args.convergence_prompts = [p for p in args.convergence_prompts.split(",") if p]
    names = [n for n in args.configs.split(",") if n]
    unknown = set(names) - set(CONFIGS)
    if unknown or "sds" not in names:
        parser.error(f"--configs: unknown {sorted(unknown)} or sds missing; known: {', '.join(CONFIGS)}")
    quality_runs = [n for n in args.quality_runs.split(",") if n]
    if set(quality_runs) - set(QUALITY_RUNS) or "sds" not in quality_runs:
        parser.error(f"--quality-runs: known {', '.join(QUALITY_RUNS)}, sds among them")
    t0 = time.perf_counter()
    torch.manual_seed(args.seed)

    ref = make_stage("sds", args)
    marks = sorted({max(1, round(args.steps * (i + 1) / (args.checkpoints + 1))) for i in range(args.checkpoints)})
    states = {}
    for step in range(1, max(marks) + 1):
        ref.step()
        if step in marks:
            states[step] = copy.deepcopy(ref.field.state_dict())
    print(f"checkpoints {marks} ({time.perf_counter() - t0:.0f} s)", flush=True)
    nested = [nested_measure(state, step, args) for step, state in states.items()]
    print(f"nested draws done ({time.perf_counter() - t0:.0f} s)", flush=True)
    measures, timed = {}, {}
    for name in names:
        measures[name] = {step: step_measure(name, state, step, args) for step, state in states.items()}
        timed[name] = measures[name][marks[-1]]["stage"]  # timed at the last checkpoint; the others go
        for m in measures[name].values():
            m.pop("stage")
        print(f"{name}: done ({time.perf_counter() - t0:.0f} s)", flush=True)
    timing = time_steps(timed, args.timing_steps)
    print(f"timing done ({time.perf_counter() - t0:.0f} s)", flush=True)
    cost = per_cost(measures, timing, args)
    best = min((n for n in cost if n != "sds"), key=lambda n: cost[n]["ratio"]) if len(cost) > 1 else "sds"
    runs = {n: train_series(*QUALITY_RUNS[n], args.prompt, args) for n in quality_runs}
    print(f"quality runs done ({time.perf_counter() - t0:.0f} s)", flush=True)
    conv = convergence(best, args, runs)
    sds_total = [nd["components"]["sds"] for nd in nested]
    lo, hi = ref.ctx.guidance.schedule.t_bounds(*ref.t_range())
    result = {
        "prompt": args.prompt, "preset": args.preset, "steps": args.steps, "checkpoints": marks, "draws": args.draws, "window": args.window,
        "nested_design": args.nested, "adapt": args.adapt, "overrides": args.override, "seconds": None,
        "inner_fraction": float(np.mean([c["inner_fraction"] for c in sds_total])),
        "variance_components": {str(s): nd["components"] for s, nd in zip(marks, nested)},
        "inner_variance_vs_sds_by_t": bucket_ratios(nested, (lo, hi), 4, args.seed),
        "variance_per_cost_vs_sds": cost,
        "best_config": best,
        "steps_to_sds_quality": {"config": best, "fraction": {p: v["fraction"] for p, v in conv["prompts"].items()},
                                 "at_most_0.7": conv["at_most_0.7"]},
        "convergence": conv,
        "quality_measure": "volumetric IoU of the NeRF's extracted surface with the true shape; final = mean of the last two checks",
        "final_quality": {n: final_quality(r["series"]) for n, r in runs.items()},
        "quality": {n: r["series"] for n, r in runs.items()},
        "time": {n: {"step_seconds": r["step_seconds"]} for n, r in runs.items()},
    }
    for a, b in (("ssd", "sds"), ("ssd", "vsd"), ("vsd", "sds")):
        if a in cost and b in cost:
            result[f"variance_ratio_{a}_{b}"] = cost[a]["variance_ratio"] / cost[b]["variance_ratio"]
            result[f"step_time_ratio_{a}_{b}"] = cost[a]["seconds_per_step"] / cost[b]["seconds_per_step"]
    if "ssd" in runs:
        result["steps_ratio_ssd_to_sds_quality"] = steps_fraction(runs["ssd"]["series"], final_quality(runs["sds"]["series"]), args.steps)
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

    fig, ax = plt.subplots(1, 4, figsize=(21, 4.8))
    cost = result["variance_per_cost_vs_sds"]
    colours = plt.get_cmap("tab20")(np.linspace(0, 1, max(len(cost), 2)))
    for (n, c), colour in zip(cost.items(), colours):
        steps = sorted(int(s) for s in c["variance_by_step"])
        ax[0].plot(steps, [c["variance_by_step"][str(s)] for s in steps], "o-", color=colour, label=n)
    for n, series in result["quality"].items():
        ax[1].plot([p["step"] for p in series], [quality(p) for p in series], label=n)
    best = result["best_config"]
    for (p, v), colour in zip(result["convergence"]["prompts"].items(), plt.get_cmap("tab10").colors):
        ax[2].plot([q["step"] for q in v["sds"]], [quality(q) for q in v["sds"]], "-", color=colour, label=f"sds: {p}")
        ax[2].plot([q["step"] for q in v[best]], [quality(q) for q in v[best]], "--", color=colour, label=f"{best}: {p}")
    names = list(cost)
    r = [cost[n]["ratio"] for n in names]
    err = np.array([[cost[n]["ratio"] - cost[n]["interval"][0], cost[n]["interval"][1] - cost[n]["ratio"]] for n in names]).T
    ax[3].barh(names, r, xerr=err, color=colours)
    ax[3].axvline(1.0, color="k", lw=0.8)
    ax[0].set(title=f"theta variance per step at fixed theta (L x Var of an L={result['window']}-step mean)", xlabel="checkpoint step (SDS run)",
              yscale="log")
    ax[1].set(title=f"volumetric IoU of the NeRF's surface ({result['prompt']})", xlabel="step")
    ax[2].set(title=f"SDS against the best per cost ({best})", xlabel="step")
    ax[3].set(title="variance x seconds per step / SDS's (90 % interval)")
    for a in ax[:3]:
        a.legend(fontsize=6)
    fig.tight_layout()
    atomic_save(path, lambda tmp: fig.savefig(tmp, format="png", dpi=90))


if __name__ == "__main__":
    sys.exit(main())
