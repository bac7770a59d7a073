"""The seven tests of docs/method.md, "The analytic harness and its tests" (closed-form noised
scores, SD's schedule).

Monte-Carlo sizes and seeds are fixed, so every test is deterministic; each was checked to fail when
the maths is broken (wrong sign, missing sigma_t, mu fitted on the current sample, wrong f-weight).
"""
import math
from statistics import NormalDist

import numpy as np
import pytest
import torch

from steindreamer.guidance.analytic import GaussianMixture, RandomCNN, diffuse, random_cameras, sd_schedule
from steindreamer.guidance.baselines import _value_and_grad, constant_baseline, depth_baseline
from steindreamer.guidance.engines import (control_variate, f_divergence_weight, sds, ssd, vsd)
from steindreamer.guidance.stein import LaggedMu, optimal_mu, reduce_to_shape
from steindreamer.guidance.variance import gradient_variance

SD = sd_schedule()  # float64
D64 = torch.float64


def z_limit(m: int) -> float:
    """docs/method.md's '3 standard errors' made family-wise for m coordinates (Bonferroni): the same
    0.27% false-alarm rate for the whole vector as 3 SE has for one coordinate (m=1 gives 3.0)."""
    return NormalDist().inv_cdf(1 - 0.0027 / (2 * m))


def zscores(samples: torch.Tensor) -> torch.Tensor:
    """Per-coordinate mean / standard error over the first dimension."""
    x = samples.flatten(1).double()
    return x.mean(0) / (x.std(0) / math.sqrt(x.shape[0]))


def mixture(d: int, seed: int = 1) -> GaussianMixture:
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(3, d, generator=g, dtype=D64)
    stds = 0.3 + 0.5 * torch.rand(3, d, generator=g, dtype=D64)
    return GaussianMixture(torch.tensor([0.5, 0.3, 0.2], dtype=D64), means, stds)


def smooth_phi(x: torch.Tensor) -> torch.Tensor:
    """A smooth non-linear scalar baseline on [N, d] (centred near 0 so its gradient term is visible)."""
    return torch.tanh(x @ torch.linspace(-1.0, 1.0, x.shape[1], dtype=x.dtype)) + 0.3 * torch.sin(2 * x[:, 0]) * x[:, -1]


def test_schedule_matches_diffusers():
    from diffusers import DDPMScheduler

    sch = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                        beta_schedule="scaled_linear")
    torch.testing.assert_close(SD.alphas_cumprod.float(), sch.alphas_cumprod.float(), rtol=1e-5, atol=1e-6)


