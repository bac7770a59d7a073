"""LCSS, the second objective of scripts/train_builtin.py: on a Gaussian (a known score at a noise level
of the forward process) its expectation is score matching's, so the true score minimises it; broken
variants of the loss are caught; and train_unet's LCSS path runs and exports its objective."""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def _load_script():
    spec = importlib.util.spec_from_file_location("train_builtin", ROOT / "scripts" / "train_builtin.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tb = _load_script()

# x0 ~ N(m, diag(s²)), noised as in training: x_t = √ā x0 + √(1 - ā) ε ~ N(√ā m, ā s² + 1 - ā), score closed form.
MEAN, STD, ALPHA_BAR = torch.tensor([0.5, -1.0, 0.2]), torch.tensor([0.5, 1.0, 2.0]), 0.6
MU = math.sqrt(ALPHA_BAR) * MEAN
VAR = ALPHA_BAR * STD ** 2 + 1 - ALPHA_BAR
SIGMA = 0.3  # the LCSS neighbourhood radius (for a linear score the Stein term is exact at any radius)
N = 400_000


def true_score(x):
    return -(x - MU) / VAR


PERTURBED = {
    "scaled 1.1": lambda x: 1.1 * true_score(x),
    "scaled 0.9": lambda x: 0.9 * true_score(x),
    "shifted": lambda x: true_score(x) + torch.tensor([0.2, -0.2, 0.2]),
    "shifted back": lambda x: true_score(x) - torch.tensor([0.2, 0.0, 0.2]),
}


def draws(n: int = N, seed: int = 0):
    """Samples of p_t, drawn the way train_unet draws x_t, and Stein directions u."""
    g = torch.Generator().manual_seed(seed)
    x0 = MEAN + STD * torch.randn(n, 3, generator=g)
    x = math.sqrt(ALPHA_BAR) * x0 + math.sqrt(1 - ALPHA_BAR) * torch.randn(n, 3, generator=g)
    return x, torch.randn(n, 3, generator=g)


def lcss(centred: bool):
    return lambda s, x, u, sigma: tb.lcss_loss(s, x, u, sigma, centred=centred)


def paired(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """Mean of a - b over the same draws and its Monte-Carlo standard error."""
    d = (a - b).double()
    return d.mean().item(), d.std().item() / math.sqrt(len(d))


def true_score_is_lowest(loss_fn, sigma: float = SIGMA) -> bool:
    """The Monte-Carlo loss of the true score is below every perturbed one's by more than 4 standard
    errors of the paired difference (the same x and u for every score function)."""
    x, u = draws()
    base = loss_fn(true_score, x, u, sigma)
    for name, s in PERTURBED.items():
        gap, se = paired(loss_fn(s, x, u, sigma), base)
        if gap <= 4 * se:
            return False
    return True


def score_matching(s, x):
    """Exact score-matching objective per sample: ½‖s(x)‖² + tr ∇s(x), the trace by autograd."""
    x = x.clone().requires_grad_(True)
    out = s(x)
    trace = sum(torch.autograd.grad(out[:, j].sum(), x, retain_graph=True)[0][:, j] for j in range(x.shape[1]))
    return (0.5 * (out ** 2).sum(1) + trace).detach()


# ------------------------------------------------------------------------ (a) the true score minimises it
@pytest.mark.parametrize("centred", [True, False])
def test_true_score_minimises_the_lcss_loss(centred):
    assert true_score_is_lowest(lcss(centred))


def test_true_score_wins_by_the_score_matching_margin():
    """The gaps are the exact ones of score matching: ½(k-1)² E‖s*‖² for a score scaled by k, ½‖δ‖² for a shift δ."""
    x, u = draws()
    base = tb.lcss_loss(true_score, x, u, SIGMA)
    fisher = (1 / VAR).sum().item()  # E‖s*‖²
    expected = {"scaled 1.1": 0.005 * fisher, "scaled 0.9": 0.005 * fisher, "shifted": 0.06, "shifted back": 0.04}
    for name, s in PERTURBED.items():
        gap, se = paired(tb.lcss_loss(s, x, u, SIGMA), base)
        assert abs(gap - expected[name]) < 4 * se, (name, gap, expected[name], se)


# ------------------------------------------------------------------------ (b) equivalence to score matching
def test_lcss_equals_exact_score_matching_for_linear_scores():
    """For s(x) = Ax + b, E_u[u·s(x + σu)]/σ = tr A exactly: LCSS - SM is the same constant (zero) for
    every score function, within Monte-Carlo error, at any σ and with or without the centring term."""
    g = torch.Generator().manual_seed(1)
    A, b = torch.randn(3, 3, generator=g), torch.randn(3, generator=g)
    scores = {"true": true_score, **PERTURBED, "random linear": lambda x: x @ A.T + b}
    x, u = draws(seed=2)
    for centred in (True, False):
        for sigma in (0.05, SIGMA, 2.0):
            for name, s in scores.items():
                diff, se = paired(tb.lcss_loss(s, x, u, sigma, centred=centred), score_matching(s, x))
                assert abs(diff) < 4 * se, (centred, sigma, name, diff, se)


def test_lcss_smooths_the_trace_of_a_nonlinear_score_over_the_neighbourhood():
    """For a nonlinear score the Stein term is tr ∇s averaged over x + σu. With s = s* + sin(Wx + c) that
    average is closed form: tr ∇s* + Σ_j W_jj cos(w_j·x + c_j) exp(-σ²‖w_j‖²/2). LCSS matches it at every
    σ, equals exact score matching as σ → 0 (σ = 0.02), and is visibly off it at σ = 2."""
    g = torch.Generator().manual_seed(3)
    W, c = torch.randn(3, 3, generator=g), torch.randn(3, generator=g)
    s = lambda x: true_score(x) + torch.sin(x @ W.T + c)  # noqa: E731
    x, u = draws(seed=4)
    exact = score_matching(s, x)

    def smoothed(sigma):
        trace = -(1 / VAR).sum() + (W.diag() * torch.cos(x @ W.T + c) * torch.exp(-0.5 * sigma ** 2 * (W ** 2).sum(1))).sum(1)
        return 0.5 * (s(x) ** 2).sum(1) + trace

    for sigma in (0.02, 1.0, 2.0):
        diff, se = paired(tb.lcss_loss(s, x, u, sigma), smoothed(sigma))
        assert abs(diff) < 4 * se, (sigma, diff, se)
    diff, se = paired(tb.lcss_loss(s, x, u, 0.02), exact)
    assert abs(diff) < 4 * se, (diff, se)
    diff, se = paired(tb.lcss_loss(s, x, u, 2.0), exact)
    assert abs(diff) > 10 * se, (diff, se)


def test_eps_form_is_dsm_minus_one_and_prefers_the_true_denoiser():
    """train_unet's form: s = -ε̂/σ_t, weight 2σ_t²/d. For linear ε-predictors its expectation is the DSM
    loss (the ε-MSE of the default objective) minus 1, the same x_t and ε as DSM; the true ε̂ is lowest."""
    g = torch.Generator().manual_seed(5)
    x0 = MEAN + STD * torch.randn(N, 3, generator=g)
    eps, u = torch.randn(N, 3, generator=g), torch.randn(N, 3, generator=g)
    sig = torch.full((N, 1), math.sqrt(1 - ALPHA_BAR))
    xt = math.sqrt(ALPHA_BAR) * x0 + sig * eps
    denoisers = {"true": lambda y: -sig[0] * true_score(y), **{k: (lambda f: lambda y: -sig[0] * f(y))(f) for k, f in PERTURBED.items()}}
    base = tb.lcss_eps_loss(denoisers["true"], xt, u, sig, 0.1)
    for name, f in denoisers.items():
        loss = tb.lcss_eps_loss(f, xt, u, sig, 0.1)
        diff, se = paired(loss, ((f(xt) - eps) ** 2).mean(1))
        assert abs(diff + 1) < 4 * se, (name, diff, se)
        if name != "true":
            gap, se = paired(loss, base)
            assert gap > 4 * se, (name, gap, se)


# ------------------------------------------------------------------------ (c) wrong variants are caught
def _wrong_sign(s, x, u, sigma):
    s0, s1 = s(x), s(x + sigma * u)
    return 0.5 * (s0 ** 2).sum(1) - (u * (s1 - s0) / sigma).sum(1)


def _no_half(s, x, u, sigma):
    s0, s1 = s(x), s(x + sigma * u)
    return (s0 ** 2).sum(1) + (u * (s1 - s0) / sigma).sum(1)


def _sigma_squared(s, x, u, sigma):  # Stein's identity gives (x' - x)/σ² = u/σ, not u/σ²
    s0, s1 = s(x), s(x + sigma * u)
    return 0.5 * (s0 ** 2).sum(1) + (u * (s1 - s0) / sigma ** 2).sum(1)


def _neighbour_never_evaluated(s, x, u, sigma):  # u·s(x)/σ has mean zero: only ½‖s‖² is left
    s0 = s(x)
    return 0.5 * (s0 ** 2).sum(1) + (u * s0 / sigma).sum(1)


def _norm_at_the_neighbour(s, x, u, sigma):  # denoising-score-matching form: learns the score of p_t * N(0, σ²)
    s1 = s(x + sigma * u)
    return 0.5 * (s1 ** 2).sum(1) + (u * s1 / sigma).sum(1)


@pytest.mark.parametrize("variant", [_wrong_sign, _no_half, _sigma_squared, _neighbour_never_evaluated, _norm_at_the_neighbour])
def test_wrong_variants_fail_the_minimiser_check(variant):
    assert not true_score_is_lowest(variant)


def test_wrong_sign_is_not_score_matching_plus_a_constant():
    x, u = draws(seed=2)
    diffs = {name: paired(_wrong_sign(s, x, u, SIGMA), score_matching(s, x)) for name, s in {"true": true_score, **PERTURBED}.items()}
    spread = max(d for d, _ in diffs.values()) - min(d for d, _ in diffs.values())
    assert spread > 10 * max(se for _, se in diffs.values())


def test_lcss_loss_is_per_sample_and_calls_the_model_once():
    calls = []

    def s(y):
        calls.append(y.shape)
        return -y

    x = torch.randn(4, 3, 8, 8)
    out = tb.lcss_loss(s, x, torch.randn_like(x), torch.full((4, 1, 1, 1), 0.1))
    assert out.shape == (4,) and calls == [(8, 3, 8, 8)]
    # s = -y: ½‖x‖² + u·(-σu)/σ = ½‖x‖² - ‖u‖², tr ∇s = -d in expectation
    u = torch.randn_like(x)
    assert torch.allclose(tb.lcss_loss(s, x, u, 0.1), 0.5 * (x ** 2).sum((1, 2, 3)) - (u ** 2).sum((1, 2, 3)), atol=1e-4)


# ------------------------------------------------------------------------ train_unet's LCSS path
def test_train_unet_lcss_runs_and_exports_its_objective(tmp_path, monkeypatch):
    from steindreamer.toy import model as M

    monkeypatch.setattr(tb, "sample_grid", lambda *a, **k: None)  # 25-step sampling of a grid: not needed here
    g = torch.Generator().manual_seed(0)
    n = 6
    pool = {"rgb": torch.rand(n, 32, 32, 3, generator=g).half(),
            "caption": ["a red cube, front view", "a blue sphere, back view", "a green cone, side view"] * 2,
            "pose": torch.randn(n, 16, generator=g), "disparity": torch.rand(n, 32, 32, generator=g).half(),
            "mask": torch.ones(n, 32, 32, dtype=torch.bool), "pair": torch.zeros(n, dtype=torch.long)}
    args = argparse.Namespace(device="cpu", camera=True, init_from="", lr=5e-4, seed=0, batch=2, unet_steps=3, max_minutes=0.0,
                              warmup=0.05, ema=0.995, loss_weighting="uniform", ckpt_minutes=3.0, sample_every=500,
                              objective="lcss", lcss_sigma=0.1, out_dir=str(tmp_path / "out"), elevation=(10.0, 30.0))
    torch.manual_seed(0)
    init = M.build_unet(camera=True).state_dict()
    torch.manual_seed(0)
    tb.train_unet(args, tmp_path, pool)
    ck = torch.load(tmp_path / "unet_ckpt.pt")
    assert ck["objective"] == "lcss" and ck["step"] == 3
    assert all(torch.isfinite(v).all() for v in ck["unet"].values())
    assert any(not torch.equal(ck["unet"][k], init[k]) for k in init)  # it trained
    losses = [float(v) for v in re.findall(r"unet step \d+ loss (\S+)", (tmp_path / "train_log.txt").read_text())]
    assert losses and all(math.isfinite(v) for v in losses)
    tb.export(args, tmp_path)
    info = json.loads((tmp_path / "out" / "diffusion" / "training.json").read_text())
    assert info["objective"] == "lcss" and info["lcss_sigma"] == 0.1
    args.objective = "dsm"  # resuming with the other objective is refused
    with pytest.raises(SystemExit, match="lcss"):
        tb.train_unet(args, tmp_path, pool)
