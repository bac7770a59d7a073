"""Behaviour pinned across refactors: `generate "a red cube" --preset toy` (shortened) gives the same
checkpoint tensors (to 1e-6), the same per-step loss and t, and the same run-folder files as the
reference run in tests/data (taken with the code before the stage loop was rebuilt).

A change that is meant to alter training (a new default, a fixed bug on this path) regenerates the
reference with `python tests/test_reference_run.py --write` and says so in its commit."""
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from steindreamer.cli import main

DATA = Path(__file__).parent / "data"
REFERENCE = DATA / "red_cube_reference.json"
TENSORS = DATA / "red_cube_reference.safetensors"
DERIVED = ("edges", "face_pairs", "degree")  # rebuilt from the faces when a mesh is loaded


def run_reference(out: Path, command: list[str] | None = None) -> None:
    """The reference command (one thread: the fused kernels' sums depend on the thread count)."""
    threads = torch.get_num_threads()
    try:
        assert main([*(command or json.loads(REFERENCE.read_text())["command"]), "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)  # train.threads is process-wide: give the other tests theirs back


def final_tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    """The newest checkpoint of each stage, flattened to named tensors."""
    ckpts = Path(run_dir) / "checkpoints"
    nerf = torch.load(sorted(ckpts.glob("step_*.pt"))[-1], weights_only=True)
    mesh = torch.load(sorted(ckpts.glob("mesh_*.pt"))[-1], weights_only=True)
    out = {f"nerf.field.{k}": v for k, v in nerf["field"].items()}
    out.update({f"nerf.background.{k}": v for k, v in nerf["background"].items()})
    out.update({f"mesh.{k}": v for k, v in mesh["mesh"].items() if k.split(".")[-1] not in DERIVED})
    out["nerf.generator"], out["mesh.generator"] = nerf["generator"], mesh["generator"]
    return {k: v.contiguous().clone() for k, v in out.items()}


def run_summary(run_dir: Path) -> dict:
    run_dir = Path(run_dir)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {"files": sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.is_file()),
            "metrics": [{k: r[k] for k in ("step", "loss", "t", "stage") if k in r} for r in rows]}


def test_toy_red_cube_matches_the_reference_run(tmp_path):
    out = tmp_path / "run"
    run_reference(out)
    want, got = load_file(str(TENSORS)), final_tensors(out)
    assert sorted(got) == sorted(want)
    for name, ref in want.items():
        assert got[name].shape == ref.shape, name
        diff = (got[name].double() - ref.double()).abs().max().item() if ref.numel() else 0.0
        assert diff <= 1e-6, f"{name} differs from the reference run by {diff:.3g}"
    reference, summary = json.loads(REFERENCE.read_text()), run_summary(out)
    assert summary["files"] == reference["files"]
    # Every line now names its stage; the reference's NeRF lines did not.
    assert [(m["step"], m["t"], m.get("stage", "nerf")) for m in summary["metrics"]] == \
        [(m["step"], m["t"], m.get("stage", "nerf")) for m in reference["metrics"]]
    for got_row, ref_row in zip(summary["metrics"], reference["metrics"]):
        assert abs(got_row["loss"] - ref_row["loss"]) <= 1e-6 * max(1.0, abs(ref_row["loss"])), got_row


def test_the_comparison_fails_on_a_changed_run(tmp_path):
    """The check itself: a reference run with one more NeRF step is not the reference."""
    out = tmp_path / "run"
    command = json.loads(REFERENCE.read_text())["command"]
    run_reference(out, [("steps=25" if c == "steps=24" else c) for c in command])
    want, got = load_file(str(TENSORS)), final_tensors(out)
    assert max((got[k].double() - want[k].double()).abs().max().item() for k in want if want[k].is_floating_point()) > 1e-6


if __name__ == "__main__" and sys.argv[1:] == ["--write"]:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        run_reference(Path(tmp) / "run")
        save_file(final_tensors(Path(tmp) / "run"), str(TENSORS))
        summary = run_summary(Path(tmp) / "run")
        REFERENCE.write_text(json.dumps({"command": json.loads(REFERENCE.read_text())["command"], **summary}, indent=1))
    print(f"wrote {TENSORS} and {REFERENCE}")
