"""The exact noise reducers (guidance/reducers.py) and the honest variance meter (guidance/variance.py):
unbiased on the analytic harness, antithetic pairs cancel odd functions exactly, stratified and
sequence sampling keep the marginal law, the nested decomposition and the bootstrap recover known
values (and see a wrong input as wrong)."""
import math

import pytest
import torch

from steindreamer.guidance.analytic import GaussianMixture, diffuse, sd_schedule
from steindreamer.guidance.engines import control_variate, paper_term, sds
from steindreamer.guidance.reducers import average_draws, draw_plan, repeat_draws, timesteps_from_uniforms, uniforms
from steindreamer.guidance.variance import NestedMoments, StepSamples, bootstrap_ratio, bucket_ratios, group_moments, nested_components
from steindreamer.sequence import VIEW_DIMS, points

SD = sd_schedule()
D64 = torch.float64


def test_plain_plan_is_bit_identical_to_plain_sampling():
    a, b = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    t, noise = draw_plan((2, 3, 4, 4), 20, 980, 1, False, "iid", a)
    assert torch.equal(t, torch.randint(20, 981, (2,), generator=b)) and torch.equal(noise, torch.randn((2, 3, 4, 4), generator=b))
    assert torch.equal(torch.rand(5, generator=a), torch.rand(5, generator=b))  # the same stream afterwards


def test_antithetic_pairs_cancel_an_odd_function_exactly():
    t, noise = draw_plan((3, 2, 5, 5), 20, 980, 4, True, "stratified", torch.Generator().manual_seed(0))
    assert t.shape == (12,) and torch.equal(t[:6], t[6:]) and torch.equal(noise[6:], -noise[:6])
    odd = noise ** 3 - 2.0 * torch.sin(noise) + noise * noise.abs()
    assert torch.equal(average_draws(odd, 2), torch.zeros_like(odd[:6]))
    even = noise ** 2  # the check can fail: an even function does not cancel
    assert average_draws(even, 2).abs().min() > 0
    with pytest.raises(ValueError, match="even"):
        draw_plan((1, 3), 0, 10, 3, True, "iid", None)


def test_draw_layout_is_draw_major():
    x = torch.arange(6.0).view(3, 2)
    rep = repeat_draws(x, 2)
    assert torch.equal(rep[3:], x) and torch.equal(average_draws(rep + torch.tensor([[0.0], [0.0], [0.0], [2.0], [2.0], [2.0]]), 2), x + 1)


@pytest.mark.parametrize("mode", ["stratified", "sequence"])
def test_low_discrepancy_t_keeps_the_marginal_law(mode):
    gen = torch.Generator().manual_seed(1)
    if mode == "stratified":
        u = uniforms(8, mode, gen)
        assert sorted(torch.floor(u * 8).long().tolist()) == list(range(8))  # one point per stratum
        pooled = torch.cat([uniforms(8, mode, gen) for _ in range(4000)])
        first = torch.stack([uniforms(8, mode, gen)[0] for _ in range(4000)])  # the draw a given view gets
    else:  # 2 draws for each of 4 views: each view's pair half a period apart, around its base point
        base = torch.tensor([0.1, 0.6, 0.35, 0.9], dtype=D64)
        u = uniforms(8, mode, gen, base)
        assert torch.allclose(u, torch.cat([base, torch.frac(base + 0.5)]))
        with pytest.raises(ValueError, match="base point"):
            uniforms(7, mode, gen, base)
        bases = torch.rand(4000, 4, generator=gen, dtype=D64)  # uniform bases (a randomly shifted sequence)
        pooled = torch.cat([uniforms(8, mode, None, b) for b in bases[:500]])
        first = torch.stack([uniforms(8, mode, None, b)[5] for b in bases])
    for sample in (pooled, first):  # uniform: mean 1/2, variance 1/12, within 4 SE
        n = len(sample)
        assert abs(float(sample.mean()) - 0.5) < 4 * math.sqrt(1 / 12 / n)
        assert abs(float(sample.var()) - 1 / 12) < 4 * math.sqrt(1 / 180 / n)
    t = timesteps_from_uniforms((torch.arange(961, dtype=D64) + 0.5) / 961, 20, 980)
    assert torch.equal(t, torch.arange(20, 981))  # each integer timestep exactly once