# 1. Zero mean ---------------------------------------------------------------------------------------
def _forms(x0, t, n, phi_fn, gen, chunk=None):
    """Samples of h = sigma grad phi - eps phi, the literal 'eps phi + grad phi', and 'grad phi - eps phi'."""
    a, s = (float(v) for v in SD.alpha_sigma(t))
    out = {"h": [], "literal": [], "no_sigma": []}
    chunk = chunk or n
    for _ in range(n // chunk):
        eps = torch.randn((chunk,) + x0.shape[1:], generator=gen, dtype=x0.dtype)
        phi, gphi = _value_and_grad(diffuse(x0, eps, a, s), phi_fn)
        out["h"].append(control_variate(eps, phi, gphi, s))
        out["literal"].append(eps * phi.view(-1, *[1] * (eps.dim() - 1)) + gphi)
        out["no_sigma"].append(control_variate(eps, phi, gphi, 1.0))
    return {k: torch.cat(v) for k, v in out.items()}


@pytest.mark.parametrize("t", [50, 400, 900])
def test_zero_mean_smooth_phi(t):
    gen = torch.Generator().manual_seed(t)
    x0 = torch.randn(1, 6, generator=gen, dtype=D64)
    f = _forms(x0, t, 200_000, smooth_phi, gen)
    assert zscores(f["h"]).abs().max() < z_limit(6)  # docs/method.md: within 3 standard errors
    assert zscores(f["literal"]).abs().max() > 6.0
    if t == 50:  # the sigma_t factor matters most when sigma_t is far from 1
        assert zscores(f["no_sigma"]).abs().max() > 6.0


def _cnn_field_test(f):
    """For 12288 correlated coordinates: fraction beyond 3 SE near its nominal 0.27%, and the mean
    squared z-score near 1. Returns (fraction, mean z^2)."""
    z = zscores(f)
    return float((z.abs() > 3).double().mean()), float((z ** 2).mean())


def test_zero_mean_random_cnn_phi():
    """phi from a frozen random CNN on 3x64x64; the literal 'eps phi + grad phi' must fail."""
    cnn, t = RandomCNN(seed=0), 50
    gen = torch.Generator().manual_seed(0)
    x0 = torch.rand(1, 3, 64, 64, generator=gen) * 2 - 1
    a, _ = SD.alpha_sigma(t)
    ref = cnn(float(a) * x0).mean()  # constant offset: keeps phi ~ 0 so eps*phi noise stays small

    f = _forms(x0, t, 1024, lambda x: cnn(x).mean((1, 2)) - ref, gen, chunk=256)
    frac, chi = _cnn_field_test(f["h"])
    assert frac < 0.005 and chi < 1.05
    frac_l, chi_l = _cnn_field_test(f["literal"])
    assert frac_l > 0.02 and chi_l > 1.5
    frac_s, chi_s = _cnn_field_test(f["no_sigma"])
    assert chi_s > 1.3


def test_zero_mean_depth_baseline_random_cnn():
    """The real depth baseline (opacity-weighted Pearson) with a random CNN as the depth network."""
    cnn, t = RandomCNN(seed=3), 50
    gen = torch.Generator().manual_seed(3)
    x0 = torch.rand(1, 3, 64, 64, generator=gen) * 2 - 1
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 64), torch.linspace(-1, 1, 64), indexing="ij")
    disp, op = (1.5 - xx ** 2 - yy ** 2)[None], ((xx ** 2 + yy ** 2) < 0.8).float()[None]
    a, _ = SD.alpha_sigma(t)
    phi0, _ = depth_baseline(float(a) * x0, disp, op, cnn)

    def baseline(x):
        b = x.shape[0]
        return depth_baseline(x, disp.expand(b, -1, -1), op.expand(b, -1, -1), cnn)

    a_, s_ = (float(v) for v in SD.alpha_sigma(t))
    hs, lit = [], []
    for _ in range(4):
        eps = torch.randn(128, 3, 64, 64, generator=gen)
        phi, gphi = baseline(diffuse(x0, eps, a_, s_))
        phi = phi - phi0  # minus a constant (still a valid baseline) keeps eps*phi noise small
        hs.append(control_variate(eps, phi, gphi, s_))
        lit.append(eps * phi.view(-1, 1, 1, 1) + gphi)
    frac, chi = _cnn_field_test(torch.cat(hs))
    assert frac < 0.005 and chi < 1.05
    _, chi_l = _cnn_field_test(torch.cat(lit))
    assert chi_l > 1.2


# Shared sampler for tests 2-4: renders x (fixed), per-sample t, exact eps_hat of a mixture --------
def draws(target, x, n, gen, phi_fn=None, t_range=(20, 980)):
    """n draws of (eps_hat, eps, h, w, phi) at the fixed render x [1, C, H, W] (flattened for the target)."""
    t = torch.randint(t_range[0], t_range[1] + 1, (n,), generator=gen)
    a, s = (v.view(-1, 1, 1, 1) for v in SD.alpha_sigma(t))
    eps = torch.randn((n,) + x.shape[1:], generator=gen, dtype=D64)
    xt = diffuse(x, eps, a, s)
    eps_hat = target.eps(xt.flatten(1), a.view(-1, 1), s.view(-1, 1)).view_as(xt)
    if phi_fn is None:
        phi, gphi = constant_baseline(xt)
    else:
        phi, gphi = _value_and_grad(xt, phi_fn)
    return eps_hat, eps, control_variate(eps, phi, gphi, s.view(-1)), s.view(-1) ** 2, phi


def image_phi(x):
    """Smooth non-constant baseline on [N, C, H, W] images, values around 1 like the depth baseline."""
    return 1.0 + 0.5 * torch.tanh(x.flatten(1).mean(1)) + 0.2 * torch.cos(x[:, 0].flatten(1).sum(1))


