"""Kill a run at random moments, resume it each time, and compare the end with an uninterrupted run.

    python scripts/torture.py --kills 50 [--preset toy] [--seed 0] [--set key=value ...] [--out benchmarks/torture_toy.json]

Each round is one `generate` of the same prompt and seed in a fresh folder. The run is SIGKILLed again
and again, each time in a phase drawn in the run's order (start-up and model loading, the NeRF
stage, a checkpoint write, the mesh stage, the export, the turntable), then continued with
`--resume`; the last resume of a round runs to the end. After every kill each checkpoint left in the
folder must load (`torch.load(weights_only=True)`); at the end of a round the final NeRF and mesh
checkpoints must equal an uninterrupted run's (max tensor difference), metrics.jsonl must hold every
step exactly once, and model.glb must pass the Khronos validator (where node and tests/node_modules
have it) and match the uninterrupted run's mesh.

How a kill lands: the child runs the CLI under a tracer that marks each phase as it starts. For a
timed phase it arms a timer for a random fraction of that phase's length in the uninterrupted run
and SIGKILLs its own process when it fires (a real SIGKILL: no handler, no flush). For a checkpoint
write it kills inside the write: the temporary file cut at a random length before the rename, or just
after the rename, before older checkpoints are pruned. A resume "finished" when it exited 0, or
reached the next kill's phase (so it had loaded its checkpoints and gone on) and was killed there;
one that exits with an error counts as failed.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a red cube"
PHASES = ("start", "nerf", "checkpoint", "mesh", "export", "turntable")

# Runs the CLI with phase marks in $TORTURE_TRACE and, if $TORTURE_KILL names a phase, a SIGKILL in it.
TRACER = r"""
import os, signal, sys, threading, time
from pathlib import Path
trace, kill, delay, cut = os.environ["TORTURE_TRACE"], os.environ.get("TORTURE_KILL", ""), float(os.environ.get("TORTURE_DELAY", "0")), float(os.environ.get("TORTURE_CUT", "-1"))
t0 = time.monotonic()
def mark(phase):
    with open(trace, "a") as f:
        f.write(f"{time.monotonic() - t0:.4f} {phase}\n")
    if phase == kill and not kill.startswith("checkpoint"):  # a checkpoint kill is made inside the write, below
        threading.Timer(delay, lambda: (mark("kill"), os.kill(os.getpid(), signal.SIGKILL))).start()
mark("start")
import steindreamer.pipeline as P
def traced(phase, fn):
    def wrapper(*args, **kwargs):
        mark(phase)
        return fn(*args, **kwargs)
    return wrapper
real_run = P.run_stage
P.run_stage = lambda stage, *a, **k: traced(stage.name, real_run)(stage, *a, **k)
P.export_mesh = traced("export", P.export_mesh)
P.turntable_from_mesh = traced("turntable", P.turntable_from_mesh)
real_replace = os.replace
prefix = kill[len("checkpoint_"):] if kill.startswith("checkpoint_") else ""  # e.g. checkpoint_mesh_: that stage's only
def replace(src, dst, *args, **kwargs):
    name = Path(dst).name
    is_ckpt = name.endswith(".pt") and name.startswith(("step_", "mesh_")) and name.startswith(prefix) and kill.startswith("checkpoint")
    if is_ckpt and 0 <= cut < 1:
        data = Path(src).read_bytes()
        Path(src).write_bytes(data[: int(len(data) * cut)])
        mark("checkpoint")
        mark("kill")
        os.kill(os.getpid(), signal.SIGKILL)
    out = real_replace(src, dst, *args, **kwargs)
    if is_ckpt and cut >= 1:  # renamed, older ones not yet pruned
        mark("checkpoint")
        mark("kill")
        os.kill(os.getpid(), signal.SIGKILL)
    return out
os.replace = replace
from steindreamer.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _child(argv: list[str], trace: Path, kill: str = "", delay: float = 0.0, cut: float = -1.0, timeout: float = 1800) -> tuple[int, str]:
    env = {**os.environ, "TORTURE_TRACE": str(trace), "TORTURE_KILL": kill, "TORTURE_DELAY": f"{delay}", "TORTURE_CUT": f"{cut}",
           "PYTHONUNBUFFERED": "1"}
    trace.write_text("")
    proc = subprocess.run([sys.executable, "-c", TRACER, *argv], capture_output=True, text=True, env=env, timeout=timeout,
                          cwd=ROOT)
    return proc.returncode, proc.stderr[-1500:]


