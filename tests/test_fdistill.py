"""f-distill for the VSD engine (guidance/ratio.py, teacher_pool.py): a discriminator's density ratio
recovers a known Gaussian ratio, the weighted estimator with that trained ratio follows the
numerically differentiated D_f, rkl is VSD exactly, and the ratio's state resumes bit for bit."""
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from steindreamer.cli import main
from steindreamer.guidance.analytic import GaussianMixture, sd_schedule
from steindreamer.guidance.engines import f_divergence_weight, vsd
from steindreamer.guidance.ratio import DensityRatio, FWeight, MLPRatioNet

from test_cli import FAST
from test_engines_analytic import P_M, P_S, _divergence, f_quadrature  # the target the harness differentiates

SD = sd_schedule()
D64 = torch.float64
Q_M, Q_S, T = -0.3, 0.9, 300


def _trained_ratio(steps: int = 1500, seed: int = 0) -> tuple[DensityRatio, float, float]:
    """A discriminator trained on p_t = N(a P_M, a^2 P_S^2 + s^2) against q_t (the same for Q) at t = T."""
    torch.manual_seed(seed)
    a, s = (float(v) for v in SD.alpha_sigma(T))
    ratio = DensityRatio(MLPRatioNet(1), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    t = torch.full((256,), T / SD.num_train_timesteps)
    with torch.no_grad():  # as the variance meter draws whole steps: the discriminator trains all the same
        for _ in range(steps):
            p = a * (P_M + P_S * torch.randn(256, 1, generator=g)) + s * torch.randn(256, 1, generator=g)
            q = a * (Q_M + Q_S * torch.randn(256, 1, generator=g)) + s * torch.randn(256, 1, generator=g)
            ratio.train_step(p, q, t, t)
    return ratio, a, s


@pytest.fixture(scope="module")
def trained():
    return _trained_ratio()


def _true_log_ratio(x, a, s):
    p = GaussianMixture.gaussian(torch.tensor([P_M], dtype=D64), torch.tensor([P_S], dtype=D64))
    q = GaussianMixture.gaussian(torch.tensor([Q_M], dtype=D64), torch.tensor([Q_S], dtype=D64))
    return p.log_prob(x, a, s) - q.log_prob(x, a, s)


def test_discriminator_recovers_a_gaussian_density_ratio(trained):
    """Where q_t has 90 % of its mass, the trained log-ratio is within 0.1 nats of the true one on
    average (0.25 at worst); an untrained discriminator is not."""
    ratio, a, s = trained
    std = (a ** 2 * Q_S ** 2 + s ** 2) ** 0.5
    x = torch.linspace(a * Q_M - 1.645 * std, a * Q_M + 1.645 * std, 101, dtype=D64)[:, None]
    t = torch.full((101,), T / SD.num_train_timesteps)
    err = (ratio.log_ratio(x.float(), t).double() - _true_log_ratio(x, a, s)).abs()
    assert err.mean() < 0.1 and err.max() < 0.25, (float(err.mean()), float(err.max()))
    untrained = DensityRatio(MLPRatioNet(1))
    assert (untrained.log_ratio(x.float(), t).double() - _true_log_ratio(x, a, s)).abs().mean() > 0.3


@pytest.mark.parametrize("kind", ["kl", "js", "hellinger", "jeffreys"])
def test_weighted_estimator_with_the_trained_ratio_follows_d_f(kind, trained):
    """E over (z, eps) of h(r_D) (eps_p - eps_q) a/s with the discriminator's r: the numerical dD_f/dtheta
    within 5 % (the closed-form r gives it to 1e-5: test_engines_analytic); rkl's h = 1 would not."""
    ratio, a, s = trained
    theta = np.array([Q_M, Q_S])
    z, wq, xt, p, q = f_quadrature(theta, a, s)
    r = ratio.ratio(xt[:, None].float(), torch.full((len(xt),), T / SD.num_train_timesteps)).double()

    def estimate(kind):
        g = vsd(p.eps(xt[:, None], a, s), q.eps(xt[:, None], a, s), a / s, f_divergence_weight(kind, r, normalize=False))[:, 0]
        return torch.stack([(wq * g).sum(), (wq * g * z).sum()]).numpy()

    step = 1e-5
    num = np.array([(_divergence(kind, theta + step * e, a, s) - _divergence(kind, theta - step * e, a, s)) / (2 * step)
                    for e in np.eye(2)])
    assert np.abs(estimate(kind) - num).max() < 0.05 * np.abs(num).max(), (estimate(kind), num)
    assert np.abs(estimate("rkl") / np.abs(estimate("rkl")).max() - num / np.abs(num).max()).max() > 0.05


def test_h_is_normalised_by_its_recent_mean_and_clipped():
    w = FWeight("kl", (0.2, 5.0), window=2)
    h = w(torch.tensor([1.0, 3.0]))  # first batch: its own mean, 2
    torch.testing.assert_close(h, torch.tensor([0.5, 1.5]))
    h = w(torch.tensor([100.0]))  # over the mean of the window's batch means (2, 100): 51
    assert float(h) == pytest.approx(100 / 51) and w.recent == [2.0, 100.0]
    assert float(w(torch.tensor([0.001]), update=False)) == pytest.approx(0.2) and w.recent == [2.0, 100.0]  # clipped
    w.load_state_dict(w.state_dict())
    assert w.recent == [2.0, 100.0]


def test_h_follows_a_ratio_that_falls_by_orders_of_magnitude():
    """As the discriminator learns, r = p/q of the renders falls from ~1 to ~1e-3 within ~150 steps
    (toy runs: log r -1 -> -7). h must keep weighing one view against the other (here 1 : 2), not
    sink to the clip's floor for all: that only shrinks every step (a slow running mean did)."""
    w = FWeight("kl", (0.2, 5.0))
    for step in range(200):
        h = w(torch.tensor([1.0, 2.0]) * math.exp(-0.05 * step))
    assert 0.5 < float(h[0]) < 0.7 and 1.0 < float(h[1]) < 1.4, h  # 1 and 2 over 1.5 x the window's drift (1.2)
    torch.testing.assert_close(h[1] / h[0], torch.tensor(2.0))


def _vsd_args(model, out, *extra):
    return ["generate", "a red cube", "--out", str(out), f"model={model}", *FAST, "engine=vsd", "train.variance_every=0",
            "guidance.vsd.pool_per_view=3", "guidance.vsd.pool_steps=3", "guidance.vsd.ratio_warmup=1", *extra]


@pytest.fixture(scope="module")
def kl_run(tiny_pixel_model, tmp_path_factory):
    """A 4-step f-distill run (forward KL) that two tests compare against."""
    out = tmp_path_factory.mktemp("kl") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STEINDREAMER_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
        assert main(_vsd_args(tiny_pixel_model, out, "steps=4", "divergence=kl")) == 0
    return out


def test_rkl_is_vsd_and_kl_changes_the_gradient(tiny_pixel_model, kl_run, tmp_path):
    """divergence=rkl builds no discriminator and gives VSD's run bit for bit (the default config is
    VSD); kl with the same seed follows another path once its ratio is warm."""
    a, b = tmp_path / "vsd", tmp_path / "rkl"
    assert main(_vsd_args(tiny_pixel_model, a, "steps=4")) == 0
    assert main(_vsd_args(tiny_pixel_model, b, "steps=4", "divergence=rkl")) == 0
    sa, sb, sc = (torch.load(d / "checkpoints" / "step_0000004.pt", weights_only=True) for d in (a, b, kl_run))
    assert "ratio" not in sa["distiller"] and "ratio" not in sb["distiller"]
    for key in sa["field"]:
        assert torch.equal(sa["field"][key], sb["field"][key]), key
    assert "ratio" in sc["distiller"]
    assert any(not torch.equal(sa["field"][k], sc["field"][k]) for k in sa["field"])


def test_f_distill_resume_is_bit_identical(tiny_pixel_model, kl_run, tmp_path):
    """The discriminator, its Adam state and h's recent batch means are checkpointed; the teacher pool is
    cached (a damaged entry is drawn again, identically)."""
    b = tmp_path / "b"
    assert main(_vsd_args(tiny_pixel_model, b, "steps=2", "divergence=kl")) == 0
    pools = list(Path(os.environ["STEINDREAMER_CACHE"]).rglob("teacher_pool/*.safetensors"))
    assert pools, "the teacher pool was not cached"
    for path in pools:
        path.write_bytes(b"damaged")
    assert main(["generate", "a red cube", "--out", str(b), "--resume", "--quiet", "steps=4"]) == 0
    sa, sb = (torch.load(d / "checkpoints" / "step_0000004.pt", weights_only=True) for d in (kl_run, b))
    ra, rb = sa["distiller"]["ratio"], sb["distiller"]["ratio"]
    assert ra["steps"] == rb["steps"] == 4 and ra["h"] == rb["h"]
    for key in ra["net"]:
        assert torch.equal(ra["net"][key], rb["net"][key]), key
    for key in sa["field"]:
        assert torch.equal(sa["field"][key], sb["field"][key]), key


@pytest.mark.parametrize("override, message", [
    ("divergence=tv", "guidance.vsd.divergence"),
    ("guidance.divergence=kl", "guidance.vsd.divergence"),
    ("guidance.vsd.h_clip=[2,5]", "guidance.vsd.h_clip"),
])
def test_bad_divergence_settings_are_one_line(override, message, tiny_pixel_model, tmp_path, capsys):
    assert main(_vsd_args(tiny_pixel_model, tmp_path / "r", override)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and message in err and "\n" not in err, err