C, HW = 3, 4
X = torch.linspace(-1, 1, C * HW * HW, dtype=D64).view(1, C, HW, HW).sin()


# 2. Unbiased ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mu_kind", ["scalar", "pixel"])
def test_ssd_unbiased_fixed_mu(mu_kind):
    gen = torch.Generator().manual_seed(2)
    target = mixture(C * HW * HW)
    e, n, h, w, phi = draws(target, X, 60_000, gen, image_phi)
    mu = 0.7 if mu_kind == "scalar" else 0.5 + torch.rand(1, C, HW, HW, generator=gen, dtype=D64)
    diff = ssd(e, h, mu, w) - sds(e, n, w)  # paired: the shared eps_hat term cancels its noise
    assert zscores(diff).abs().max() < z_limit(diff[0].numel())
    wrong_h = -n * phi.view(-1, 1, 1, 1)  # without the sigma grad phi term: biased
    assert zscores(ssd(e, wrong_h, mu, w) - sds(e, n, w)).abs().max() > 6.0


# 3. Optimal mu never raises variance ------------------------------------------------------------------
def _var(g):
    return float(g.var(0).mean())


@pytest.mark.parametrize("shape", ["scalar", "channel", "pixel"])
@pytest.mark.parametrize("phi_name", ["const", "image"])
def test_optimal_mu_reduces_variance(shape, phi_name, record_property):
    gen = torch.Generator().manual_seed(3)
    target, phi_fn = mixture(C * HW * HW), (None if phi_name == "const" else image_phi)
    fit = draws(target, X, 30_000, gen, phi_fn)  # mu fitted on independent draws
    e, n, h, w, _ = draws(target, X, 30_000, gen, phi_fn)
    w2 = fit[3].view(-1, 1, 1, 1) ** 2
    mu = optimal_mu(reduce_to_shape(w2 * fit[0] * fit[2], shape), reduce_to_shape(w2 * fit[2] ** 2, shape))
    v_opt, v_zero, v_sds = _var(ssd(e, h, mu, w)), _var(ssd(e, h, 0.0, w)), _var(sds(e, n, w))
    record_property("var_ratio_ssd_over_sds", v_opt / v_sds)
    print(f"\n[{phi_name}/{shape}] Var(G_SSD)/Var(G_SDS) = {v_opt / v_sds:.4f}, "
          f"Var(mu=0)/Var(G_SDS) = {v_zero / v_sds:.4f}, mean mu = {float(mu.mean()):.3f}")
    assert v_opt <= v_zero * 1.001
    if phi_name == "const":  # SDS is mu = 1 in this family, so the optimum cannot be worse
        assert v_opt <= v_sds * 1.001
    for m in (0.5 * mu, 1.5 * mu):  # and it is a minimum along the mu direction
        assert v_opt <= _var(ssd(e, h, m, w)) * 1.001


def test_lagged_mu_estimator_converges_to_closed_form():
    gen = torch.Generator().manual_seed(4)
    target = mixture(C * HW * HW)
    est = LaggedMu(shape="channel", decay=0.995, init=1.0)
    assert est.summary() == 1.0
    for _ in range(200):
        e, n, h, w, _ = draws(target, X, 64, gen, image_phi)
        est.apply(e, h, w)
    e, n, h, w, _ = draws(target, X, 50_000, gen, image_phi)
    w2 = w.view(-1, 1, 1, 1) ** 2
    exact = optimal_mu(reduce_to_shape(w2 * e * h, "channel"), reduce_to_shape(w2 * h * h, "channel"))
    torch.testing.assert_close(est._current(), exact, rtol=0.1, atol=0.02)