def _marks(trace: Path) -> list[tuple[float, str]]:
    return [(float(t), p) for t, p in (line.split() for line in trace.read_text().splitlines() if line.strip())]


def _phase_lengths(marks: list[tuple[float, str]], end: float) -> dict[str, float]:
    """Seconds from each phase's first mark to the next phase's (the last phase: to `end`)."""
    firsts = [(t, p) for i, (t, p) in enumerate(marks) if p not in [q for _, q in marks[:i]]]
    return {p: (firsts[i + 1][0] if i + 1 < len(firsts) else end) - t for i, (t, p) in enumerate(firsts)}


def _unreadable(run: Path) -> list[str]:
    bad = []
    for path in sorted((run / "checkpoints").glob("*.pt")):
        try:
            torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001 - any failure to load is what this counts
            bad.append(path.name)
    return bad


def _max_difference(a, b) -> float:
    """Largest absolute difference between two checkpoints' tensors (inf where their layout differs)."""
    if torch.is_tensor(a) and torch.is_tensor(b):
        if a.shape != b.shape:
            return float("inf")
        return 0.0 if a.numel() == 0 else float((a.double() - b.double()).abs().max())
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return float("inf")
        return max([_max_difference(a[k], b[k]) for k in a] or [0.0])
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return float("inf")
        return max([_max_difference(x, y) for x, y in zip(a, b)] or [0.0])
    return 0.0 if a == b else float("inf")


def _khronos(glb: Path) -> int | None:
    """The validator's error count, or None where node or the npm package is missing."""
    node, tests = shutil.which("node"), ROOT / "tests"
    if node is None or not (tests / "node_modules" / "gltf-validator").is_dir():
        return None
    proc = subprocess.run([node, str(tests / "gltf_validate.js"), str(glb)], capture_output=True, text=True, timeout=120)
    return json.loads(proc.stdout.strip().splitlines()[-1])["numErrors"]


def _mesh_difference(a: Path, b: Path) -> float:
    import trimesh

    if a.read_bytes() == b.read_bytes():
        return 0.0
    ma, mb = trimesh.load(a, force="mesh", process=False), trimesh.load(b, force="mesh", process=False)
    if ma.faces.shape != mb.faces.shape or (ma.faces != mb.faces).any():
        return float("inf")
    return float(abs(ma.vertices - mb.vertices).max())


def compare(run: Path, ref: Path) -> dict:
    """The finished round against the uninterrupted run."""
    names = sorted(p.name for p in (ref / "checkpoints").glob("*.pt"))
    same_names = names == sorted(p.name for p in (run / "checkpoints").glob("*.pt"))
    finals = [max((p for p in names if p.startswith(prefix)), default=None) for prefix in ("step_", "mesh_")]
    diff = 0.0 if same_names else float("inf")
    for name in filter(None, finals):
        if (run / "checkpoints" / name).exists():
            a = torch.load(ref / "checkpoints" / name, map_location="cpu", weights_only=True)
            b = torch.load(run / "checkpoints" / name, map_location="cpu", weights_only=True)
            diff = max(diff, _max_difference(a, b))
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    expected = [json.loads(line)["step"] for line in (ref / "metrics.jsonl").read_text().splitlines()]
    glb = run / "model.glb"
    return {"checkpoint_names_match": same_names, "max_tensor_difference": diff, "metrics_steps_match": steps == expected,
            "glb_errors": _khronos(glb) if glb.exists() else -1,
            "glb_vertex_difference": _mesh_difference(glb, ref / "model.glb") if glb.exists() else float("inf"),
            "strays": [str(p.relative_to(run)) for p in run.rglob(".*.tmp")]}


def _order(phase: str) -> int:
    """Where a phase comes in a run; a checkpoint write can come until the mesh stage ends."""
    return {"start": 0, "nerf": 1, "checkpoint": 1, "mesh": 1, "export": 2, "turntable": 3}.get(phase, 0)


