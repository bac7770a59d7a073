"""Resident memory over a long toy run, with the live viewer off and on.

    python scripts/bench_memory.py [--steps 3000] [--out benchmarks/memory_toy.json]

Each mode runs in its own process: the NeRF stage of `generate "a red cube" --preset toy` for
--steps steps (checkpoints, validation grids and the variance meter at the preset's cadences), its
resident set (VmRSS, /proc/self/status) read every --every steps. "Flat" means the largest RSS after
the warm-up (the first 10 % of steps) is within 10 % of the RSS at the warm-up's end. With the viewer
on, a viser server runs and the callback updates its status, plots and validation image every
step; frames are rendered only for connected browsers (`frames_rendered` in the result says whether
any connected: none does unless you open the viewer's address while it runs).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIMIT = 1.10


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status (Linux only)")


def child(steps: int, every: int, viewer: bool, overrides: list[str], leak_kib: int = 0) -> dict:
    from steindreamer.config import load_config
    from steindreamer.pipeline import build_stages
    from steindreamer.runfolder import RunFolder
    from steindreamer.stages import run_stage

    cfg = load_config("toy", None, [f"steps={steps}", "train.val_every=500", "train.ckpt_every=500", *overrides])
    samples: list[tuple[int, float]] = []
    callbacks = []
    view = None
    if viewer:
        from steindreamer.viewer import ViewerCallback

        view = ViewerCallback("127.0.0.1", 0, None)
        callbacks.append(view)

    kept = []

    def sample(stage, info):
        if leak_kib:  # the meter's own test: memory that does pile up must be seen
            kept.append(b"x" * (leak_kib * 1024))
        if stage.step_index % every == 0 or stage.step_index == 1:
            samples.append((stage.step_index, rss_mib()))

    callbacks.append(sample)
    with tempfile.TemporaryDirectory() as tmp:
        run = RunFolder(Path(tmp) / "run")
        run.prepare(False, False)
        run.write_start(cfg, "a red cube")
        if view is not None:
            view.run_dir = run.root  # the validation grid it shows
        t = time.perf_counter()
        run_stage(build_stages("a red cube", cfg)[1], run, callbacks=tuple(callbacks), show_progress=False)
        seconds = time.perf_counter() - t
    frames = view.frames if view is not None else 0
    if view is not None:
        view.close()
    warm = max(1, steps // 10)
    base = next(r for s, r in samples if s >= warm)
    after = [r for s, r in samples if s >= warm]
    return {"viewer": viewer, "steps": steps, "seconds": round(seconds, 1), "frames_rendered": frames,
            "rss_mib_at_warmup": round(base, 1), "rss_mib_max_after": round(max(after), 1), "rss_mib_last": round(after[-1], 1),
            "growth": round(max(after) / base, 4), "flat": max(after) / base <= LIMIT,
            "samples": [(s, round(r, 1)) for s, r in samples]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--every", type=int, default=50, help="read the RSS every N steps")
    ap.add_argument("--modes", default="off,on", help="viewer modes, comma-separated")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="key=value", help="config overrides")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "memory_toy.json"))
    ap.add_argument("--child", choices=["off", "on"], help=argparse.SUPPRESS)
    ap.add_argument("--leak-kib", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.steps < 20 or args.every < 1:
        ap.error("--steps must be >= 20 and --every >= 1")
    if args.child:
        print(json.dumps(child(args.steps, args.every, args.child == "on", args.overrides, args.leak_kib)))
        return
    results = {}
    for mode in args.modes.split(","):
        sets = [a for o in args.overrides for a in ("--set", o)]
        proc = subprocess.run([sys.executable, __file__, "--child", mode, "--steps", str(args.steps), "--every", str(args.every), *sets,
                               "--leak-kib", str(args.leak_kib)],
                              capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        if proc.returncode != 0:
            sys.exit(f"error: the viewer-{mode} run failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}")
        results[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
        r = results[mode]
        print(f"viewer {mode}: {r['steps']} steps in {r['seconds']} s, RSS {r['rss_mib_at_warmup']} MiB after warm-up, "
              f"max {r['rss_mib_max_after']} MiB (x{r['growth']}), last {r['rss_mib_last']} MiB; frames {r['frames_rendered']}", flush=True)
    summary = {"command": "bench_memory.py " + " ".join(sys.argv[1:]), "overrides": args.overrides, "limit": LIMIT, "modes": results,
               "flat": all(r["flat"] for r in results.values())}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(summary, indent=2))
    os.replace(tmp, out)
    print(f"flat within {LIMIT:.2f}x: {summary['flat']} -> {out}")


if __name__ == "__main__":
    main()
