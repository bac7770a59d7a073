"""SSD and VSD through the CLI on tiny random models: SSD runs through the VAE decode and the depth
network; VSD trains its LoRA; both resume with their state."""
import json

import pytest
import torch

from steindreamer.cli import main
from steindreamer.guidance import distill
from steindreamer.guidance.diffusion import DiffusionGuidance

from test_baselines import BaselineSpy
from test_cli import FAST


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_ssd_runs_through_vae_decode_and_depth_model(tiny_latent_model, tiny_depth_model, tmp_path, monkeypatch):
    calls = {"decode": 0}
    original = DiffusionGuidance.decode

    def counting_decode(self, z):
        calls["decode"] += 1
        return original(self, z)

    monkeypatch.setattr(DiffusionGuidance, "decode", counting_decode)
    spy = BaselineSpy(monkeypatch, distill, "depth_baseline")
    out = tmp_path / "ssd"
    args = ["generate", "a red cube", "--out", str(out), *FAST, f"model={tiny_latent_model}", f"depth_model={tiny_depth_model}",
            "engine=ssd", "steps=3", "train.variance_every=2"]
    assert main(args) == 0
    rows = _metrics(out)
    assert calls["decode"] >= 3 and all(spy.decoded)  # phi(x_t) decodes the noisy latent every step
    assert all("mu" in r for r in rows)
    spy.check(rows)  # logged phi = 1 - weighted Pearson(NeRF disparity, depth model on decode(x_t)), recomputed
    assert rows[0]["mu"] == 0.0 and rows[0]["nu"] == 1.0  # no past steps yet: exactly SDS
    assert any("variance" in r for r in rows)
    assert (out / "variance.png").exists() and (out / "loss.png").exists()
    state = torch.load(out / "checkpoints" / "step_0000002.pt", weights_only=True)
    assert state["distiller"]["mu"]["n"] == 2


def test_ssd_normal_baseline_on_pixel_model(tiny_pixel_model, tiny_depth_model, tmp_path, monkeypatch):
    spy = BaselineSpy(monkeypatch, distill, "normal_baseline")
    out = tmp_path / "ssd-normal"
    args = ["generate", "a red cube", "--out", str(out), *FAST, f"model={tiny_pixel_model}", f"depth_model={tiny_depth_model}",
            "engine=ssd", "guidance.ssd.baseline=normal", "guidance.ssd.keep_sds_cv=false", "guidance.ssd.mu_shape=channel", "steps=2"]
    assert main(args) == 0
    rows = _metrics(out)
    assert all("nu" not in r for r in rows) and not any(spy.decoded)  # pixel model: phi reads x_t itself
    spy.check(rows)  # logged phi = 1 - weighted mean cosine of NeRF and estimated normals, recomputed
    assert rows[0]["mu"] == pytest.approx(1.0)  # the Stein term alone starts at mu_init


def test_vsd_trains_lora_and_resumes(tiny_latent_model, tmp_path):
    out = tmp_path / "vsd"
    base = ["generate", "a red cube", "--out", str(out), "--quiet"]
    assert main([*base, *FAST, f"model={tiny_latent_model}", "engine=vsd", "steps=2"]) == 0
    first = torch.load(out / "checkpoints" / "step_0000002.pt", weights_only=True)["distiller"]["lora"]["lora"]
    assert first and all(torch.isfinite(v).all() for v in first.values())
    assert main([*base, "--resume", "steps=4"]) == 0
    rows = _metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all("lora_loss" in r for r in rows)
    later = torch.load(out / "checkpoints" / "step_0000004.pt", weights_only=True)["distiller"]["lora"]["lora"]
    assert any(not torch.equal(first[k], later[k]) for k in first)  # the LoRA kept training after resume


def test_missing_depth_model_is_a_user_error(tiny_latent_model, tmp_path, capsys):
    args = ["generate", "a red cube", "--out", str(tmp_path / "r"), *FAST, f"model={tiny_latent_model}", "depth_model=/nonexistent/depth",
            "engine=ssd", "steps=1"]
    assert main(args) == 2
    assert "model folder not found" in capsys.readouterr().err
