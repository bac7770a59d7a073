"""Both stages and export through the CLI: the mesh stage refines the extracted surface, `generate`
ends with model.glb, mesh.obj and turntable.mp4; `export` and `render` work from checkpoints."""
import json

import imageio.v3 as iio
import pytest
import torch
import trimesh

from steindreamer.cli import main

from test_cli import FAST

MESH = ["mesh.enabled=true", "mesh.steps=2", "mesh.resolution=16", "mesh.ckpt_every=1", "export.turntable=true",
        "export.turntable_frames=3", "export.turntable_size=16"]


@pytest.fixture(scope="module")
def run(tiny_latent_model, tmp_path_factory):
    """One `generate` with both stages, shared by the tests below."""
    out = tmp_path_factory.mktemp("mesh-stage") / "run"
    assert main(["generate", "a red cube", "--out", str(out), f"model={tiny_latent_model}", "steps=2", *FAST, *MESH]) == 0
    return out


def test_generated_glb_passes_the_khronos_validator(khronos, run):
    assert khronos(run / "model.glb")["numErrors"] == 0


def test_generate_both_stages_export_and_turntable(run):
    out = run
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert "mesh_0000002.pt" in ckpts and "step_0000002.pt" in ckpts
    result = json.loads((out / "result.json").read_text())
    assert result["mesh"]["faces"] > 100 and {"model.glb", "mesh.obj", "mesh.mtl", "mesh.png", "turntable.mp4"} <= set(result["files"])
    glb = trimesh.load(out / "model.glb", force="mesh")
    assert len(glb.faces) == result["mesh"]["faces"]
    assert glb.visual.material.baseColorTexture is not None
    frames = [f for f in iio.imiter(out / "turntable.mp4")]
    assert len(frames) == 3

    # The mesh stage moved the vertices away from the extracted surface (offsets are learned).
    state = torch.load(out / "checkpoints" / "mesh_0000002.pt", weights_only=True)["mesh"]
    assert state["offsets"].abs().max() > 0

    # export and render from the checkpoints.
    (out / "model.glb").unlink()
    assert main(["export", str(out), "--format", "glb", "--format", "ply"]) == 0
    assert (out / "model.glb").exists() and (out / "mesh.ply").exists()
    assert len(trimesh.load(out / "mesh.ply").faces) == result["mesh"]["faces"]
    assert main(["render", str(out), "--stage", "nerf", "--frames", "2", "--size", "16"]) == 0
    assert len(list(iio.imiter(out / "turntable.mp4"))) == 2
    assert (out / "renders" / "contact_sheet.png").exists()


def test_export_and_render_bad_input(tmp_path, capsys):
    assert main(["export", str(tmp_path / "missing")]) == 2
    assert "run folder not found" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["render", str(tmp_path / "empty")]) == 2
    assert "not a run folder" in capsys.readouterr().err
    assert main(["export", str(tmp_path), "--format", "fbx"]) == 2