# 4. mu fitted on the same sample is biased; lagged mu is not ------------------------------------------
def test_same_sample_mu_biased_lagged_unbiased():
    gen = torch.Generator().manual_seed(5)
    x = torch.tensor([1.5, -1.0, 0.5, 2.0], dtype=D64).view(1, 4, 1, 1)
    target = mixture(4, seed=7)
    steps = 20_000
    e, n, h, w, _ = draws(target, x, steps, gen, None, t_range=(300, 300))  # phi = 1, fixed t
    sds_mean = sds(e, n, w).mean(0)
    # Same sample: mu from this draw's own eps_hat and h (scalar per draw).
    mu_same = -(e * h).sum((1, 2, 3), keepdim=True) / (h * h).sum((1, 2, 3), keepdim=True)
    g_same = ssd(e, h, mu_same, w)
    # Lagged: one draw per step, mu from the previous draw only (decay 0: the strictest lag, so a
    # LaggedMu that folded the current draw in first would be as biased as g_same).
    est = LaggedMu(shape="scalar", decay=0.0)
    g_lag = torch.cat([est.apply(e[i:i + 1], h[i:i + 1], w[i:i + 1]) for i in range(steps)])
    z_same = zscores(g_same - sds(e, n, w))
    z_lag = zscores(g_lag - sds(e, n, w))
    assert z_lag.abs().max() < z_limit(4)
    assert z_same.abs().max() > 6.0
    assert torch.allclose(g_lag.mean(0), sds_mean, atol=4 * float(g_lag.std(0).max()) / steps ** 0.5)


# 5. phi == 1, mu = 1 is SDS exactly -------------------------------------------------------------------
def test_constant_baseline_mu_one_is_sds_exactly():
    gen = torch.Generator().manual_seed(6)
    x_t, e, n = (torch.randn(4, 4, 8, 8, generator=gen) for _ in range(3))
    w, s = torch.rand(4, generator=gen), torch.rand(4, generator=gen)
    phi, gphi = constant_baseline(x_t)
    h = control_variate(n, phi, gphi, s)
    assert torch.equal(h, -n)
    assert torch.equal(ssd(e, h, 1.0, w), sds(e, n, w))
    est = LaggedMu(init=1.0, warmup=1)
    assert torch.equal(est.apply(e, h, w, update=False), sds(e, n, w))  # no data yet: init
    assert est.summary() == 1.0  # update=False learned nothing
    assert torch.equal(est.apply(e, h, w), sds(e, n, w))  # first step still uses init
    assert est.summary() != 1.0  # ... and only then learns from it


# 6. VSD with the exact q_t score: Var_SDS = Var_VSD + E[Var(eps | x_t)] -------------------------------
@pytest.mark.parametrize("t", [100, 500, 900])
def test_vsd_variance_decomposition(t):
    gen = torch.Generator().manual_seed(t)
    d, n = 4, 200_000
    p = mixture(d, seed=11)
    q = GaussianMixture.gaussian(torch.randn(d, generator=gen, dtype=D64), 0.4 + torch.rand(d, generator=gen, dtype=D64))
    a, s = SD.alpha_sigma(t)
    w = s ** 2
    x0 = q.sample(n, gen)  # particles: the generator's distribution q_0
    eps = torch.randn(n, d, generator=gen, dtype=D64)
    xt = diffuse(x0, eps, a, s)
    e_p = p.eps(xt, a, s)
    g_sds, g_vsd = sds(e_p, eps, w), vsd(e_p, q.eps(xt, a, s), w)
    expected = w ** 2 * q.eps_posterior_var(a, s)
    qv = (g_sds - g_sds.mean(0)) ** 2 - (g_vsd - g_vsd.mean(0)) ** 2  # per-draw Var_SDS - Var_VSD
    z = (qv.mean(0) - expected) / (qv.std(0) / n ** 0.5)
    assert z.abs().max() < z_limit(d)
    assert (g_vsd.var(0) < g_sds.var(0)).all()
    # A wrong q-score (posterior variance off by 30%) breaks the identity.
    q_bad = GaussianMixture.gaussian(q.means[0], 1.3 * q.stds[0])
    g_bad = vsd(e_p, q_bad.eps(xt, a, s), w)
    qb = (g_sds - g_sds.mean(0)) ** 2 - (g_bad - g_bad.mean(0)) ** 2
    assert ((qb.mean(0) - expected) / (qb.std(0) / n ** 0.5)).abs().max() > 6.0


