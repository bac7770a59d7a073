"""Stein baselines: depth/normal phi through a tiny random DPT, gradients w.r.t. x_t only.

`independent_phi` and `BaselineSpy` are shared with the CLI tests (test_engines_cli,
test_toy_generate): they check that the phi a run logs is the baseline's formula evaluated on that
run's own maps, computed here without the package's correlation code."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from steindreamer.guidance.baselines import (constant_baseline, depth_baseline, normal_baseline,
                                             normals_from_depth_map, transformers_depth_estimator,
                                             weighted_pearson)
from steindreamer.guidance.engines import control_variate, sds, ssd


def pearson_np(a: torch.Tensor, b: torch.Tensor, w: torch.Tensor, eps: float = 1e-8) -> np.ndarray:
    """Weighted Pearson correlation per sample, by numpy's weighted covariance (not the package's):
    cov / sqrt(var_a var_b + eps^2), the stabiliser phi is defined with (a constant map correlates
    0, not NaN; the tiny random depth networks here predict maps of std ~1e-8, where it matters)."""
    a, b, w = (t.detach().double().reshape(t.shape[0], -1).cpu().numpy() for t in (a, b, w))
    out = []
    for ai, bi, wi in zip(a, b, w):
        c = np.cov(np.stack([ai, bi]), aweights=wi, bias=True)
        out.append(c[0, 1] / np.sqrt(c[0, 0] * c[1, 1] + eps**2))
    return np.array(out)


def _resized(pred: torch.Tensor, size) -> torch.Tensor:
    pred = pred if pred.dim() == 4 else pred[:, None]
    return F.interpolate(pred, size=tuple(size), mode="bilinear", align_corners=False)


def independent_phi(kind: str, x_t, maps, opacity, estimate, decode=None) -> np.ndarray:
    """phi [B] recomputed from a baseline's inputs. depth: 1 - weighted Pearson(NeRF disparity, the
    estimate resized to it); normal: 1 - opacity-weighted mean cosine between the NeRF's normals and
    those of the estimate (`normals_from_depth_map`, whose convention test_normal_baseline checks)."""
    with torch.no_grad():
        img = decode(x_t) if decode is not None else x_t
        pred = _resized(estimate(img), maps.shape[-2:]).double()
        w = (opacity if opacity.dim() == 4 else opacity[:, None]).double()
        if kind == "depth":
            return 1.0 - pearson_np(maps, pred, w)
        n_est = normals_from_depth_map(pred, w).cpu().numpy()
        n_nerf = maps.double().cpu().numpy()
        n_nerf = n_nerf / np.maximum(np.linalg.norm(n_nerf, axis=1, keepdims=True), 1e-12)  # empty pixels: 0
        cos = (n_est * n_nerf).sum(1)
        wn = w[:, 0].cpu().numpy()
        return 1.0 - (wn * cos).sum((1, 2)) / wn.sum((1, 2))


class BaselineSpy:
    """Replaces `name` (depth_baseline or normal_baseline) in `module` with a wrapper that keeps,
    for every call, the phi it returned, the phi `independent_phi` gives for the same inputs, and
    whether a decoder was passed (`decoded`)."""

    def __init__(self, monkeypatch, module, name: str):
        self.kind, self.calls, self.decoded = name.split("_")[0], [], []
        original = getattr(module, name)

        def spy(x_t, maps, opacity, estimate, decode=None, *args, **kw):
            phi, grad = original(x_t, maps, opacity, estimate, decode, *args, **kw)
            expected = independent_phi(self.kind, x_t, maps, opacity, estimate, decode)
            self.calls.append((phi.double().cpu().numpy(), expected))
            self.decoded.append(decode is not None)
            return phi, grad

        monkeypatch.setattr(module, name, spy)

    def check(self, rows: list[dict], atol: float = 1e-5) -> None:
        """Every call's phi is the independent one (to `atol`: float32 models), and each training
        step's logged phi is the batch mean of one call (to float32 rounding), in step order (the
        variance meter's draws call the baseline too). The tiny random depth models give phi within
        ~1e-3 of 1, so the tolerances are well below the spread between calls."""
        assert self.calls
        for phi, expected in self.calls:
            assert np.allclose(phi, expected, rtol=0, atol=atol), (phi, expected)
        means, i = [float(phi.mean()) for phi, _ in self.calls], 0
        for row in rows:
            while i < len(means) and abs(means[i] - row["phi"]) > 1e-6:
                i += 1
            assert i < len(means), f"step {row['step']}: logged phi {row['phi']} is no baseline call's"
            i += 1


@pytest.fixture(scope="module")
def dpt():
    from transformers import DPTConfig, DPTForDepthEstimation

    torch.manual_seed(0)
    cfg = DPTConfig(image_size=64, patch_size=8, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                    intermediate_size=64, backbone_out_indices=[0, 1, 2, 3], neck_hidden_sizes=[16, 32, 32, 64],
                    reassemble_factors=[4, 2, 1, 0.5], fusion_hidden_size=32, is_hybrid=False,
                    head_in_index=-1)
    return DPTForDepthEstimation(cfg).double()


def nerf_maps(b=2, n=32):
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, n), torch.linspace(-1, 1, n), indexing="ij")
    depth = (2.0 + 0.3 * xx + 0.2 * yy ** 2).expand(b, n, n).double()
    opacity = ((xx ** 2 + yy ** 2) < 0.7).double().expand(b, n, n).clone()
    opacity[:, 0, 0] = 0.5  # a soft weight too
    return torch.where(opacity > 1e-3, 1.0 / depth, torch.zeros_like(depth)), opacity  # disparity where opaque


def test_depth_baseline_range_grad_and_leaf(dpt):
    est = transformers_depth_estimator(dpt)
    gen = torch.Generator().manual_seed(0)
    x_t = torch.randn(2, 3, 48, 48, generator=gen, dtype=torch.float64)  # resized to 64 for the DPT
    disp, op = nerf_maps()
    # The NeRF maps carry a graph to "theta": phi must not keep it.
    theta = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
    phi, grad = depth_baseline(x_t, disp * theta, op * theta, est)
    assert phi.shape == (2,) and grad.shape == x_t.shape
    assert np.allclose(phi.numpy(), independent_phi("depth", x_t, disp, op, est), atol=1e-9)
    assert not phi.requires_grad and not grad.requires_grad and phi.grad_fn is None
    assert x_t.grad is None and not x_t.requires_grad  # the caller's tensor is untouched
    assert all(p.grad is None for p in dpt.parameters()) and theta.grad is None
    assert grad.abs().sum() > 0
    # Samples are independent: sample 0's phi does not depend on sample 1's pixels.
    xp = x_t.clone()
    xp[1] += 0.1
    assert depth_baseline(xp, disp, op, est)[0][0] == phi[0]
    # Finite differences on a couple of coordinates of sample 0 (float64 throughout).
    x0, d0, o0 = x_t[:1], disp[:1], op[:1]
    for idx in [(0, 0, 10, 20), (0, 2, 30, 5)]:
        step = 1e-6
        xp, xm = x0.clone(), x0.clone()
        xp[idx] += step
        xm[idx] -= step
        fd = (depth_baseline(xp, d0, o0, est)[0] - depth_baseline(xm, d0, o0, est)[0]) / (2 * step)
        assert float(grad[idx]) == pytest.approx(float(fd), rel=1e-4, abs=1e-9)


def test_depth_baseline_with_decoder(dpt):
    """Latent models: phi goes through decode(x_t); grad is w.r.t. the latent."""
    est = transformers_depth_estimator(dpt)
    dec = torch.nn.ConvTranspose2d(4, 3, 2, stride=2).double()
    z = torch.randn(2, 4, 16, 16, dtype=torch.float64)
    disp, op = nerf_maps()
    phi, grad = depth_baseline(z, disp, op, est, decode=lambda x: torch.tanh(dec(x)))
    assert grad.shape == z.shape and grad.abs().sum() > 0
    assert all(p.grad is None for p in dec.parameters())


def test_pearson_identity_gives_zero_phi():
    disp, op = nerf_maps()
    assert torch.allclose(weighted_pearson(disp, disp, op), torch.ones(2, dtype=torch.float64))
    assert torch.allclose(weighted_pearson(disp, 3 * disp + 1, op), torch.ones(2, dtype=torch.float64))
    assert torch.allclose(weighted_pearson(disp, -disp, op), -torch.ones(2, dtype=torch.float64))
    # An "estimator" that returns the NeRF's own disparity (a smaller map, resized up) gives phi = 0.
    small = torch.nn.functional.avg_pool2d(disp[:, None], 2)[:, 0]
    x_t = torch.zeros(2, 3, 16, 16, dtype=torch.float64)
    up = torch.nn.functional.interpolate(small[:, None], size=(32, 32), mode="bilinear", align_corners=False)[:, 0]
    phi, _ = depth_baseline(x_t, up, op, lambda img: small + 0 * img.mean())
    assert torch.allclose(phi, torch.zeros(2, dtype=torch.float64), atol=1e-6)
    # Reversed depth (near read as far) gives 2; a map unrelated to the NeRF's about 1.
    phi, _ = depth_baseline(x_t, up, op, lambda img: -small + 0 * img.mean())
    assert torch.allclose(phi, torch.full((2,), 2.0, dtype=torch.float64), atol=1e-6)
    noise = torch.randn(2, 32, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    phi, _ = depth_baseline(x_t, up, op, lambda img: noise + 0 * img.mean())
    assert ((phi - 1).abs() < 0.15).all(), phi
    # Weights matter: outside-the-mask pixels do not count.
    noisy = disp + 10 * (1 - op) * torch.randn_like(disp)
    assert torch.allclose(weighted_pearson(disp, noisy, (op == 1).double()), torch.ones(2, dtype=torch.float64))


def test_constant_baseline_mu_one_is_sds():
    x_t, e, n = (torch.randn(3, 4, 8, 8) for _ in range(3))
    w, s = torch.rand(3), torch.rand(3)
    phi, gphi = constant_baseline(x_t)
    assert torch.equal(ssd(e, control_variate(n, phi, gphi, s), 1.0, w), sds(e, n, w))


def test_normal_baseline(dpt):
    est = transformers_depth_estimator(dpt)
    disp, op = nerf_maps()
    w = op[:, None]
    n_nerf = normals_from_depth_map(disp[:, None], w)
    # Normals of the same map agree: phi = 0 when the estimator returns the NeRF's disparity.
    phi0, _ = normal_baseline(torch.zeros(2, 3, 8, 8, dtype=torch.float64), n_nerf, op,
                              lambda img: disp + 0 * img.mean())
    assert torch.allclose(phi0, torch.zeros(2, dtype=torch.float64), atol=1e-6)
    # Convention check: disparity growing to the right (closer on the right) tilts normals to -x;
    # growing downwards in the image (rows) tilts them to -y... i.e. towards +y (up) for y = -row.
    ramp_x = torch.linspace(0, 1, 32).double().expand(1, 1, 32, 32)
    ramp_row = ramp_x.transpose(-1, -2)
    full = torch.ones(1, 1, 32, 32, dtype=torch.float64)
    assert normals_from_depth_map(ramp_x, full)[0, 0].mean() < 0
    assert normals_from_depth_map(ramp_row, full)[0, 1].mean() > 0
    assert (normals_from_depth_map(ramp_x, full)[0, 2] > 0).all()
    # A flat estimate has normals (0, 0, 1): phi = 1 - the opacity-weighted mean z of the NeRF's normals.
    flat, _ = normal_baseline(torch.zeros(2, 3, 8, 8, dtype=torch.float64), n_nerf, op, lambda img: torch.ones_like(disp) + 0 * img.mean())
    assert torch.allclose(flat, 1 - (op * n_nerf[:, 2]).sum((1, 2)) / op.sum((1, 2)), atol=1e-9)
    x_t = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    phi, grad = normal_baseline(x_t, n_nerf, op, est)
    assert np.allclose(phi.numpy(), independent_phi("normal", x_t, n_nerf, op, est), atol=1e-9)
    assert grad.shape == x_t.shape and grad.abs().sum() > 0
    idx, step = (1, 0, 33, 17), 1e-6
    xp, xm = x_t.clone(), x_t.clone()
    xp[idx] += step
    xm[idx] -= step
    fd = (normal_baseline(xp, n_nerf, op, est)[0][1] - normal_baseline(xm, n_nerf, op, est)[0][1]) / (2 * step)
    assert float(grad[idx]) == pytest.approx(float(fd), rel=1e-4, abs=1e-9)


def test_estimator_normalisation_and_resize(dpt):
    """[-1, 1] images map to the processor's normalisation, and the input is resized to image_size."""
    seen = {}
    hook = dpt.register_forward_pre_hook(lambda m, args, kw: seen.update(x=kw["pixel_values"]), with_kwargs=True)
    try:
        img = torch.full((1, 3, 40, 40), 0.5, dtype=torch.float64)  # 0.75 in [0, 1]
        transformers_depth_estimator(dpt)(img)  # DPT default: mean = std = 0.5 -> 0.5
        assert seen["x"].shape[-2:] == (64, 64) and torch.allclose(seen["x"], torch.full_like(seen["x"], 0.5))
        proc = {"image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}
        out = transformers_depth_estimator(dpt, proc)(img)
        assert torch.allclose(seen["x"][0, :, 0, 0], (0.75 - torch.tensor(proc["image_mean"]).double())
                              / torch.tensor(proc["image_std"]).double())
        assert out.dim() == 3
    finally:
        hook.remove()
    assert not any(p.requires_grad for p in dpt.parameters())


def test_traced_estimator_matches_eager(dpt):
    """The traced critic (CPU default) gives the eager model's phi and d phi / d x_t, traced once per
    input shape: after its first call at a shape the Python model no longer runs."""
    calls = []
    hook = dpt.register_forward_hook(lambda *a: calls.append(1))
    try:
        eager, traced = transformers_depth_estimator(dpt), transformers_depth_estimator(dpt, trace=True)
        disp, op = nerf_maps()
        gen = torch.Generator().manual_seed(1)
        for b, python_calls in ((2, 2), (1, 2), (2, 0)):  # a new shape: the trace and its check
            x_t = torch.randn(b, 3, 48, 48, generator=gen, dtype=torch.float64)
            phi_e, grad_e = depth_baseline(x_t, disp[:b], op[:b], eager)
            n = len(calls)
            phi_t, grad_t = depth_baseline(x_t, disp[:b], op[:b], traced)
            assert torch.allclose(phi_t, phi_e, rtol=0, atol=1e-12)
            assert torch.allclose(grad_t, grad_e, rtol=1e-9, atol=1e-15) and grad_e.abs().sum() > 0
            assert len(calls) - n == python_calls
    finally:
        hook.remove()


def test_untraceable_estimator_runs_eagerly(dpt, caplog):
    """A model the tracer cannot follow still works, through the eager model, with one warning."""
    class Refuses(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner, self.config = dpt, dpt.config

        def forward(self, pixel_values):
            if torch.jit.is_tracing():
                raise RuntimeError("data-dependent control flow")
            return self.inner(pixel_values=pixel_values)

    x_t = torch.randn(1, 3, 48, 48, dtype=torch.float64)
    disp, op = nerf_maps(1)
    with caplog.at_level("WARNING"):
        phi, grad = depth_baseline(x_t, disp, op, transformers_depth_estimator(Refuses(), trace=True))
    ref_phi, ref_grad = depth_baseline(x_t, disp, op, transformers_depth_estimator(dpt))
    assert torch.equal(phi, ref_phi) and torch.equal(grad, ref_grad)
    assert [r.message for r in caplog.records] == ["depth model runs eagerly (could not trace it: data-dependent control flow)"]
