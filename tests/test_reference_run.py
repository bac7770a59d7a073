"""Behaviour pinned across refactors: `generate "a red cube" --preset toy` (shortened) gives the same
checkpoint tensors, the same per-step loss and t, and the same run-folder files as the reference run
in tests/data.

Bitwise equality holds on one CPU only: torch's CPU kernels and our C kernels sum in an order that
depends on the instruction set, and the mesh extracted from a slightly different field has other
face indices. So the tensors are compared with tolerances well below what one more training step
changes, and the mesh by its geometry. Measured with the toy preset (grid learning rate 0.04), AVX2
against AVX-512 (in brackets: the pure-PyTorch backend against the C kernels) and one more NeRF
step: hash-table entries that moved more than 2e-3, 0.06 % (0.15 %) against 63 % (a few entries by
up to 3e-2 across CPUs: Adam's normalised step); NeRF MLP weights 6e-6 (5e-5) against 1e-3;
occupancy densities 6e-5 of their largest value; the mesh's vertices, as point sets, 3e-4 (1.6e-3)
Chamfer against 1.2e-2; the texture MLP 7e-6 (2.5e-4), and 9e-5 for one more mesh step, whose RNG
state and losses show it.

A change that is meant to alter training (a new default, a fixed bug on this path) regenerates the
reference with `python tests/test_reference_run.py --write` and says so in its commit."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from steindreamer.cli import main

DATA = Path(__file__).parent / "data"
REFERENCE = DATA / "red_cube_reference.json"
TENSORS = DATA / "red_cube_reference.safetensors"
DERIVED = ("edges", "face_pairs", "degree")  # rebuilt from the faces when a mesh is loaded
# Largest allowed |difference| per tensor group (see the module's docstring for the measurements);
# the occupancy grids' densities relative to their largest value.
TOLERANCE = {"nerf.field.occupancy.": 1e-3, "nerf.": 1e-4, "mesh.texture_field.field.net.": 3e-4,
             "mesh.texture_field.field.occupancy.": 1e-3}
RELATIVE = ("nerf.field.occupancy.", "mesh.texture_field.field.occupancy.")
# The hash table by the share of its entries that moved more than TABLE_ATOL: Adam turns a gradient
# that is 0 on one CPU and 1e-12 on another into a whole step for that entry, so a few entries may
# differ by a learning rate while the rest agree.
TABLE, TABLE_ATOL, TABLE_SHARE = "nerf.field.encoding.table", 2e-3, 0.01
MESH_CHAMFER = 4e-3  # vertices of the final mesh (base + offsets), both directions' mean
LOSS_RTOL = {"nerf": 1e-4, "mesh": 2e-2}  # the mesh stage starts from a re-extracted mesh


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


def _chamfer(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.spatial import cKDTree

    return 0.5 * float(cKDTree(a).query(b)[0].mean() + cKDTree(b).query(a)[0].mean())


def differences(run_dir: Path) -> list[str]:
    """What in the run at `run_dir` is not the reference run, one line each (empty: the same run)."""
    want, got = load_file(str(TENSORS)), final_tensors(run_dir)
    if sorted(got) != sorted(want):
        return [f"tensors {sorted(set(got) ^ set(want))} are in one run only"]
    out = []
    for name, ref in want.items():
        if name.endswith("generator"):  # RNG states: the same draws, exactly
            same = torch.equal(got[name], ref)
        elif name in ("mesh.base_vertices", "mesh.offsets", "mesh.faces"):
            same = got[name].shape == ref.shape  # the geometry is compared as a point set below
        elif name.startswith("mesh.texture_field.field.encoding"):
            same = got[name].shape == ref.shape  # a hash table fed by a re-extracted mesh's texels
        elif name == TABLE:
            same = got[name].shape == ref.shape and \
                ((got[name].double() - ref.double()).abs() > TABLE_ATOL).double().mean().item() <= TABLE_SHARE
        else:
            tol = next(v for k, v in TOLERANCE.items() if name.startswith(k))
            if name.startswith(RELATIVE) and ref.numel():
                tol *= ref.double().abs().max().item()
            same = got[name].shape == ref.shape and (not ref.numel() or
                                                     (got[name].double() - ref.double()).abs().max().item() <= tol)
        if not same:
            out.append(f"{name} differs from the reference run")
    surface = [(t["mesh.base_vertices"] + t["mesh.offsets"]).double().numpy() for t in (got, want)]
    if _chamfer(*surface) > MESH_CHAMFER:
        out.append(f"the final mesh is {_chamfer(*surface):.3g} (Chamfer) from the reference's")
    reference, summary = json.loads(REFERENCE.read_text()), run_summary(run_dir)
    if summary["files"] != reference["files"]:
        out.append(f"run-folder files differ: {sorted(set(summary['files']) ^ set(reference['files']))}")
    steps = lambda rows: [(m["step"], m["t"], m.get("stage", "nerf")) for m in rows]  # noqa: E731
    if steps(summary["metrics"]) != steps(reference["metrics"]):
        out.append("the steps, their t or their stages differ")
    else:
        for g, r in zip(summary["metrics"], reference["metrics"]):
            if abs(g["loss"] - r["loss"]) > LOSS_RTOL[r.get("stage", "nerf")] * max(1.0, abs(r["loss"])):
                out.append(f"step {g['step']}'s loss {g['loss']:.6g} is not the reference's {r['loss']:.6g}")
    return out


def test_toy_red_cube_matches_the_reference_run(tmp_path):
    out = tmp_path / "run"
    run_reference(out)
    assert differences(out) == []


@pytest.mark.parametrize("change", ["steps=25", "mesh.steps=7"])
def test_the_comparison_fails_on_a_changed_run(tmp_path, change):
    """The check itself: a reference run with one more NeRF or mesh step is not the reference, and
    the comparison says so for the tensors it changed, not only for the step count."""
    out = tmp_path / "run"
    key = change.split("=")[0] + "="
    command = json.loads(REFERENCE.read_text())["command"]
    run_reference(out, [change if c.startswith(key) else c for c in command])
    found = differences(out)
    assert any("differs from the reference run" in line or "Chamfer" in line for line in found), found
if __name__ == "__main__" and sys.argv[1:] == ["--write"]:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        run_reference(Path(tmp) / "run")
        save_file(final_tensors(Path(tmp) / "run"), str(TENSORS))
        summary = run_summary(Path(tmp) / "run")
        REFERENCE.write_text(json.dumps({"command": json.loads(REFERENCE.read_text())["command"], **summary}, indent=1))
    print(f"wrote {TENSORS} and {REFERENCE}")
