"""The camera critic (steindreamer/guidance/camera_critic.py): its azimuth distribution, its
classifier-guidance term, its training, how a model folder names it and how distillation uses it."""
from __future__ import annotations

import json
import math

import pytest
import torch

from steindreamer.guidance.camera_critic import (CameraCritic, CameraCriticConfig, azimuth_log_prob, guidance_term,
                                                 soft_targets, train_camera_critic)


def tiny_critic(seed: int = 0, **kw) -> CameraCritic:
    torch.manual_seed(seed)
    cfg = CameraCriticConfig(**{"in_channels": 3, "text_dim": 8, "width": 8, "embed_dim": 16, "bins": 12, **kw})
    return CameraCritic(cfg)


def test_log_prob_is_the_sectors_log_probability_at_their_centres_and_continuous_around_the_circle():
    torch.manual_seed(0)
    logits = torch.randn(3, 12)
    logp = torch.log_softmax(logits, 1)
    centres = -180.0 + (torch.arange(12) + 0.5) * 30.0
    for k in range(12):
        assert torch.allclose(azimuth_log_prob(logits, centres[k].expand(3)), logp[:, k], atol=1e-6)
    # halfway between two centres: the mean; across ±180 (between the last and the first sector) too
    assert torch.allclose(azimuth_log_prob(logits, torch.full((3,), -150.0)), 0.5 * (logp[:, 0] + logp[:, 1]), atol=1e-6)
    assert torch.allclose(azimuth_log_prob(logits, torch.full((3,), 180.0)), 0.5 * (logp[:, -1] + logp[:, 0]), atol=1e-6)
    assert torch.allclose(azimuth_log_prob(logits, torch.full((3,), -180.0)), azimuth_log_prob(logits, torch.full((3,), 180.0)))
    assert torch.allclose(azimuth_log_prob(logits, torch.full((3,), 190.0)), azimuth_log_prob(logits, torch.full((3,), -170.0)),
                          atol=1e-6)


def test_soft_targets_are_wrapped_gaussians_around_the_azimuth():
    az = torch.tensor([0.0, 179.0, -179.0, 95.0])
    p = soft_targets(az, 36, 7.5)
    assert torch.allclose(p.sum(1), torch.ones(4))
    centres = -180.0 + (torch.arange(36) + 0.5) * 10.0
    nearest = lambda a: int(torch.argmin((torch.remainder(centres - a + 180, 360) - 180).abs()))  # noqa: E731
    assert [int(i) for i in p.argmax(1)] == [nearest(a) for a in az.tolist()]
    # 179 and -179 are 2 degrees apart: the same mass on the sectors either side of ±180
    assert torch.allclose(p[1, [0, 35]], p[2, [35, 0]], atol=1e-6)


def test_guidance_term_is_minus_scale_sigma_times_the_log_prob_gradient():
    critic = tiny_critic().double().eval()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 16, 16, generator=gen, dtype=torch.float64)
    t, text = torch.tensor([100, 700]), torch.randn(2, 5, 8, generator=gen)
    az, sigma = torch.tensor([30.0, -120.0]), torch.tensor([0.3, 0.9])
    critic.float()
    term = guidance_term(critic, x.float(), t, text, az, sigma, scale=2.5)
    assert term.shape == x.shape and term.dtype == torch.float32
    # central differences of log p along random directions, in float64
    critic.double()
    f = lambda y: float(azimuth_log_prob(critic(y, t, text.double()), az.double()).sum().detach())  # noqa: E731
    for _ in range(3):
        d = torch.randn(x.shape, generator=gen, dtype=torch.float64)
        fd = (f(x + 1e-4 * d) - f(x - 1e-4 * d)) / 2e-4
        # term = -2.5 sigma grad  =>  grad . d = -(term / (2.5 sigma)) . d
        analytic = float((-(term.double() / (2.5 * sigma.double().view(-1, 1, 1, 1))) * d).sum())
        assert analytic == pytest.approx(fd, rel=2e-3, abs=1e-4)
    critic.float()
    assert torch.equal(guidance_term(critic, x.float(), t, text, az, sigma, scale=0.0), torch.zeros_like(x.float()))


def test_save_and_load_give_the_same_critic(tmp_path):
    critic = tiny_critic(3).eval()
    critic.save_pretrained(tmp_path / "critic")
    again = CameraCritic.from_pretrained(tmp_path / "critic")
    x, t, text = torch.randn(2, 3, 16, 16), torch.tensor([5, 500]), torch.randn(2, 4, 8)
    assert again.cfg == critic.cfg and torch.equal(again(x, t, text), critic(x, t, text))
    assert not any(p.requires_grad for p in again.parameters())