# 7. f-divergence weights match a numerically differentiated D_f (1-D Gaussians) -----------------------
def _f(kind, r):
    if kind == "rkl":
        return -np.log(r)
    if kind == "kl":
        return r * np.log(r)
    if kind == "hellinger":
        return (np.sqrt(r) - 1) ** 2
    if kind == "jeffreys":
        return (r - 1) * np.log(r)
    return r * np.log(r) - (1 + r) * np.log((1 + r) / 2)  # Jensen-Shannon (x2)


def _gauss_logpdf(x, m, v):
    return -0.5 * ((x - m) ** 2 / v + np.log(2 * np.pi * v))


P_M, P_S, T7 = 0.5, 0.6, 300


def _divergence(kind, theta, a, s):
    """D_f(p_t || q_t) = E_{q_t}[f(p_t/q_t)] by Gauss-Hermite quadrature (q_t Gaussian)."""
    nodes, wts = np.polynomial.hermite_e.hermegauss(120)
    mq, vq = a * theta[0], a ** 2 * theta[1] ** 2 + s ** 2
    x = mq + np.sqrt(vq) * nodes
    r = np.exp(_gauss_logpdf(x, a * P_M, a ** 2 * P_S ** 2 + s ** 2) - _gauss_logpdf(x, mq, vq))
    return float((wts * _f(kind, r)).sum() / np.sqrt(2 * np.pi))


def f_quadrature(theta, a, s):
    """2-D Gauss-Hermite nodes over (z, eps) for x_t = a (theta_0 + theta_1 z) + s eps: (z, weights,
    x_t, p, q) with p = N(P_M, P_S^2) and q = N(theta_0, theta_1^2) as GaussianMixtures."""
    nodes, wts = np.polynomial.hermite_e.hermegauss(60)
    z, eps = (torch.tensor(v).reshape(-1) for v in np.meshgrid(nodes, nodes, indexing="ij"))
    wq = torch.tensor(np.outer(wts, wts).reshape(-1)) / (2 * np.pi)
    xt = a * (theta[0] + theta[1] * z) + s * eps
    p = GaussianMixture.gaussian(torch.tensor([P_M], dtype=D64), torch.tensor([P_S], dtype=D64))
    q = GaussianMixture.gaussian(torch.tensor([theta[0]], dtype=D64), torch.tensor([theta[1]], dtype=D64))
    return z, wq, xt, p, q


@pytest.mark.parametrize("kind", ["rkl", "kl", "js", "hellinger", "jeffreys"])
def test_f_divergence_gradient_matches_numerical(kind):
    a, s = (float(v) for v in SD.alpha_sigma(T7))
    theta = np.array([-0.3, 0.9])  # q_0 = N(theta_0, theta_1^2), x_0 = theta_0 + theta_1 z
    z, wq, xt, p, q = f_quadrature(theta, a, s)  # the estimator's expectation over (z, eps)
    r = (p.log_prob(xt[:, None], a, s) - q.log_prob(xt[:, None], a, s)).exp()
    # weight a/sigma turns eps-differences into d D_f / d x_0 (x_t = a x_0 + sigma eps).
    g = vsd(p.eps(xt[:, None], a, s), q.eps(xt[:, None], a, s), a / s,
            f_divergence_weight(kind, r, normalize=False))[:, 0]
    est = torch.stack([(wq * g).sum(), (wq * g * z).sum()]).numpy()  # chain rule: dx_0/dtheta = (1, z)
    step = 1e-5
    num = np.array([(_divergence(kind, theta + step * e_i, a, s) - _divergence(kind, theta - step * e_i, a, s))
                    / (2 * step) for e_i in np.eye(2)])
    np.testing.assert_allclose(est, num, rtol=1e-5, atol=1e-8)


def test_f_divergence_weight_normalisation():
    r = torch.tensor([0.5, 1.0, 2.0, 4.0])
    for kind in ("rkl", "kl", "js", "hellinger", "jeffreys"):
        h = f_divergence_weight(kind, r)
        assert torch.allclose(h.mean(), torch.tensor(1.0))
        raw = f_divergence_weight(kind, r, normalize=False)
        assert torch.allclose(h * raw.mean(), raw)
    torch.testing.assert_close(f_divergence_weight("js", r, normalize=False), r / (1 + r))
    with pytest.raises(ValueError):
        f_divergence_weight("tv", r)


