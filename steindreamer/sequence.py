"""Randomised low-discrepancy sequences for a run's random choices (docs/method.md, "Variance, measured
honestly"): the Kronecker sequence R_d (Roberts 2018), point n = frac(shift + n alpha) with
alpha_i = phi_d^-(i+1) and phi_d the root of x^(d+1) = x + 1 (phi_1 is the golden ratio).

With `shift` uniform on [0, 1)^d every point is marginally uniform, so a draw that maps its uniform
through an inverse CDF keeps its law exactly; successive points fill [0, 1)^d far more evenly than
independent ones, so the choices of consecutive steps (cameras, t, shading) cover their range
together and the gradients the optimiser averages over a few steps vary less. Pure functions.
"""
from __future__ import annotations

import functools

import torch

# The run's view sequence: one point per rendered view, its coordinates in this order.
VIEW_DIMS = ("azimuth", "elevation", "distance", "fov", "t")


@functools.lru_cache(maxsize=None)
def _alphas(dim: int) -> tuple[float, ...]:
    x = 2.0
    for _ in range(200):  # fixed point of x = (1 + x)^(1 / (d + 1)), converges from above
        x = (1.0 + x) ** (1.0 / (dim + 1))
    return tuple((1.0 / x) ** (i + 1) for i in range(dim))


def alphas(dim: int) -> torch.Tensor:
    """R_d's steps (1/phi_d, 1/phi_d^2, ...), float64 [dim]."""
    if dim < 1:
        raise ValueError(f"a sequence needs at least one dimension, got {dim}")
    return torch.tensor(_alphas(dim), dtype=torch.float64)


def points(start: int, n: int, shift: torch.Tensor) -> torch.Tensor:
    """Points start .. start + n - 1 of R_d shifted by `shift` [d]: float64 [n, d] in [0, 1)."""
    shift = torch.as_tensor(shift, dtype=torch.float64)
    index = torch.arange(start, start + n, dtype=torch.float64)
    return torch.frac(shift[None, :] + index[:, None] * alphas(shift.numel())[None, :])