def round_plan(rng: random.Random, left: int) -> list[str]:
    """Kill phases for one round, in the run's order (at most `left`)."""
    counts = {"start": rng.randint(0, 1), "nerf": rng.randint(1, 3), "checkpoint": rng.randint(1, 2), "mesh": rng.randint(1, 2),
              "export": 1, "turntable": 1}
    plan = [p for p in ("start", "nerf", "checkpoint", "mesh") for _ in range(counts[p])]
    plan.insert(rng.randint(plan.index("mesh"), len(plan)), "checkpoint")  # one more among the mesh stage's writes
    return (plan + ["export", "turntable"])[:left]


# --- a batch killed mid-way ------------------------------------------------------------------------
POISON = [  # (prompt, overrides): each must fail alone, with a one-line reason
    ("a zorblax", {}), ("a red dodecahedron", {}), ("a blue cube zorblax", {}), ("a purple flurb", {}),
    ("a red cube", {"model": "/nonexistent/model"}), ("a red cube", {"model": "/etc/hostname"}),
    ("a red cube", {"model": "org/missing-model"}), ("a red cube", {"engine": "ssd", "depth_model": "org/missing-depth"}),
    ("a red cube", {"render.backend": "nerfacc"}), ("a red cube", {"train.device": "cuda"}),
]


def _ledger(folder: Path) -> dict:
    import contextlib
    import sqlite3

    with contextlib.closing(sqlite3.connect(f"file:{folder / 'ledger.sqlite'}?mode=ro", uri=True, timeout=30)) as db:
        db.row_factory = sqlite3.Row
        return {(r["prompt"], r["seed"]): dict(r) for r in db.execute("SELECT * FROM items")}


def torture_batch(work: Path, size: int, poisoned: int, driver_kills: int, overrides: list[str], rng: random.Random) -> dict:
    """`batch` over `size` prompts (`poisoned` of them bad), its driver SIGKILLed `driver_kills` times
    while an item runs, re-run each time with the same command until it ends."""
    from steindreamer.toy.world import COLOURS, SHAPES

    good = [(f"a {c} {s}", seed) for seed in range(size) for c in COLOURS for s in SHAPES][: size - poisoned]
    lines = [{"prompt": p, "seed": seed} for p, seed in good]
    lines += [{"prompt": p, "seed": 1000 + i, "overrides": o} for i, (p, o) in enumerate(POISON[:poisoned])]
    rng.shuffle(lines)
    prompts = work / "batch_prompts.jsonl"
    prompts.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = work / "batch"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "steindreamer", "batch", str(prompts), "--preset", "toy", "--out", str(out), "--quiet", *overrides]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    targets = sorted(rng.sample(range(1, size - 1), driver_kills))  # kill once this many items have ended
    finished_files: dict[tuple, int] = {}  # done items' result.json mtime when first seen done
    kills, redone = [], []
    start = time.perf_counter()
    for target in [*targets, None]:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=ROOT)
        if target is None:
            code = proc.wait()
            break
        while True:
            time.sleep(0.2)
            rows = _ledger(out) if (out / "ledger.sqlite").exists() else {}
            ended = sum(r["status"] in ("done", "failed") for r in rows.values())
            running = [k for k, r in rows.items() if r["status"] == "running"]
            if proc.poll() is not None:
                break
            if ended >= target and running:
                time.sleep(rng.uniform(0.5, 3.0))  # into the running item
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
                kills.append({"after_items_ended": ended, "running": list(running[0])})
                print(f"batch driver killed with {ended} items ended, '{running[0][0]}' (seed {running[0][1]}) running", flush=True)
                break
        time.sleep(1.0)  # the killed driver's child dies with it (its process group / parent-death signal)
        for key, row in _ledger(out).items():
            if row["status"] == "done":
                mtime = (out / row["run_dir"] / "result.json").stat().st_mtime_ns
                if finished_files.setdefault(key, mtime) != mtime:
                    redone.append(list(key))
    rows = _ledger(out)
    for key, row in rows.items():
        if key in finished_files and (out / row["run_dir"] / "result.json").stat().st_mtime_ns != finished_files[key]:
            redone.append(list(key))
    failed = {k: r for k, r in rows.items() if r["status"] == "failed"}
    poisoned_keys = {(line["prompt"], line["seed"]) for line in lines if "overrides" in line or line["prompt"] not in dict(good)}
    reasons = [r["error"] or "" for r in failed.values()]
    return {
        "items": len(rows), "done": sum(r["status"] == "done" for r in rows.values()), "failed": len(failed),
        "failed_are_the_poisoned": set(failed) == poisoned_keys,
        "one_line_reasons": all(x.startswith("error: ") and "\n" not in x for x in reasons),
        "reasons": sorted(reasons), "driver_kills": kills, "redone": redone, "final_exit": code,
        "interrupted_items_resumed": [list(k) for k, r in rows.items() if r["attempts"] > 1 and r["status"] == "done"],
        "attempts_of_done_items": sorted({r["attempts"] for r in rows.values() if r["status"] == "done"}),
        "seconds": round(time.perf_counter() - start, 1),
    }


