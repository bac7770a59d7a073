#!/usr/bin/env python
"""Is the late phase of training limited by gradient noise? Convergence of named estimator
configurations against SDS on the built-in world (JSON out), the question behind bench_engines'
`steps_to_sds_quality`.

    python scripts/bench_convergence.py --config sds_batch8=sds:train.batch_size=8 \
        --reuse benchmarks/engines_cpu_builtin.json --out benchmarks/convergence_builtin_batch8.json

Each configuration trains from the same seeds as SDS on each prompt, its NeRF surface scored by
volumetric IoU with the true shape every `--eval-every` steps (bench_engines.train_series); the
fraction is the share of SDS's steps after which its seed-mean IoU stays at or above SDS's final
(bench_engines.steps_fraction). A brute-force configuration such as `train.batch_size=8` (4x the
views, 4x the cost: exactly 1/4 of SDS's per-step variance) bounds what any exact variance reducer
of that strength can buy in steps. `--reuse` takes SDS's and the best configuration's per-seed series
from a bench_engines JSON instead of training them again, after re-running one of them
(`--verify`) and checking that it reproduces.

`--combine A.json B.json ... --config NAME` trains nothing: it gathers NAME's fraction on every prompt
that those runs (bench_engines' convergence blocks, bench_convergence outputs) measured with the same
steps and seeds into one table, the count at or under 0.7 among them:

    python scripts/bench_convergence.py --config sds_sequence_antithetic --combine benchmarks/engines_cpu_builtin.json \
        benchmarks/convergence_builtin_more_prompts.json benchmarks/convergence_builtin_next_diagonal.json \
        --out benchmarks/convergence_builtin_summary.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_engines import CONFIGS, CONVERGENCE_PROMPTS, final_quality, mean_series, steps_fraction, train_series  # noqa: E402

from steindreamer.fsio import atomic_write  # noqa: E402


def parse_config(text: str) -> tuple[str, str, list[str]]:
    """'name=engine:key=value,key=value' (or a bench_engines CONFIGS name) -> (name, engine, overrides)."""
    if "=" not in text.split(":")[0]:
        if text not in CONFIGS:
            raise SystemExit(f"--config: unknown '{text}'; give name=engine:key=value,... or one of {', '.join(CONFIGS)}")
        return text, *CONFIGS[text]
    name, _, rest = text.partition("=")
    engine, _, overrides = rest.partition(":")
    return name, engine, [o for o in overrides.split(",") if o]


def reused_series(path: Path, prompts: list[str], seeds: int) -> dict:
    """{config: {prompt: [series per seed]}} from a bench_engines JSON's convergence block."""
    conv = json.loads(path.read_text())["convergence"]
    out: dict = {}
    for prompt in prompts:
        block = conv["prompts"].get(prompt)
        if block is None:
            continue
        for name, runs in block["per_seed"].items():
            if len(runs) >= seeds:
                out.setdefault(name, {})[prompt] = runs[:seeds]
    return out