def test_kl_quadrature_matches_closed_form():
    """Guards the reference D_f itself: Gaussian KLs in closed form."""
    a, s = (float(v) for v in SD.alpha_sigma(T7))
    theta = np.array([-0.3, 0.9])
    mp, vp = a * P_M, a ** 2 * P_S ** 2 + s ** 2
    mq, vq = a * theta[0], a ** 2 * theta[1] ** 2 + s ** 2
    kl = lambda m1, v1, m2, v2: 0.5 * (v1 / v2 + (m1 - m2) ** 2 / v2 - 1 + np.log(v2 / v1))  # KL(1||2)
    assert _divergence("rkl", theta, a, s) == pytest.approx(kl(mq, vq, mp, vp), rel=1e-9)
    assert _divergence("kl", theta, a, s) == pytest.approx(kl(mp, vp, mq, vq), rel=1e-9)


# Variance meter on a case with a known answer --------------------------------------------------------
def test_variance_meter_closed_form():
    """Gaussian target, x = A theta, fixed t: G_SDS = w((b - 1) eps + const) with b = sigma^2/(a^2 s^2 + sigma^2),
    so Var(G) = w^2 (1-b)^2 per element and the theta-gradient A^T G has Var = w^2 (1-b)^2 sum_i A_ij^2."""
    gen = torch.Generator().manual_seed(8)
    d, k, t = 6, 4000, 400
    std = torch.full((d,), 0.7, dtype=D64)
    p = GaussianMixture.gaussian(torch.zeros(d, dtype=D64), std)
    A = random_cameras(1, d, 3, gen)[0]
    theta = torch.randn(3, dtype=D64, generator=gen)
    a, s = SD.alpha_sigma(t)
    w = s ** 2

    def draw(i):
        x = (A @ theta)[None]
        eps = torch.randn(1, d, generator=gen, dtype=D64)
        g = sds(p.eps(diffuse(x, eps, a, s), a, s), eps, w)
        return g, (A.T @ g[0])

    rep = gradient_variance(draw, k)
    b = s ** 2 / (a ** 2 * 0.49 + s ** 2)
    v = float(w ** 2 * (1 - b) ** 2)
    assert rep.var_image == pytest.approx(v, rel=0.08)
    assert rep.var_theta == pytest.approx(v * float((A ** 2).sum(0).mean()), rel=0.08)


# SSD keeping SDS's -eps control variate (LaggedJointMu): never worse than SDS, even for a baseline
# whose family lacks the constant (where mu h alone is worse than SDS above).
def test_joint_stein_and_sds_control_variates_never_worse_than_sds():
    from steindreamer.guidance.stein import LaggedJointMu

    gen = torch.Generator().manual_seed(7)
    target = mixture(C * HW * HW)
    est = LaggedJointMu(decay=0.0, warmup=1)
    fit = draws(target, X, 30_000, gen, image_phi)
    est.apply(fit[0], fit[2], fit[1], fit[3], update=True)  # one big batch of past draws fits (mu, nu)
    e, n, h, w, _ = draws(target, X, 30_000, gen, image_phi)
    joint = est.apply(e, h, n, w, update=False)
    mu, nu = est.coefficients()
    v_joint, v_sds = _var(joint), _var(sds(e, n, w))
    w2 = fit[3].view(-1, 1, 1, 1) ** 2
    mu_alone = optimal_mu(reduce_to_shape(w2 * fit[0] * fit[2], "scalar"), reduce_to_shape(w2 * fit[2] ** 2, "scalar"))
    v_alone = _var(ssd(e, h, mu_alone, w))
    print(f"\n[joint] Var/Var_SDS = {v_joint / v_sds:.4f} (mu={mu:.3f}, nu={nu:.3f}); Stein term alone {v_alone / v_sds:.4f}")
    assert v_joint <= v_sds * 1.001 and v_joint <= v_alone * 1.001
    # Still unbiased: the mean equals SDS's mean (paired difference has zero mean).
    diff = joint - sds(e, n, w)
    assert zscores(diff).abs().max() < z_limit(diff[0].numel())
    # Before any data it is exactly SDS.
    fresh = LaggedJointMu()
    assert torch.equal(fresh.apply(e[:8], h[:8], n[:8], w[:8], update=False), sds(e[:8], n[:8], w[:8]))