def torture_runs(work: Path, kills_wanted: int, preset: str, seed: int, overrides: list[str], rng: random.Random, keep: bool) -> dict:
    """Rounds of kills and resumes of one `generate` (see the module's docstring) against an
    uninterrupted run of the same seed."""
    first = ["generate", PROMPT, "--preset", preset, "--quiet", f"seed={seed}", *overrides]
    ref = work / "reference"
    shutil.rmtree(ref, ignore_errors=True)
    t = time.perf_counter()
    code, err = _child([*first, "--out", str(ref)], work / "trace_ref")
    if code != 0:
        sys.exit(f"error: the uninterrupted run failed ({code}): {err.strip().splitlines()[-1] if err.strip() else ''}")
    ref_seconds = time.perf_counter() - t
    marks = _marks(work / "trace_ref")
    lengths = _phase_lengths(marks, ref_seconds)
    print(f"uninterrupted run: {ref_seconds:.1f} s; phases {', '.join(f'{p} {s:.1f} s' for p, s in lengths.items())}", flush=True)

    events, rounds = [], []
    kills = resumes = finished = failed = 0
    unreadable: list[str] = []
    while kills < kills_wanted:
        run = work / f"round_{len(rounds):02d}"
        shutil.rmtree(run, ignore_errors=True)
        plan = round_plan(rng, kills_wanted - kills)
        reached = 0  # the furthest phase a kill landed in (ORDER): earlier targets cannot come again
        launched = 0
        for phase in [*plan, ""]:  # "": the last resume runs to the end
            if phase and _order(phase) < reached:
                continue
            # Resumes name the preset and overrides too, as batch does: a run killed before its
            # config.yaml was written has nothing else to go on.
            argv = [*first, "--out", str(run), *(["--resume"] if launched else [])]
            delay = rng.uniform(0.0, lengths.get(phase, 0.0)) if phase not in ("checkpoint", "") else 0.0
            cut = rng.choice([rng.random(), 1.0]) if phase == "checkpoint" else -1.0
            code, err = _child(argv, work / "trace", phase, delay, cut)
            seen = _marks(work / "trace")
            killed_in = next((p for _, p in reversed(seen[:-1]) if p != "kill"), None) if seen and seen[-1][1] == "kill" else None
            resumes += launched > 0
            launched += 1
            if code == -signal.SIGKILL:
                kills += 1
                reached = max(reached, _order(killed_in or "start"))
                finished += launched > 1  # this resume went on until the next kill's phase
                bad = _unreadable(run)
                unreadable += [f"{run.name}/{b}" for b in bad]
                events.append({"round": len(rounds), "target": phase, "killed_in": killed_in, "delay_s": round(delay, 3),
                               "cut": None if cut < 0 else round(cut, 3), "unreadable": bad})
                print(f"kill {kills}/{kills_wanted}: round {len(rounds)}, {killed_in} (target {phase}"
                      f"{f', cut {cut:.2f}' if cut >= 0 else f', after {delay:.2f} s'}); checkpoints readable: {not bad}", flush=True)
                continue
            if code == 0:
                finished += launched > 1
            else:
                failed += 1
                events.append({"round": len(rounds), "target": phase, "error": f"exit {code}: {err.strip().splitlines()[-1] if err.strip() else ''}"})
                print(f"resume failed (exit {code}): {err.strip()[-300:]}", flush=True)
            break  # the run ended (finished, failed, or the plan's phase never came)
        result = compare(run, ref) if (run / "result.json").exists() else {"finished": False}
        rounds.append({"round": len(rounds), "plan": plan, **result})
        print(f"round {len(rounds) - 1}: {json.dumps(result)}", flush=True)
        if not keep:
            shutil.rmtree(run, ignore_errors=True)

    by_phase = {p: sum(e.get("killed_in") == p for e in events) for p in PHASES}
    diffs = [r.get("max_tensor_difference", float("inf")) for r in rounds]
    summary = {
        "kills": kills, "kills_by_phase": by_phase, "resumes": resumes, "resumes_finished": finished, "resumes_failed": failed,
        "unreadable_checkpoints": len(unreadable), "unreadable": unreadable, "rounds": len(rounds),
        "rounds_matching": sum(r.get("max_tensor_difference", float("inf")) <= 1e-6 and r.get("metrics_steps_match", False)
                               and r.get("checkpoint_names_match", False) and r.get("glb_errors") in (0, None) for r in rounds),
        "max_tensor_difference": max(diffs) if diffs else None,
        "glb_errors": [r.get("glb_errors") for r in rounds],
        "uninterrupted_seconds": round(ref_seconds, 1), "phase_seconds": {p: round(s, 2) for p, s in lengths.items()},
        "per_round": rounds, "events": events,
    }
    print(f"{kills} kills ({', '.join(f'{p} {n}' for p, n in by_phase.items())}), {finished}/{resumes} resumes finished, "
          f"{failed} failed, {len(unreadable)} unreadable checkpoints, {summary['rounds_matching']}/{len(rounds)} rounds equal "
          f"the uninterrupted run (max tensor difference {summary['max_tensor_difference']})", flush=True)
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=50, help="SIGKILLs of single runs (0: none)")
    ap.add_argument("--preset", default="toy")
    ap.add_argument("--seed", type=int, default=0, help="the runs' seed and the kills' random draws")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="key=value", help="config overrides for every run")
    ap.add_argument("--batch", type=int, default=0, help="also a batch of this many toy prompts (0: none)")
    ap.add_argument("--poisoned", type=int, default=10, help=f"of which bad (at most {len(POISON)})")
    ap.add_argument("--driver-kills", type=int, default=2, help="SIGKILLs of the batch driver")
    ap.add_argument("--batch-set", dest="batch_overrides", action="append", default=[], metavar="key=value",
                    help="overrides for every batch item")
    ap.add_argument("--work", default="", help="run folders go here (default: a temporary folder, removed)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "torture_toy.json"))
    args = ap.parse_args()
    if args.kills < 0 or (args.kills == 0 and args.batch == 0):
        ap.error("--kills must be >= 1, or 0 with --batch")
    if args.batch and not (0 <= args.poisoned <= min(len(POISON), args.batch - 2) and 0 <= args.driver_kills <= args.batch - 2):
        ap.error(f"--poisoned must be in [0, {len(POISON)}] and leave 2 good items; --driver-kills at most --batch - 2")

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="torture_"))
    work.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    start = time.perf_counter()
    summary = {"command": "torture.py " + " ".join(sys.argv[1:]), "preset": args.preset, "seed": args.seed,
               "overrides": args.overrides}
    if args.kills:
        summary.update(torture_runs(work, args.kills, args.preset, args.seed, args.overrides, rng, keep=bool(args.work)))
    if args.batch:
        summary["batch"] = torture_batch(work, args.batch, args.poisoned, args.driver_kills, args.batch_overrides, rng)
        print(f"batch: {json.dumps({k: v for k, v in summary['batch'].items() if k != 'reasons'})}", flush=True)
    summary["seconds"] = round(time.perf_counter() - start, 1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(summary, indent=2, default=str))
    os.replace(tmp, out)
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    print(f"-> {out}")


if __name__ == "__main__":
    main()