def _dot_images(azimuth: torch.Tensor, size: int = 16) -> torch.Tensor:
    """A bright dot on the circle at the azimuth's angle: the azimuth is in the picture."""
    a = torch.deg2rad(azimuth)
    yy, xx = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    cx, cy = size / 2 + 5 * torch.sin(a), size / 2 - 5 * torch.cos(a)
    d2 = (xx[None] - cx[:, None, None]) ** 2 + (yy[None] - cy[:, None, None]) ** 2
    img = torch.exp(-d2 / 3.0) * 2 - 1
    return img[:, None].expand(-1, 3, -1, -1).contiguous()


@pytest.mark.parametrize("shuffled", [False, True])
def test_training_learns_the_azimuth_from_the_image_and_nothing_without_it(shuffled):
    """Images that show their azimuth are learned (low-noise error well under a sector); the same
    images with azimuths that have nothing to do with them stay at chance: the critic reads the image."""
    torch.set_num_threads(1)
    critic = tiny_critic(0, text_dim=0, bins=12, target_deg=15.0)
    abar = torch.linspace(0.9999, 0.0001, 1000)

    def batches(gen):
        az = torch.rand(32, generator=gen) * 360 - 180
        shown = torch.rand(32, generator=gen) * 360 - 180 if shuffled else az
        return _dot_images(shown), az, None

    losses = train_camera_critic(critic, batches, abar, steps=300, lr=3e-3, seed=0)
    critic.eval()
    az = torch.linspace(-175, 175, 36)
    with torch.no_grad():
        pred = -180.0 + (critic(_dot_images(az), torch.full((36,), 10), None).argmax(1) + 0.5) * 30.0
    err = (torch.remainder(pred - az + 180, 360) - 180).abs()
    chance = math.log(12)
    if shuffled:
        assert sum(losses[-50:]) / 50 > 0.95 * chance
    else:
        assert sum(losses[-50:]) / 50 < 0.8 * chance and float(err.median()) < 20.0


def test_a_model_folder_names_its_critic_and_distillation_adds_its_term(tmp_path):
    """The tiny pixel model with a critic in its card: SDS's G is the critic-free G plus w(t) times
    the guidance term at the same draw; camera_scale=0 gives the critic-free G exactly."""
    from tiny_models import build_tiny_pipeline

    from steindreamer.cameras import make_cameras
    from steindreamer.guidance.config import GuidanceConfig
    from steindreamer.guidance.diffusion import DiffusionGuidance
    from steindreamer.guidance.distill import Distiller

    folder = build_tiny_pipeline(tmp_path / "m", latent=False)
    critic = tiny_critic(5, text_dim=32)
    critic.save_pretrained(folder / "camera_critic")
    guide = DiffusionGuidance(str(folder), torch.device("cpu"))
    assert guide.camera_critic is None  # the card does not name it yet
    (folder / "steindreamer.json").write_text(json.dumps({"camera_critic": "camera_critic"}))
    guide = DiffusionGuidance(str(folder), torch.device("cpu"))
    assert isinstance(guide.camera_critic, CameraCritic)

    cams = make_cameras(torch.tensor([10.0, 30.0]), torch.tensor([0.0, 100.0]), torch.tensor([2.0, 2.0]), torch.tensor([45.0, 45.0]))
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 16, 16, generator=gen) * 2 - 1
    noise, t = torch.randn(x.shape, generator=gen), torch.tensor([300, 600])
    cond, uncond = guide.text_embeddings(["a cube, front view", "a cube, side view"]), guide.text_embeddings([""])

    def grad(scale):
        d = Distiller(GuidanceConfig(model=str(folder), guidance_scale=3.0, camera_scale=scale), guide)
        return d.gradient(x, {}, cams, cond, uncond, t, noise)[0]

    plain, guided = grad(0.0), grad(4.0)
    x_t = guide.schedule.add_noise(x, noise, t)
    sigma = guide.schedule.alpha_sigma(t)[1]
    expected = guide.schedule.weight(t, "sigma2").view(-1, 1, 1, 1) * guidance_term(guide.camera_critic, x_t, t, cond, cams.azimuth, sigma, 4.0)
    assert not torch.equal(plain, guided)
    assert torch.allclose(guided - plain, expected, atol=1e-5)


def test_a_card_naming_a_missing_critic_is_one_line(tmp_path):
    from tiny_models import build_tiny_pipeline

    from steindreamer.errors import UserError
    from steindreamer.guidance.diffusion import DiffusionGuidance

    folder = build_tiny_pipeline(tmp_path / "m", latent=False)
    (folder / "steindreamer.json").write_text(json.dumps({"camera_critic": "nowhere"}))
    with pytest.raises(UserError, match="camera critic 'nowhere'"):
        DiffusionGuidance(str(folder), torch.device("cpu"))