def _sds_samples(target, x, plan, n, gen, views=1000):
    """n SDS estimates at the render x [1, d] under a draw plan (draws, antithetic, mode): steps of
    `views` copies of x, so stratification and the sequence run over each step's draws."""
    draws, antithetic, mode = plan
    out = []
    shift = torch.rand(len(VIEW_DIMS), generator=gen, dtype=D64)
    for step in range(n // views):
        base = points(step * views, views, shift)[:, VIEW_DIMS.index("t")] if mode == "sequence" else None
        t, eps = draw_plan((views, x.shape[1]), 20, 980, draws, antithetic, mode, gen, base)
        eps = eps.double()
        a, s = (v.view(-1, 1) for v in SD.alpha_sigma(t))
        g = sds(target.eps(diffuse(x, eps, a, s), a, s), eps, s.view(-1) ** 2)
        out.append(average_draws(g, draws))
    return torch.cat(out)


@pytest.mark.parametrize("plan", [(2, False, "iid"), (2, True, "iid"), (1, False, "stratified"), (4, True, "stratified"),
                                  (2, True, "sequence")])
def test_every_reducer_is_unbiased_on_the_analytic_harness(plan):
    """Mean of the reduced estimator = plain SDS's within 3 standard errors (per coordinate, Bonferroni
    for 6), on a Gaussian-mixture target with SD's schedule; the same check catches a biased plan."""
    g = torch.Generator().manual_seed(5)
    target = GaussianMixture(torch.tensor([0.6, 0.4], dtype=D64), torch.randn(2, 6, generator=g, dtype=D64),
                             0.3 + torch.rand(2, 6, generator=g, dtype=D64))
    x = torch.linspace(-1, 1, 6, dtype=D64).view(1, 6)
    plain = _sds_samples(target, x, (1, False, "iid"), 40_000, torch.Generator().manual_seed(6))
    reduced = _sds_samples(target, x, plan, 40_000 // plan[0] if plan[0] > 2 else 20_000, torch.Generator().manual_seed(7))
    se = torch.sqrt(plain.var(0) / len(plain) + reduced.var(0) / len(reduced))
    z = (plain.mean(0) - reduced.mean(0)) / se
    assert z.abs().max() < 3.64  # 3 SE made family-wise for 6 coordinates
    if plan == (2, True, "iid"):  # antithetic pairs remove variance (the point of them)
        assert reduced.var(0).mean() < 0.8 * plain.var(0).mean()
        biased = reduced + 0.05  # a shifted estimator must fail the same check
        assert ((plain.mean(0) - biased.mean(0)) / se).abs().max() > 3.64


def test_paper_term_is_not_zero_mean_and_the_stein_term_is():
    gen = torch.Generator().manual_seed(0)
    x0, (a, s) = torch.randn(1, 4, generator=gen, dtype=D64), (float(v) for v in SD.alpha_sigma(400))
    eps = torch.randn(100_000, 4, generator=gen, dtype=D64)
    xt = diffuse(x0, eps, a, s).requires_grad_(True)
    phi = torch.tanh(xt.sum(1)) + 1.0
    (gphi,) = torch.autograd.grad(phi.sum(), xt)
    for term, zero_mean in ((control_variate(eps, phi.detach(), gphi, s), True), (paper_term(eps, phi.detach(), gphi), False)):
        z = term.mean(0) / (term.std(0) / math.sqrt(len(term)))
        assert (z.abs().max() < 3.5) == zero_mean


def test_nested_components_recover_known_parts_and_see_a_flat_design():
    """G = a_c + b_(c,t) + e_(c,t,e) per element with variances 1, 2, 3: the parts come back."""
    gen = torch.Generator().manual_seed(0)
    c, t, e, p = 60, 8, 6, 400
    a = torch.randn(c, 1, 1, p, generator=gen, dtype=D64)
    b = math.sqrt(2) * torch.randn(c, t, 1, p, generator=gen, dtype=D64)
    eps = math.sqrt(3) * torch.randn(c, t, e, p, generator=gen, dtype=D64)
    g = a + b + eps
    m = NestedMoments([[group_moments(list(g[i, j]))[0] for j in range(t)] for i in range(c)],
                      [[group_moments(list(g[i, j]))[1] for j in range(t)] for i in range(c)], e)
    parts = nested_components(m)
    assert parts["camera"] == pytest.approx(1.0, rel=0.2) and parts["t"] == pytest.approx(2.0, rel=0.1)
    assert parts["eps"] == pytest.approx(3.0, rel=0.05) and parts["inner_fraction"] == pytest.approx(0.5, rel=0.1)
    assert parts["total"] == pytest.approx(float(g.reshape(-1, p).var(0).mean()), rel=0.1)
    g = a + b  # no eps part at all: the inner fraction is 0, not a half
    m = NestedMoments([[group_moments(list(g[i, j].expand(e, p)))[0] for j in range(t)] for i in range(c)],
                      [[group_moments(list(g[i, j].expand(e, p)))[1] for j in range(t)] for i in range(c)], e)
    assert nested_components(m)["inner_fraction"] == 0.0


def test_step_samples_variance_and_bootstrap_interval():
    gen = torch.Generator().manual_seed(0)
    a, b = StepSamples(), StepSamples()
    xs = [2.0 * torch.randn(500, generator=gen) for _ in range(40)]
    for x in xs:
        a.add(x)
    for _ in range(40):
        b.add(torch.randn(500, generator=gen) + 5.0)  # the mean does not count, the spread does
    assert a.variance() == pytest.approx(float(torch.stack(xs).double().var(0).mean()), rel=1e-6)
    r = bootstrap_ratio([(a, b)])
    assert r["interval"][0] < 4.0 < r["interval"][1] and r["interval"][1] - r["interval"][0] < 1.5
    assert r["ratio"] == pytest.approx(a.variance() / b.variance())
    same = bootstrap_ratio([(b, b)], seed=1)
    assert same["ratio"] == 1.0 and same["interval"][0] < 1.0 < same["interval"][1]


@pytest.mark.parametrize("engine", ["sds", "ssd", "vsd"])
def test_k_draws_per_render_are_the_mean_of_single_draws_for_every_engine(engine, tiny_latent_model, tiny_depth_model):
    """One render, K model calls: G is exactly the mean of the K single-draw gradients; VSD's LoRA
    learns each render once, not once per draw."""
    from steindreamer.config import load_config
    from steindreamer.pipeline import build_stages
    from test_cli import FAST

    settings = [o for o in FAST if "=" in o and not o.startswith("engine=")]
    cfg = load_config(None, None, [f"model={tiny_latent_model}", f"depth_model={tiny_depth_model}", *settings,
                                   f"engine={engine}", "guidance.noise.draws=4", "guidance.noise.antithetic=true",
                                   "guidance.noise.t_sampling=stratified", "train.batch_size=2"])
    ctx, stage = build_stages("a red cube", cfg)
    out, cams = stage.render_train()
    x = ctx.guidance.encode(out["rgb"].permute(0, 3, 1, 2)).detach()
    t, noise = ctx.draw_noise(x, *stage.t_range(), step=0)
    assert t.shape == (8,) and noise.shape == (8, *x.shape[1:])
    cond = ctx.text_for(cams)
    g, _ = ctx.distiller.gradient(x, out, cams, cond, ctx.uncond, t, noise, update=False)
    singles = [ctx.distiller.gradient(x, out, cams, cond, ctx.uncond, t[k * 2:(k + 1) * 2], noise[k * 2:(k + 1) * 2], update=False)[0]
               for k in range(4)]
    # float32: one UNet call on 8 rows against four on 2 may take other kernels (deterministic mode
    # picks its own): equal to ~1e-5 of values up to ~15; a wrong average is off by O(1)
    assert g.shape == x.shape and torch.allclose(g, torch.stack(singles).mean(0), rtol=1e-4, atol=1e-4)
    if engine == "vsd":
        seen = []
        train_step = ctx.distiller.lora.train_step
        ctx.distiller.lora.train_step = lambda latents, *a, **k: seen.append(latents.shape[0]) or train_step(latents, *a, **k)
        stage.step()
        assert seen == [2]


def test_noise_settings_are_checked_in_one_line(capsys):
    from steindreamer.cli import main
    from steindreamer.config import load_config
    from steindreamer.errors import UserError

    for bad, key in ((["guidance.noise.draws=3", "guidance.noise.antithetic=true"], "guidance.noise.draws"),
                     (["guidance.noise.draws=0"], "guidance.noise.draws"), (["guidance.ssd.stein_form=page"], "guidance.ssd.stein_form")):
        with pytest.raises(UserError, match=f"^invalid config: {key}"):
            load_config("toy", None, bad)
    assert load_config("toy", None, ["guidance.noise.draws=4", "guidance.noise.antithetic=true"]).guidance.noise.draws == 4
    assert main(["generate", "a red cube", "--preset", "toy", "guidance.noise.draws=3", "guidance.noise.antithetic=true"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "guidance.noise.draws" in err[0] and "even" in err[0]


def test_bucket_ratios_compare_each_t_bucket_with_sds_at_the_same_draws():
    nested = [{"t": [[100, 600, 700]], "inner": {"sds": [[1.0, 2.0, 4.0]], "pair": [[0.5, 0.2, 0.4]]}},
              {"t": [[150, 650, 300]], "inner": {"sds": [[3.0, 2.0, 1.0]], "pair": [[1.5, 0.2, 0.5]]}}]
    out = bucket_ratios(nested, (0, 999), 2, seed=0)
    assert out["0-499"]["groups"] == 3 and out["0-499"]["pair"]["ratio"] == pytest.approx(2.5 / 5.0)
    assert out["500-999"]["groups"] == 3 and out["500-999"]["pair"]["ratio"] == pytest.approx(0.8 / 8.0)
    lo, hi = out["500-999"]["pair"]["interval"]
    assert lo <= 0.1 <= hi
    assert bucket_ratios(nested, (0, 1999), 4, seed=0)["1500-1999"] is None  # no draw there
