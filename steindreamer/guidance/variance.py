"""Gradient-variance meter (docs/method.md, "Variance"): draw K independent estimates at a fixed
theta and report the mean per-element variance of G (image space) and of the theta-gradient it
induces. Pure functions over callables; Welford accumulation keeps memory at two copies of a sample.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .engines import injected_loss


@dataclass
class Welford:
    """Running mean and sum of squared deviations of a flat tensor."""
    n: int = 0
    mean: torch.Tensor | None = None
    m2: torch.Tensor | None = None


def welford_update(s: Welford, x: torch.Tensor) -> Welford:
    x = x.detach().flatten().double()
    if s.n == 0:
        return Welford(1, x.clone(), torch.zeros_like(x))
    n = s.n + 1
    delta = x - s.mean
    mean = s.mean + delta / n
    return Welford(n, mean, s.m2 + delta * (x - mean))


def welford_variance(s: Welford) -> float:
    """Mean over elements of the unbiased per-element variance."""
    if s.n < 2:
        raise ValueError("need at least two samples for a variance")
    return float((s.m2 / (s.n - 1)).mean())


def _flat(x: torch.Tensor | Sequence[torch.Tensor | None]) -> torch.Tensor:
    if torch.is_tensor(x):
        return x.flatten()
    return torch.cat([g.flatten() for g in x if g is not None])


@dataclass
class VarianceReport:
    var_image: float          # mean per-element Var(G)
    var_theta: float | None   # mean per-element Var(dL/dtheta), None if the draws gave no theta-grad
    mean_sq_image: float      # mean per-element (E G)^2, the signal the variance is compared with
    k: int


def gradient_variance(draw: Callable[[int], tuple], k: int) -> VarianceReport:
    """`draw(i)` returns (G, theta_grad) for the i-th independent draw at fixed theta (theta_grad a
    tensor, a sequence of tensors, or None). Returns per-element variances over the K draws."""
    img, th = Welford(), Welford()
    for i in range(k):
        g, tg = draw(i)
        img = welford_update(img, g)
        if tg is not None:
            th = welford_update(th, _flat(tg))
    return VarianceReport(var_image=welford_variance(img),
                          var_theta=welford_variance(th) if th.n else None,
                          mean_sq_image=float((img.mean ** 2).mean()), k=k)


def induced_theta_grad(x: torch.Tensor, g: torch.Tensor, params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """d injected_loss(x, G) / d theta without touching .grad (x = render, with graph to params)."""
    grads = torch.autograd.grad(injected_loss(x, g), list(params), retain_graph=True, allow_unused=True)
    return [torch.zeros_like(p) if q is None else q for p, q in zip(params, grads)]