def combine(paths: list[str], name: str) -> dict:
    """NAME's per-prompt convergence from earlier runs, refused where they differ in steps, seeds or
    NAME's definition, or measure one prompt twice."""
    rows, setting = {}, None
    for path in paths:
        data = json.loads(Path(path).read_text())
        if "convergence" in data:  # bench_engines: one configuration, its CONFIGS entry when it ran
            block = data["convergence"]
            if block["config"] != name:
                raise SystemExit(f"{path} converged {block['config']!r}, not {name!r}")
            found = {p: (v["fraction"], v["sds_final_iou"], v["final_iou"]) for p, v in block["prompts"].items()}
            here = (data["steps"], block["seeds"], list(CONFIGS[name]))
        else:
            if name not in data["configs"]:
                raise SystemExit(f"{path} has no {name!r} runs")
            found = {p: (v["by_config"][name]["fraction"], v["sds_final_iou"], v["by_config"][name]["final_iou"])
                     for p, v in data["prompts"].items() if name in v["by_config"]}
            here = (data["steps"], data["seeds"], list(data["configs"][name]))
        if setting is not None and here != setting:
            raise SystemExit(f"{path} ran {here}, the others {setting} (steps, seeds, configuration)")
        setting = here
        for prompt, (fraction, sds_final, final) in found.items():
            if prompt in rows:
                raise SystemExit(f"{prompt!r} is measured in both {rows[prompt]['source']} and {path}")
            rows[prompt] = {"fraction": fraction, "sds_final_iou": sds_final, "final_iou": final, "source": str(path)}
    fractions = [r["fraction"] for r in rows.values()]
    return {"config": name, "configuration": setting[2], "steps": setting[0], "seeds": setting[1], "sources": [str(p) for p in paths],
            "prompts": rows, "measured": len(rows), "at_most_0.7": sum(f is not None and f <= 0.7 for f in fractions)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", action="append", default=[], help="name=engine:key=value,... or a bench_engines CONFIGS name")
    ap.add_argument("--prompts", default=",".join(CONVERGENCE_PROMPTS))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--preset", default="toy")
    ap.add_argument("--reuse", default="", help="a bench_engines JSON whose per-seed convergence series to reuse")
    ap.add_argument("--verify", default="sds", help="re-run this reused configuration's first prompt and seed; must match")
    ap.add_argument("--combine", nargs="+", default=[], help="gather --config's fractions from these JSONs; train nothing")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    if args.combine:
        if len(args.config) != 1:
            ap.error("--combine needs exactly one --config")
        summary = combine(args.combine, args.config[0])
        atomic_write(args.out, json.dumps(summary, indent=2))
        for prompt, r in summary["prompts"].items():
            print(f"{prompt}: {r['fraction']} (final IoU {r['final_iou']:.3f} vs SDS {r['sds_final_iou']:.3f})")
        print(f"{summary['at_most_0.7']} of {summary['measured']} prompts at <= 0.7 of SDS's steps")
        return 0
    args.override = []  # bench_engines.make_stage reads it
    prompts = [p for p in args.prompts.split(",") if p]
    configs = [parse_config(c) for c in args.config]
    t0 = time.perf_counter()
    series: dict = {}
    verified = None
    if args.reuse:
        series = reused_series(Path(args.reuse), prompts, args.seeds)
        if args.verify:
            engine, extra = CONFIGS[args.verify]
            if prompts[0] not in series.get(args.verify, {}):
                raise SystemExit(f"{args.reuse} has no {args.verify} series for {prompts[0]!r} to verify")
            again = train_series(engine, extra, prompts[0], args, args.seed)["series"]
            old = series[args.verify][prompts[0]][0]
            verified = max(abs(a["volumetric_iou"] - b["volumetric_iou"]) for a, b in zip(again, old))
            print(f"reuse check: {args.verify} on {prompts[0]!r} seed {args.seed} differs by {verified:.2e} at most", flush=True)
            if verified > 1e-6:
                raise SystemExit(f"{args.reuse} does not reproduce ({verified:.3g}); run without --reuse")
    if "sds" not in series:
        configs.insert(0, ("sds", *CONFIGS["sds"]))
    seconds: dict = {}
    for name, engine, extra in configs:
        for prompt in prompts:
            for k in range(args.seeds):
                run = train_series(engine, extra, prompt, args, args.seed + k)
                series.setdefault(name, {}).setdefault(prompt, []).append(run["series"])
                seconds.setdefault(name, []).append(run["step_seconds"])
                print(f"{name} {prompt!r} seed {args.seed + k}: final IoU {final_quality(run['series']):.3f} "
                      f"({run['step_seconds']:.3f} s/step, {time.perf_counter() - t0:.0f} s)", flush=True)
    result = {"preset": args.preset, "steps": args.steps, "seeds": args.seeds, "reused_from": args.reuse or None,
              "reuse_max_difference": verified, "configs": {n: [e, x] for n, e, x in configs},
              "step_seconds": {n: float(np.median(s)) for n, s in seconds.items()}, "prompts": {}}
    for prompt in prompts:
        sds = mean_series([{"series": s} for s in series["sds"][prompt]])
        level = final_quality(sds)
        block = {"sds_final_iou": level, "by_config": {}}
        for name in series:
            if prompt not in series[name]:
                continue
            mean = mean_series([{"series": s} for s in series[name][prompt]])
            finals = [final_quality(s) for s in series[name][prompt]]
            block["by_config"][name] = {"fraction": steps_fraction(mean, level, args.steps), "final_iou": final_quality(mean),
                                        "mean": mean, "per_seed_final": finals,
                                        "final_iou_seed_sd": float(np.std(finals, ddof=1)) if len(finals) > 1 else None}
        result["prompts"][prompt] = block
    result["seconds"] = time.perf_counter() - t0
    text = json.dumps(result, indent=2)
    atomic_write(args.out, text)
    for prompt, block in result["prompts"].items():
        row = ", ".join(f"{n} {v['fraction']} ({v['final_iou']:.3f})" for n, v in block["by_config"].items())
        print(f"{prompt}: SDS final {block['sds_final_iou']:.3f}; {row}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