# mu_decay has one meaning for both estimators: a draw folded in k updates ago weighs decay**k.
def _decayed_fits(decay: float, ys: list[float], zs: list[float]) -> tuple[float, float, float]:
    """Draws built so that each fit is a weighted mean: h = [1, 0], noise = [0, 1] (h orthogonal to
    the SDS variate -eps), eps_hat = [-y, z]. Then mu = sum_k w_k y_k / sum_k w_k, nu likewise of z,
    and LaggedMu (h = 1, eps_hat = -y) fits the same mean of y."""
    from steindreamer.guidance.stein import LaggedJointMu

    joint = LaggedJointMu(decay=decay, warmup=1, ridge=0.0)
    alone = LaggedMu(shape="scalar", decay=decay, warmup=1)
    h, noise = torch.tensor([[1.0, 0.0]], dtype=D64), torch.tensor([[0.0, 1.0]], dtype=D64)
    for y, z in zip(ys, zs):
        joint.apply(torch.tensor([[-y, z]], dtype=D64), h, noise, 1.0)
        alone.apply(torch.tensor([[-y]], dtype=D64), torch.ones(1, 1, dtype=D64), 1.0)
    mu, nu = joint.coefficients()
    return mu, nu, alone.summary()


def test_mu_decay_weighs_a_draw_k_updates_old_by_decay_to_the_k():
    n, d = 20, 0.99
    first = [1.0] + [0.0] * (n - 1)  # only the first draw contributes
    last = [0.0] * (n - 1) + [1.0]   # only the last one does
    mu_first, nu_last, alone_first = _decayed_fits(d, first, last)
    mu_last, nu_first, alone_last = _decayed_fits(d, last, first)
    total = sum(d ** k for k in range(n))
    assert mu_first == pytest.approx(d ** (n - 1) / total, rel=1e-12)
    assert mu_last == pytest.approx(1.0 / total, rel=1e-12) and nu_last == pytest.approx(mu_last, rel=1e-12)
    assert mu_first / mu_last == pytest.approx(d ** (n - 1), rel=1e-12)  # first vs last: 0.99**19
    assert nu_first / nu_last == pytest.approx(d ** (n - 1), rel=1e-12)
    # LaggedMu gives decay the same meaning.
    assert alone_first == pytest.approx(mu_first, rel=1e-12) and alone_last == pytest.approx(mu_last, rel=1e-12)


def test_mu_decay_first_draw_does_not_dominate():
    """The earlier LaggedJointMu (EMA started at the first draw) gave that draw 83% of the fit after
    20 draws at decay 0.99; with decay**k weights it is one draw among twenty (~4.5%)."""
    mu, nu, _ = _decayed_fits(0.99, [1.0] + [0.0] * 19, [1.0] + [0.0] * 19)
    assert mu < 0.06 and nu < 0.06
    mu, _, _ = _decayed_fits(0.99, [0.0] + [1.0] * 19, [0.0] * 20)  # the reverse: later draws are not drowned
    assert mu > 0.94


def test_joint_mu_state_round_trip_and_old_ema_state():
    from steindreamer.guidance.stein import LaggedJointMu

    est = LaggedJointMu(decay=0.9, warmup=1)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        e, h, n = (torch.randn(2, 3, generator=g, dtype=D64) for _ in range(3))
        est.apply(e, h, n, 1.0)
    state = est.state_dict()
    again = LaggedJointMu(decay=0.9, warmup=1)
    again.load_state_dict(state)
    assert torch.equal(again.sums, est.sums) and again.n == est.n and again.coefficients() == est.coefficients()
    old = LaggedJointMu(decay=0.9, warmup=1)  # a checkpoint from the EMA version: no "discounted" key
    old.load_state_dict({"sums": est.sums * 0.1, "n": est.n})
    torch.testing.assert_close(old.sums, est.sums, rtol=1e-12, atol=0)  # brought to the sums' scale
    LaggedJointMu().load_state_dict({"n": 0})  # a state saved before any update
