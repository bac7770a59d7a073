"""The stage loop and the run folder: bugs of the two drifted loops pinned through the public entry
points (the CLI, `pipeline.build_stages`, `stages.run_stage`)."""
import json

import pytest
import torch

from steindreamer.cli import main
from steindreamer.config import load_config
from steindreamer.pipeline import build_stages
from steindreamer.runfolder import RunFolder, fingerprint
from steindreamer.stages import MeshStage, run_stage

from test_cli import FAST

ONE_THREAD = "train.threads=1"
SETTINGS = [o for o in FAST if "=" in o]


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _cfg(model, *extra):
    return load_config(None, None, [f"model={model}", *SETTINGS, "train.variance_every=0", *extra])


def _paint(field, rgb_logits=(12.0, -12.0, -12.0)):
    """Colour head outputs one colour everywhere (pure red by default); density unchanged."""
    last = field.net[-1]
    with torch.no_grad():
        last.weight[1:].zero_()
        last.bias[1:].copy_(torch.tensor(rgb_logits))


def test_refused_prompt_writes_nothing_and_the_corrected_one_runs(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["generate", "--preset", "toy", "--out", str(out), "--quiet", "steps=1", "mesh.enabled=false",
            "export.turntable=false", "export.texture_size=32"]
    assert main([args[0], "a red banana", *args[1:]]) == 2
    err = capsys.readouterr().err.strip()
    assert "'banana'" in err and "\n" not in err
    assert not out.exists()  # no config.yaml or prompt.txt left behind to block the rerun
    assert main([args[0], " A  Red Cube. ", *args[1:]]) == 0  # as a person types it
    assert (out / "prompt.txt").read_text() == "a red cube\n"  # in the model's words


def test_textureless_mesh_step_renders_white_shading(tiny_latent_model):
    """The mesh stage shades with render.shading.shade, like the NeRF stage: textureless is
    white albedo (grey levels), lambertian keeps the albedo's colour."""
    shaded = ["shading.albedo_steps=0", "shading.lambertian_p=1", "shading.light=fixed", "shading.ambient=0.2",
              "mesh.resolution=32", "background.kind=white"]
    images = {}
    for mode, p in (("textureless", 1.0), ("lambertian", 0.0)):
        ctx, nerf = build_stages("a red cube", _cfg(tiny_latent_model, *shaded, f"shading.textureless_p={p}"))
        _paint(nerf.field)
        mesh = MeshStage(ctx, nerf.field)
        out, _ = mesh.render_train()
        covered = out["opacity"][..., 0] > 0.5
        assert covered.sum() > 20
        images[mode] = out["rgb"][covered]
    grey = images["textureless"]
    assert torch.allclose(grey[:, 0], grey[:, 1]) and torch.allclose(grey[:, 1], grey[:, 2])  # no colour at all
    assert grey.min() >= 0.2 - 1e-6 and grey.max() > 0.5  # ambient up to lit: the shading shows
    red = images["lambertian"]
    assert (red[:, 0] > 0.15).all() and red[:, 1:].max() < 1e-3  # red albedo, shaded


def test_learning_rate_after_two_restores_is_factor_squared(tiny_latent_model, tmp_path):
    """Two divergences, a checkpoint (with the lowered rate) remembered between them: the rate is
    lr * factor**2 after the second restore, not compounded, and the log says so."""
    cfg = _cfg(tiny_latent_model, "steps=6", "train.ckpt_every=1", "train.nan_patience=1", "train.max_restores=3",
               "train.restore_lr_factor=0.5")
    ctx, nerf = build_stages("a red cube", cfg)
    base = [g["lr"] for g in nerf.optimizer.param_groups]

    def poison(stage, info):
        if stage.step_index in (1, 3):  # the next step sees NaN parameters and is skipped
            with torch.no_grad():
                stage.field.net[-1].bias.fill_(float("nan"))

    run_stage(nerf, RunFolder(tmp_path), callbacks=(poison,), show_progress=False)
    assert [g["lr"] for g in nerf.optimizer.param_groups] == pytest.approx([lr * 0.25 for lr in base])
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    notes = [r["recovery"] for r in rows if "recovery" in r]
    assert len(notes) == 2 and notes[0].endswith("x0.5") and notes[1].endswith("x0.25"), notes
    assert all(torch.isfinite(p).all() for p in nerf.field.parameters())


def test_mesh_stage_resume_after_a_lost_checkpoint_continues_identically(tiny_pixel_model, tmp_path):
    """Killed in the mesh stage after a step's metrics line but before its checkpoint: --resume
    continues from the last mesh checkpoint, logs each step once, ends where an uninterrupted run
    ends."""
    mesh = ["mesh.enabled=true", "mesh.resolution=16", "mesh.ckpt_every=2", "mesh.target_faces=500", ONE_THREAD]
    base = ["generate", "a red cube", f"model={tiny_pixel_model}", *FAST, "train.variance_every=0", "steps=2", *mesh]
    a, b = tmp_path / "a", tmp_path / "b"
    assert main([*base, "--out", str(a), "mesh.steps=4"]) == 0
    assert main([*base, "--out", str(b), "mesh.steps=3"]) == 0
    (b / "checkpoints" / "mesh_0000003.pt").unlink()  # the kill came before step 3's checkpoint
    assert main(["generate", "a red cube", "--out", str(b), "--resume", "--quiet", "mesh.steps=4"]) == 0
    rows = [json.loads(line) for line in (b / "metrics.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["step"]) for r in rows] == [("nerf", 1), ("nerf", 2)] + [("mesh", s) for s in range(3, 7)]
    sa = torch.load(a / "checkpoints" / "mesh_0000004.pt", weights_only=True)
    sb = torch.load(b / "checkpoints" / "mesh_0000004.pt", weights_only=True)
    for key, value in sa["mesh"].items():
        assert torch.allclose(value.float(), sb["mesh"][key].float(), atol=1e-6), key
    assert torch.equal(sa["generator"], sb["generator"])


def test_mesh_preview_shows_the_mesh(tiny_latent_model):
    """What the live viewer draws during the mesh stage: the mesh, in its texture's colour."""
    from steindreamer.cameras import orbit_cameras

    ctx, nerf = build_stages("a red cube", _cfg(tiny_latent_model, "background.kind=white"))
    _paint(nerf.field)
    image = MeshStage(ctx, nerf.field).preview(orbit_cameras(1, distance=2.0), 24, 40)
    assert image.shape == (24, 40, 3) and image.dtype.name == "uint8"
    red = (image[..., 0] > 200) & (image[..., 1] < 60)
    assert red[10:14, 18:22].all() and not red[:, :3].any()  # the middle is the mesh, the edge background


def test_fingerprint_ignores_only_the_resumable_fields(tiny_latent_model):
    cfg = _cfg(tiny_latent_model)
    same = _cfg(tiny_latent_model, "steps=999", "train.ckpt_every=7", "mesh.steps=5", "train.device=cpu")
    other = _cfg(tiny_latent_model, "train.lr_grid=0.5")
    assert fingerprint(cfg) == fingerprint(same)
    assert fingerprint(cfg) != fingerprint(other)
    assert fingerprint(cfg) != fingerprint(_cfg(tiny_latent_model, "mesh.lr_offsets=0.5"))


def test_building_a_run_leaves_the_global_rng_alone(tiny_latent_model):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_stages("a red cube", _cfg(tiny_latent_model, "seed=7"))
    assert torch.equal(torch.rand(3), expected)
    # ...and the field's initial weights still follow the run's seed.
    a = build_stages("a red cube", _cfg(tiny_latent_model, "seed=7"))[1].field.encoding.table
    b = build_stages("a red cube", _cfg(tiny_latent_model, "seed=7"))[1].field.encoding.table
    c = build_stages("a red cube", _cfg(tiny_latent_model, "seed=8"))[1].field.encoding.table
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_building_a_run_turns_on_deterministic_algorithms(tiny_latent_model):
    """train.deterministic (default on): scatter_add / index_add sum in a fixed order, so a run does
    not depend on the machine's load (two uninterrupted toy runs differed by up to 0.02 under load
    without it); off leaves torch's setting alone."""
    torch.use_deterministic_algorithms(False)
    build_stages("a red cube", _cfg(tiny_latent_model, "train.deterministic=false"))
    assert not torch.are_deterministic_algorithms_enabled()
    build_stages("a red cube", _cfg(tiny_latent_model))
    assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()


@pytest.mark.parametrize("every_s, plots", [(1e9, 1), (0.0, 4)])
def test_loss_plots_at_validations_only_as_often_as_plot_every_s_allows(tiny_latent_model, tmp_path, monkeypatch, every_s, plots):
    """Validations every step of 4: with a long plot interval only the stage's end plots; with none,
    every validation does (a plot costs ~5 % of a toy asset's time)."""
    import steindreamer.stages.loop as loop

    calls = []
    monkeypatch.setattr(loop, "plot_run", lambda root: calls.append(root))
    cfg = _cfg(tiny_latent_model, "steps=4", "train.val_every=1", f"train.plot_every_s={every_s}")
    _, nerf = build_stages("a red cube", cfg)
    run_stage(nerf, RunFolder(tmp_path), show_progress=False)
    assert len(calls) == plots
