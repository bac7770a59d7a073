"""Faults landed deterministically: SIGKILL inside a checkpoint write and inside the export, a full
disk (real ENOSPC from /dev/full) under the checkpoint and export writers, and memory that stays flat
over a few hundred steps. After each fault the run folder holds only whole files and `--resume`
ends where an uninterrupted run ends."""
import errno
import gc
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import tracemalloc
from pathlib import Path

import pytest
import torch

import steindreamer.fsio as fsio
from steindreamer.cli import main

from test_cli import FAST

STEPS = ["steps=10", "train.ckpt_every=2", "train.val_every=100"]  # keep_checkpoints=3 (default)
# One thread: tiny ops on two threads crawl when the cores are shared with other work.
ONE_THREAD = "train.threads=1"


@pytest.fixture(autouse=True)
def _restore_threads():
    """train.threads sets torch's process-wide thread count: give the other test files theirs back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _gen(model, out, *extra):
    return ["generate", "a red cube", "--out", str(out), f"model={model}", *FAST, "train.variance_every=0", ONE_THREAD, *extra]


def _resume(out, *extra):
    return ["generate", "a red cube", "--out", str(out), "--resume", "--quiet", *extra]


def _ckpts(out) -> list[str]:
    return sorted(p.name for p in (out / "checkpoints").glob("step_*.pt"))


def _all_load(out) -> dict:
    """Every checkpoint left in the folder is complete: name -> step stored in it."""
    return {p.name: torch.load(p, weights_only=True)["step"] for p in sorted((out / "checkpoints").glob("step_*.pt"))}


def _strays(out) -> list[Path]:
    return sorted(out.rglob(".*.tmp"))


def _metric_steps(out) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def _assert_matches_reference(out, ref):
    assert _ckpts(out) == ["step_0000006.pt", "step_0000008.pt", "step_0000010.pt"]  # the last K=3 only
    a = torch.load(ref / "checkpoints" / "step_0000010.pt", weights_only=True)
    b = torch.load(out / "checkpoints" / "step_0000010.pt", weights_only=True)
    assert b["step"] == 10
    for key in a["field"]:
        assert torch.allclose(a["field"][key], b["field"][key], atol=1e-6), key
    assert _metric_steps(out) == list(range(1, 11))
    assert json.loads((out / "result.json").read_text())["steps"] == 10
    for name in ("model.glb", "mesh.obj"):
        _assert_same_mesh(out / name, ref / name)
    assert not _strays(out)


def _assert_same_mesh(a: Path, b: Path):
    if a.read_bytes() == b.read_bytes():  # the usual case on CPU under one seed
        return
    import trimesh

    ma, mb = trimesh.load(a, force="mesh", process=False), trimesh.load(b, force="mesh", process=False)
    assert ma.faces.shape == mb.faces.shape and (ma.faces == mb.faces).all(), a.name
    assert abs(ma.vertices - mb.vertices).max() < 1e-4, a.name


@pytest.fixture(scope="module")
def reference(tiny_pixel_model, tmp_path_factory):
    """An uninterrupted 10-step run (checkpoints every 2 steps, keep 3)."""
    ref = tmp_path_factory.mktemp("reference") / "run"
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STEINDREAMER_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
        assert main(_gen(tiny_pixel_model, ref, *STEPS)) == 0
    torch.set_num_threads(threads)
    return ref


# --- SIGKILL at a chosen write ---------------------------------------------------------------------
# The child patches os.replace: when the atomic writer is about to move the temp file of TARGET into
# place, it cuts the temp file to half (the write got that far) and SIGKILLs itself.
KILLER = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    target, real = sys.argv[1], os.replace
    def replace(src, dst, *args, **kwargs):
        if Path(dst).name == target:
            data = Path(src).read_bytes()
            Path(src).write_bytes(data[: len(data) // 2])
            os.kill(os.getpid(), signal.SIGKILL)
        return real(src, dst, *args, **kwargs)
    os.replace = replace
    from steindreamer.cli import main
    sys.exit(main(sys.argv[2:]))
""")


def _killed_at(target: str, argv: list[str]) -> None:
    proc = subprocess.run([sys.executable, "-c", KILLER, target, *argv], capture_output=True, text=True, timeout=240,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]


def test_sigkill_during_checkpoint_write_then_resume(tiny_pixel_model, reference, tmp_path):
    out = tmp_path / "run"
    _killed_at("step_0000008.pt", _gen(tiny_pixel_model, out, *STEPS))
    # Killed between writing and renaming step 8: 2, 4, 6 all still there (old ones go only after
    # the new one is complete), each loads; the half-written temp file is not a checkpoint.
    assert _all_load(out) == {"step_0000002.pt": 2, "step_0000004.pt": 4, "step_0000006.pt": 6}
    stray = _strays(out)
    assert [p.name.startswith(".step_0000008.pt.") for p in stray] == [True]
    assert not (out / "model.glb").exists()
    assert main(_resume(out)) == 0
    _assert_matches_reference(out, reference)  # continued from step 6, each step logged once


