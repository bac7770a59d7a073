"""The losses of the built-in models' training (scripts/train_builtin.py), as pure functions over tensors:
LCSS for the diffusion UNet (--objective lcss) and the scale-and-shift-invariant depth loss."""
from __future__ import annotations

import torch


def align_scale_shift(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-image least-squares s ≥ 0, b minimising ||s pred + b - target||² over mask; returns s pred + b.
    (s ≥ 0: an inverted prediction must not be rewarded.)"""
    m = mask.float()
    n = m.sum(dim=(1, 2)).clamp(min=1)
    mp, mt = (m * pred).sum(dim=(1, 2)) / n, (m * target).sum(dim=(1, 2)) / n
    cov = (m * (pred - mp[:, None, None]) * (target - mt[:, None, None])).sum(dim=(1, 2))
    var = (m * (pred - mp[:, None, None]) ** 2).sum(dim=(1, 2)).clamp(min=1e-8)
    s = (cov / var).clamp(min=0)
    return s[:, None, None] * (pred - mp[:, None, None]) + mt[:, None, None]


def ssi_loss(pred, target, mask):
    return ((align_scale_shift(pred, target, mask) - target).abs() * mask).sum() / mask.sum().clamp(min=1)


def lcss_loss(score_fn, x: torch.Tensor, u: torch.Tensor, sigma, centred: bool = True) -> torch.Tensor:
    """Per-sample LCSS loss  ½‖s(x)‖² + u·(s(x + σu) − s(x))/σ,  u ~ N(0, I), summed over all but dim 0.

    Score matching is E[½‖s(x)‖² + tr ∇s(x)]. Smoothing the trace over x' ~ N(x, σ²I), Stein's identity
    gives E_x'[tr ∇s(x')] = E_u[u·s(x + σu)]/σ: no Jacobian. u·s(x)/σ has mean zero for every s, so
    subtracting it (centred=True) leaves the expectation and its θ-gradient unchanged and only removes
    the O(√d/σ) noise of the plain estimator (centred=False). For a linear s the trace term is exact for
    any σ; otherwise it is tr ∇s averaged over the σ-neighbourhood. ½‖s‖² stays at x: taken at x + σu it
    would be DSM, whose minimiser is the score of p * N(0, σ²I). score_fn is called once, on the stacked
    batch [x; x + σu] (conditioning repeated by the caller). sigma: a number or a tensor broadcasting to x."""
    s0, s1 = score_fn(torch.cat([x, x + sigma * u])).chunk(2)
    dims = tuple(range(1, x.dim()))
    return 0.5 * (s0 ** 2).sum(dims) + (u * ((s1 - s0) if centred else s1) / sigma).sum(dims)


def lcss_eps_loss(eps_fn, xt: torch.Tensor, u: torch.Tensor, sig: torch.Tensor, rel_sigma: float) -> torch.Tensor:
    """LCSS for an ε-predictor at noise level σ_t (sig, [B,1,...]): s = -ε̂/σ_t, radius rel_sigma·σ_t, weight
    2σ_t²/d, which puts it in DSM's units: for a linear ε̂ its expectation is E mean((ε̂ - ε)²) minus 1."""
    per = lcss_loss(lambda y: -eps_fn(y) / torch.cat([sig, sig]), xt, u, rel_sigma * sig)
    return per * 2 * sig.flatten() ** 2 / xt[0].numel()
