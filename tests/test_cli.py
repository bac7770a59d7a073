"""End to end through the CLI on tiny random pipelines."""
import json
import subprocess
import sys

import pytest
import torch

from steindreamer.cli import main

FAST = ["engine=sds", "resolution=16", "render.samples=16", "field.grid.levels=4", "field.grid.log2_table=12", "field.grid.max_res=64",
        "train.val_every=2", "train.ckpt_every=2", "train.val_views=2", "mesh.enabled=false", "mesh.grid_resolution=32",
        "export.texture_size=32", "export.turntable=false", "--quiet"]


def _run(model, out, *extra):
    return main(["generate", "a red cube", "--out", str(out), f"model={model}", *FAST, *extra])


def test_generate_writes_checkpoint_renders_metrics_and_resumes(tiny_latent_model, tmp_path):
    out = tmp_path / "run"
    assert _run(tiny_latent_model, out, "steps=4") == 0
    assert (out / "config.yaml").exists()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_0000002.pt", "step_0000004.pt"]
    assert (out / "model.glb").exists() and (out / "mesh.obj").exists()  # the NeRF's surface, exported
    assert (out / "renders" / "val_0000004.png").exists()
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3, 4]
    assert all({"loss", "seconds", "t"} <= set(m) for m in lines)
    state = torch.load(out / "checkpoints" / "step_0000004.pt", weights_only=True)
    assert state["step"] == 4

    # --resume continues from step 4 to 6 with the run's own config.
    assert main(["generate", "a red cube", "--out", str(out), "--resume", "steps=6", "--quiet"]) == 0
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3, 4, 5, 6]
    assert torch.load(out / "checkpoints" / "step_0000006.pt", weights_only=True)["step"] == 6


@pytest.mark.parametrize("sampling", [[], ["camera.sampling=sequence", "guidance.noise.t_sampling=sequence"]], ids=["iid", "sequence"])
def test_resume_equals_uninterrupted_run(tiny_pixel_model, tmp_path, sampling):
    a, b = tmp_path / "a", tmp_path / "b"
    assert _run(tiny_pixel_model, a, "steps=4", *sampling) == 0
    assert _run(tiny_pixel_model, b, "steps=2", *sampling) == 0
    assert main(["generate", "a red cube", "--out", str(b), "--resume", "steps=4", "--quiet"]) == 0
    sa = torch.load(a / "checkpoints" / "step_0000004.pt", weights_only=True)["field"]
    sb = torch.load(b / "checkpoints" / "step_0000004.pt", weights_only=True)["field"]
    for key in sa:
        assert torch.allclose(sa[key], sb[key], atol=1e-6), key


@pytest.mark.parametrize("args, message", [
    (["generate", "   "], "prompt is empty"),
    (["generate", "a cube", "steps=-3"], "train.steps"),
    (["generate", "a cube", "resolution=30"], "render.resolution"),
    (["generate", "a cube", "guidance.t_min=0.8", "guidance.t_max=0.2"], "t_min"),
    (["generate", "a cube", "engine=magic"], "guidance.engine"),
    (["generate", "a cube", "no.such.key=1"], "no"),
    (["generate", "a cube", "--preset", "nope"], "unknown preset"),
    (["generate", "a cube", "--config", "/nonexistent/x.yaml"], "config file not found"),
    (["generate", "a cube", "model=/nonexistent/model"], "model folder not found"),
])
def test_bad_input_is_one_line_and_status_2(args, message, capsys, tmp_path):
    assert main([*args, "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and message in err and "\n" not in err


def test_unwritable_output_and_existing_run(tiny_latent_model, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert _run(tiny_latent_model, blocker / "sub", "steps=1") == 2
    assert "cannot write" in capsys.readouterr().err
    out = tmp_path / "run"
    assert _run(tiny_latent_model, out, "steps=1") == 0
    before = (out / "checkpoints" / "step_0000001.pt").read_bytes()
    assert _run(tiny_latent_model, out, "steps=1") == 2  # exists: not overwritten without --overwrite
    assert "already exists" in capsys.readouterr().err
    assert (out / "checkpoints" / "step_0000001.pt").read_bytes() == before


def test_console_entry_exit_status_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "steindreamer", "generate", "", "--out", str(tmp_path / "r")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stderr.strip() == "error: the prompt is empty"
    proc = subprocess.run([sys.executable, "-m", "steindreamer", "generate", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "key=value" in proc.stdout