# The same, but the temp file of TARGET is renamed into place first: killed between the rename and
# the pruning of older checkpoints.
RENAMED_KILLER = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    target, real = sys.argv[1], os.replace
    def replace(src, dst, *args, **kwargs):
        out = real(src, dst, *args, **kwargs)
        if Path(dst).name == target:
            os.kill(os.getpid(), signal.SIGKILL)
        return out
    os.replace = replace
    from steindreamer.cli import main
    sys.exit(main(sys.argv[2:]))
""")


def test_sigkill_between_the_last_checkpoint_and_its_pruning(tiny_pixel_model, reference, tmp_path):
    """Killed right after the final checkpoint's rename, before older ones were pruned: the stage is
    finished and saves nothing more, so the resume prunes when it starts (found by scripts/torture.py:
    the folder kept K + 1 checkpoints)."""
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-c", RENAMED_KILLER, "step_0000010.pt", *_gen(tiny_pixel_model, out, *STEPS)],
                          capture_output=True, text=True, timeout=240, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert _ckpts(out) == ["step_0000004.pt", "step_0000006.pt", "step_0000008.pt", "step_0000010.pt"]
    assert main(_resume(out)) == 0
    _assert_matches_reference(out, reference)


def test_sigkill_during_export_then_resume(reference, tmp_path):
    # A run that stopped after step 8 with an export from an earlier pass on disk.
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    (out / "checkpoints" / "step_0000010.pt").unlink()
    old = {name: (out / name).read_bytes() for name in ("model.glb", "mesh.obj", "mesh.png", "result.json")}
    _killed_at("model.glb", _resume(out))  # steps 9, 10 and their checkpoint, then killed in the GLB write
    assert _all_load(out) == {"step_0000006.pt": 6, "step_0000008.pt": 8, "step_0000010.pt": 10}
    assert [p.name.startswith(".model.glb.") for p in _strays(out)] == [True]
    assert {name: (out / name).read_bytes() for name in old} == old  # the previous export untouched
    assert main(_resume(out)) == 0  # nothing to train: exports again
    _assert_matches_reference(out, reference)


# --- a full disk ----------------------------------------------------------------------------------
@pytest.fixture
def disk_full(monkeypatch):
    """disk_full("name") makes the atomic writer's temp file for `name` a link to /dev/full, so every
    write to it fails with a real ENOSPC from the kernel, whatever library writes it. disk_full(None)
    clears the fault."""
    if not os.path.exists("/dev/full"):
        pytest.skip("needs /dev/full")
    target = {"name": None}
    real = tempfile.mkstemp

    def mkstemp(suffix=None, prefix=None, dir=None, text=False):
        fd, tmp = real(suffix, prefix, dir, text)
        if target["name"] and prefix == f".{target['name']}.":
            os.close(fd)
            os.unlink(tmp)
            os.symlink("/dev/full", tmp)
            fd = os.open(tmp, os.O_RDWR)
        return fd, tmp

    monkeypatch.setattr(fsio.tempfile, "mkstemp", mkstemp)
    return lambda name: target.__setitem__("name", name)


def _one_line_error(capsys, *words):
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith("error:") and all(w in err for w in words), err
    return err


def _snapshot(out, names):
    return {name: (out / name).read_bytes() for name in names}


def test_disk_full_during_checkpoint_and_export(tiny_pixel_model, reference, tmp_path, disk_full, capsys):
    out = tmp_path / "run"
    assert main(_gen(tiny_pixel_model, out, *STEPS[1:], "steps=8")) == 0
    capsys.readouterr()
    export = ["model.glb", "mesh.obj", "mesh.mtl", "mesh.png"]
    before = _snapshot(out, [f"checkpoints/{n}" for n in _ckpts(out)] + export)

    # 1. Full disk while writing the step-10 checkpoint: exit 1, one line naming the file, the
    #    previous checkpoints (all K of them) and the export unchanged, no temp file left.
    disk_full("step_0000010.pt")
    assert main(_resume(out, "steps=10")) == 1
    _one_line_error(capsys, "No space left on device", "step_0000010.pt", "--resume")
    assert _snapshot(out, before) == before and not _strays(out)
    assert _all_load(out) == {"step_0000004.pt": 4, "step_0000006.pt": 6, "step_0000008.pt": 8}

    # 2. Full disk while writing mesh.obj: OBJ, MTL and texture stay the old set (all or nothing).
    disk_full("mesh.obj")
    assert main(_resume(out)) == 1
    _one_line_error(capsys, "No space left on device", "mesh.obj")
    assert _snapshot(out, export[1:]) == {k: before[k] for k in export[1:]} and not _strays(out)
    assert _all_load(out) == {"step_0000006.pt": 6, "step_0000008.pt": 8, "step_0000010.pt": 10}

    # 3. `steindreamer export` on a full disk: the same one line, the GLB on disk untouched.
    glb = (out / "model.glb").read_bytes()
    disk_full("model.glb")
    assert main(["export", str(out)]) == 1
    _one_line_error(capsys, "No space left on device", "model.glb")
    assert (out / "model.glb").read_bytes() == glb and not _strays(out)

    # 4. Space again: --resume finishes, and the result is the uninterrupted run's.
    disk_full(None)
    assert main(_resume(out)) == 0
    _assert_matches_reference(out, reference)


def test_unwritable_file_mid_run_is_one_line(tiny_pixel_model, tmp_path, monkeypatch, capsys):
    """Any OSError from a write (read-only remount, quota, permission) is reported the same way."""
    out = tmp_path / "run"
    real = os.replace

    def read_only(src, dst, **kwargs):  # the folder went read-only before the rename
        if Path(dst).name == "step_0000002.pt":
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(src), None, str(dst))
        return real(src, dst, **kwargs)

    monkeypatch.setattr(fsio.os, "replace", read_only)
    assert main(_gen(tiny_pixel_model, out, "steps=2")) == 1
    _one_line_error(capsys, "Read-only file system", "step_0000002.pt")
    assert _ckpts(out) == [] and not _strays(out)


# --- memory over a long run -----------------------------------------------------------------------
def test_memory_flat_over_a_long_run(tiny_pixel_model, tmp_path):
    """200 SSD steps (LaggedJointMu, variance meter, checkpoints with the divergence guard's copy):
    from step 60 on, no tensor, no Python object and (traced, steps 100-199) no memory piles up,
    and every logged value is a plain Python number."""
    from steindreamer.config import load_config
    from steindreamer.pipeline import build_stages
    from steindreamer.runfolder import RunFolder
    from steindreamer.stages import run_stage

    overrides = [a for a in FAST if "=" in a] + [
        f"model={tiny_pixel_model}", ONE_THREAD, "engine=ssd", "guidance.ssd.baseline=constant", "steps=200", "resolution=8",
        "render.samples=8", "train.batch_size=1", "train.ckpt_every=50", "train.val_every=1000",
        "train.variance_every=10", "train.variance_draws=2"]
    cfg = load_config(None, None, overrides)
    seen = {"types": set()}

    def probe(stage, info):
        seen["types"] |= {type(v) for v in info.values()}
        step = stage.step_index
        if step not in (60, 100, 199):
            return
        gc.collect()
        objects = gc.get_objects()
        seen[step] = (sum(1 for o in objects if issubclass(type(o), torch.Tensor)), len(objects))
        del objects
        if step == 100:
            tracemalloc.start()
            seen["snapshot"] = tracemalloc.take_snapshot()
        elif step == 199:
            snapshot = tracemalloc.take_snapshot()
            tracemalloc.stop()
            ignore = [tracemalloc.Filter(False, tracemalloc.__file__)]
            diff = snapshot.filter_traces(ignore).compare_to(seen.pop("snapshot").filter_traces(ignore), "lineno")
            seen["grown"] = sum(d.size_diff for d in diff)
            seen["top"] = [str(d) for d in diff[:3]]
            mu = stage.ctx.distiller.mu.state_dict()
            seen["mu_graph"] = [k for k, v in mu.items() if torch.is_tensor(v) and (v.requires_grad or v.grad_fn is not None)]

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    try:
        result = run_stage(build_stages("a red cube", cfg)[1], RunFolder(run_dir), show_progress=False, callbacks=(probe,))
    finally:
        if tracemalloc.is_tracing():
            tracemalloc.stop()
    assert result["step"] == 200
    assert seen["types"] <= {int, float, bool, str}, seen["types"]  # no tensors in the logs
    assert not seen["mu_graph"]
    # Step 60: after the first checkpoint, so the guard's copy of the state includes Adam's moments.
    (t60, o60), (t100, o100), (t199, o199) = seen[60], seen[100], seen[199]
    assert t199 <= t60 + 4, (t60, t100, t199)
    assert o199 <= o60 + 100, (o60, o100, o199)
    assert seen["grown"] < 256 * 1024, seen["top"]  # measured ~50 KB of transient objects per 100 steps


def test_atomic_writes_get_ordinary_file_permissions(tmp_path):
    """mkstemp's temp files are 0600; finished outputs must be readable like any file the user makes."""
    from steindreamer import fsio

    target = tmp_path / "model.glb"
    fsio.atomic_write(target, b"glTF")
    assert target.read_bytes() == b"glTF"
    assert (target.stat().st_mode & 0o777) == 0o666 & ~fsio._UMASK
