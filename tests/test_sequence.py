"""The run's low-discrepancy view sequence (steindreamer/sequence.py, camera.sampling and
guidance.noise.t_sampling = sequence): the R_d steps are the known constants, a randomly shifted
point keeps the uniform law, consecutive points cover every range evenly (independent draws do not),
the mean of a few consecutive steps varies far less than with independent draws and stays unbiased,
and the stages draw their views from it deterministically."""
import math

import pytest
import torch

from steindreamer.cameras import CameraConfig, sample_cameras
from steindreamer.config import load_config
from steindreamer.errors import UserError
from steindreamer.pipeline import build_stages
from steindreamer.render.shading import ShadingConfig, sample_mode
from steindreamer.sequence import VIEW_DIMS, alphas, points

from test_cli import FAST

D64 = torch.float64


def test_steps_are_the_golden_ratio_and_r2_and_solve_their_equation():
    assert float(alphas(1)[0]) == pytest.approx((math.sqrt(5) - 1) / 2, abs=1e-14)
    assert alphas(2).tolist() == pytest.approx([0.7548776662466927, 0.5698402909980532], abs=1e-14)  # Roberts' R2
    for d in (3, 5, 6):
        phi = 1 / float(alphas(d)[0])
        assert phi ** (d + 1) == pytest.approx(phi + 1, abs=1e-12)
        assert alphas(d).tolist() == pytest.approx([phi ** -(i + 1) for i in range(d)], abs=1e-14)
    with pytest.raises(ValueError):
        alphas(0)


def _even(u: torch.Tensor, bins: int, slack: int) -> bool:
    """Every coordinate of the points u [n, d] puts n / bins +- slack points into each of `bins` bins."""
    counts = torch.stack([torch.bincount(torch.floor(u[:, k] * bins).long(), minlength=bins) for k in range(u.shape[1])])
    return bool(((counts - u.shape[0] // bins).abs() <= slack).all())


def test_consecutive_points_cover_each_range_evenly_and_independent_draws_do_not():
    gen = torch.Generator().manual_seed(0)
    shift = torch.rand(len(VIEW_DIMS), generator=gen, dtype=D64)
    for start in (0, 37, 1000, 5000):
        assert _even(points(start, 200, shift), 10, 4)  # 100 steps of 2 views: every tenth of every range ~ 20 views
    iid = [torch.rand(200, len(VIEW_DIMS), generator=gen, dtype=D64) for _ in range(20)]
    assert not any(_even(u, 10, 4) for u in iid)  # the check can fail: independent views bunch up


def test_a_shifted_point_is_uniform_and_the_mean_of_a_window_is_unbiased_with_far_less_variance():
    """f smooth on [0, 1)^5 with known integral: the mean over 8 consecutive points (a randomly shifted
    replicate each) is unbiased and varies far less than the mean of 8 independent points."""
    gen = torch.Generator().manual_seed(1)

    def f(u):
        return torch.sin(2 * math.pi * u[:, 0]) + u[:, 1] ** 2 + u[:, 2] * u[:, 4] + torch.exp(u[:, 3])

    exact = 0.0 + 1 / 3 + 1 / 4 + (math.e - 1)
    shifts = torch.rand(4000, len(VIEW_DIMS), generator=gen, dtype=D64)
    one = torch.stack([points(9, 1, s)[0] for s in shifts])
    assert abs(float(one.mean()) - 0.5) < 4 * math.sqrt(1 / 12 / one.numel())  # each coordinate uniform
    assert abs(float(one.var()) - 1 / 12) < 4 * math.sqrt(1 / 180 / one.numel())
    windows = torch.stack([f(points(16, 8, s)).mean() for s in shifts])
    iid = torch.stack([f(torch.rand(8, len(VIEW_DIMS), generator=gen, dtype=D64)).mean() for _ in range(4000)])
    for sample in (windows, iid):
        assert abs(float(sample.mean()) - exact) < 3 * float(sample.std()) / math.sqrt(len(sample))
    assert float(windows.var()) < 0.25 * float(iid.var())


def test_cameras_from_uniforms_span_the_configured_ranges():
    cfg = CameraConfig(distance=(1.8, 2.2), fov=(40.0, 50.0), elevation=(-10.0, 80.0), azimuth=(-180.0, 180.0))
    u = torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.3], [0.5, 0.25, 0.75, 1.0, 0.3]], dtype=D64)
    cams = sample_cameras(cfg, 2, None, u)
    assert cams.azimuth.tolist() == pytest.approx([-180.0, 0.0]) and cams.elevation.tolist() == pytest.approx([-10.0, 12.5])
    assert cams.distance.tolist() == pytest.approx([1.8, 2.1]) and torch.rad2deg(cams.fov).tolist() == pytest.approx([40.0, 50.0])
    with pytest.raises(UserError, match="camera.sampling"):
        load_config("toy", None, ["camera.sampling=sobol"])


def test_shading_from_a_sequence_keeps_the_modes_shares():
    cfg = ShadingConfig(albedo_steps=10, lambertian_p=0.6, textureless_p=0.25)
    u = points(0, 2000, torch.tensor([0.3], dtype=D64))[:, 0].tolist()
    modes = [sample_mode(cfg, 10 + i, None, v) for i, v in enumerate(u)]
    assert modes.count("lambertian") / 2000 == pytest.approx(0.6 * 0.75, abs=0.005)
    assert modes.count("textureless") / 2000 == pytest.approx(0.6 * 0.25, abs=0.005)
    assert sample_mode(cfg, 3, None, 0.0) == "albedo"  # the albedo warm-up still holds


def test_stages_draw_views_and_t_from_the_runs_sequence(tiny_latent_model):
    settings = [o for o in FAST if "=" in o]
    cfg = load_config(None, None, [f"model={tiny_latent_model}", *settings, "train.variance_every=0", "camera.sampling=sequence",
                                   "guidance.noise.t_sampling=sequence"])
    ctx, nerf = build_stages("a red cube", cfg)
    b = cfg.train.batch_size
    seen = []
    for step in range(3):
        nerf.step_index = step
        _, cams = nerf.render_train()
        u = ctx.view_uniforms(step, b)
        assert torch.equal(u, points(step * b, b, ctx.sequence_shift[:len(VIEW_DIMS)]))
        assert cams.azimuth.tolist() == pytest.approx(sample_cameras(cfg.camera, b, None, u).azimuth.tolist(), abs=1e-4)
        lo, hi = ctx.guidance.schedule.t_bounds(*nerf.t_range())
        t, _ = ctx.draw_noise(torch.zeros(b, 4, 8, 8), *nerf.t_range(), step=step)
        assert t.tolist() == (lo + torch.floor(u[:, VIEW_DIMS.index("t")] * (hi - lo + 1))).long().tolist()
        seen.append(cams.azimuth)
    again, _ = build_stages("a red cube", cfg)
    assert torch.equal(again.sequence_shift, ctx.sequence_shift)  # the seed fixes the sequence (resume needs nothing saved)
    ctx.reshift()
    assert not torch.equal(again.sequence_shift, ctx.sequence_shift)
