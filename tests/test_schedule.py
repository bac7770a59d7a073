"""NoiseSchedule: the one place that does the noise maths (schedule.py)."""
import pytest
import torch

from steindreamer.guidance.schedule import PREDICTION_TYPES, NoiseSchedule


def ddpm(beta_schedule="scaled_linear", prediction_type="epsilon"):
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule=beta_schedule,
                         prediction_type=prediction_type, clip_sample=False)


def draws(seed=0, shape=(6, 4, 8, 8), dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x0, noise, out = (torch.randn(shape, generator=g, dtype=dtype) for _ in range(3))
    t = torch.tensor([0, 1, 17, 500, 998, 999])[: shape[0]]  # both ends of the schedule included
    return x0, noise, out, t


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_eps_from_output_and_target_are_inverses(prediction_type):
    """target(x0, eps) is what a perfect model outputs at x_t = add_noise(x0, eps); eps_from_output
    undoes it, and conversely any output maps to the eps whose implied x0 gives that output back."""
    sch = NoiseSchedule.scaled_linear(prediction_type=prediction_type, dtype=torch.float64)
    x0, noise, out, t = draws(dtype=torch.float64)
    x_t = sch.add_noise(x0, noise, t)
    torch.testing.assert_close(sch.eps_from_output(sch.target(x0, noise, t), x_t, t), noise, rtol=0, atol=1e-9)
    eps = sch.eps_from_output(out, x_t, t)
    a, s = (v.view(-1, 1, 1, 1) for v in sch.alpha_sigma(t))
    x0_implied = (x_t - s * eps) / a
    torch.testing.assert_close(sch.target(x0_implied, eps, t), out, rtol=0, atol=1e-9)


def test_target_and_eps_for_each_prediction_type_by_formula():
    x0, noise, out, t = draws()
    a, s = (v.view(-1, 1, 1, 1) for v in NoiseSchedule.scaled_linear().alpha_sigma(t))
    x_t = a * x0 + s * noise
    eps_s, v_s, x0_s = (NoiseSchedule.scaled_linear(prediction_type=k) for k in ("epsilon", "v_prediction", "sample"))
    assert torch.equal(eps_s.target(x0, noise, t), noise) and torch.equal(eps_s.eps_from_output(out, x_t, t), out)
    torch.testing.assert_close(v_s.target(x0, noise, t), a * noise - s * x0)
    torch.testing.assert_close(v_s.eps_from_output(out, x_t, t), a * out + s * x_t)
    assert torch.equal(x0_s.target(x0, noise, t), x0)
    torch.testing.assert_close(x0_s.eps_from_output(out, x_t, t), (x_t - a * out) / s)
    with pytest.raises(ValueError, match="prediction_type"):
        NoiseSchedule(torch.linspace(0.99, 0.01, 10), "flow")


@pytest.mark.parametrize("beta_schedule", ["scaled_linear", "linear", "squaredcos_cap_v2"])
def test_from_scheduler_matches_diffusers_add_noise_and_velocity(beta_schedule):
    scheduler = ddpm(beta_schedule, "v_prediction")
    sch = NoiseSchedule.from_scheduler(scheduler)
    assert sch.prediction_type == "v_prediction" and sch.num_train_timesteps == 1000
    assert sch.alphas_cumprod.dtype == torch.float32
    x0, noise, _, t = draws()
    torch.testing.assert_close(sch.add_noise(x0, noise, t), scheduler.add_noise(x0, noise, t), rtol=0, atol=1e-6)
    torch.testing.assert_close(sch.target(x0, noise, t), scheduler.get_velocity(x0, noise, t), rtol=0, atol=1e-6)


def test_scaled_linear_is_stable_diffusions_schedule():
    """From betas: bit for bit diffusers' scaled_linear in float32, and to float32 precision in float64."""
    ref = ddpm("scaled_linear").alphas_cumprod
    assert torch.equal(NoiseSchedule.scaled_linear().alphas_cumprod, ref)
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2
    assert torch.equal(NoiseSchedule.from_betas(betas).alphas_cumprod, ref)
    f64 = NoiseSchedule.scaled_linear(dtype=torch.float64).alphas_cumprod
    torch.testing.assert_close(f64.float(), ref, rtol=1e-5, atol=1e-6)


def test_noise_weight_and_t_are_the_pinned_formulas():
    """The default SDS path's numbers (tests/test_reference_run.py) rest on exactly these operations."""
    scheduler = ddpm()
    sch = NoiseSchedule.from_scheduler(scheduler)
    abar = scheduler.alphas_cumprod.to(dtype=torch.float32)
    x0, noise, _, t = draws()
    a, s = abar[t].sqrt(), (1 - abar[t]).sqrt()
    for x in (x0, x0.double(), x0.half()):
        want = (a.view(-1, 1, 1, 1) * x.float() + s.view(-1, 1, 1, 1) * noise.float()).to(x.dtype)
        got = sch.add_noise(x, noise, t)
        assert got.dtype == x.dtype and torch.equal(got, want)
    assert torch.equal(sch.weight(t, "sigma2"), 1.0 - abar[t])
    assert torch.equal(sch.weight(t, "uniform"), torch.ones(len(t)))
    with pytest.raises(ValueError, match="weighting"):
        sch.weight(t, "sigma")
    for t_min, t_max in ((0.02, 0.98), (0.0, 1.0), (0.5, 0.5)):
        lo, hi = max(int(t_min * 1000), 0), min(int(t_max * 1000), 999)
        want = torch.randint(lo, hi + 1, (64,), generator=torch.Generator().manual_seed(3))
        assert torch.equal(sch.sample_t(64, t_min, t_max, torch.Generator().manual_seed(3)), want)
    moved = sch.to("cpu", torch.float64)
    assert moved.alphas_cumprod.dtype == torch.float64 and moved.prediction_type == sch.prediction_type
