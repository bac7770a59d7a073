"""Exact variance reducers for any engine's noise draws (docs/method.md, "Variance, measured honestly").

A step renders B views once; the engine then sees K draws (t, eps) per view, K = `NoiseConfig.draws`,
and the K image-space gradients are averaged before the one backward pass into the 3D model. Every
draw keeps the marginal law of plain sampling (t uniform on the schedule's integer range, eps
standard normal), so the average has plain SDS's (VSD's, SSD's) mean:

    antithetic   draws come in pairs (eps, -eps) at one t: the part of G odd in eps cancels exactly
    stratified   the N distinct t of a step take one uniform point in each of N equal strata, the
                 strata dealt to draws in random order
    sequence     each view's t is its coordinate of the run's view sequence (steindreamer/sequence.py,
                 low-discrepancy across views and steps, jointly with the cameras when
                 camera.sampling=sequence); a view's K draws are that point moved by k/K
Draws are laid out draw-major: row k * B + b is draw k of view b. Pure functions; the caller owns
the random generator.
"""
from __future__ import annotations

from typing import Literal, get_args

import torch

TSampling = Literal["iid", "stratified", "sequence"]
T_SAMPLINGS = get_args(TSampling)


def uniforms(n: int, mode: str, generator: torch.Generator | None, base: torch.Tensor | None = None) -> torch.Tensor:
    """n points in [0, 1), each marginally uniform. iid: independent; stratified: one in each of n
    strata [i/n, (i+1)/n), in random order; sequence: for B = len(base) views (base uniform, e.g. the
    views' coordinates of a randomly shifted sequence), n / B draws per view, draw-major, draw k of
    view b at frac(base_b + k B / n)."""
    if mode == "iid":
        return torch.rand(n, generator=generator, dtype=torch.float64)
    if mode == "stratified":
        order = torch.randperm(n, generator=generator)
        return (order.double() + torch.rand(n, generator=generator, dtype=torch.float64)) / n
    if mode == "sequence":
        if base is None or n % len(base):
            raise ValueError(f"sequence sampling needs one base point per view and a whole number of draws each ({n} draws)")
        k = n // len(base)
        return torch.frac(base.double()[None, :] + torch.arange(k, dtype=torch.float64)[:, None] / k).flatten()
    raise ValueError(f"unknown t sampling {mode!r}; expected one of {T_SAMPLINGS}")


def timesteps_from_uniforms(u: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Integer timesteps uniform on [lo, hi] from uniforms u in [0, 1) (inverse CDF)."""
    return (lo + torch.floor(u * (hi - lo + 1))).clamp(lo, hi).long()


def draw_plan(shape: tuple[int, ...], lo: int, hi: int, draws: int, antithetic: bool, mode: str,
              generator: torch.Generator | None, base: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(t [K B], eps [K B, ...]) for K = `draws` draws of each of the B = shape[0] images, draw-major.
    With `antithetic` draws K/2..K-1 repeat the first half's t with -eps (K must be even). `base` [B]:
    the views' uniforms for t_sampling=sequence.
    With draws=1, antithetic off and mode iid this consumes the generator exactly as one
    `randint` of B timesteps then one `randn` of `shape` (plain sampling, bit for bit)."""
    b = shape[0]
    if antithetic and draws % 2:
        raise ValueError(f"antithetic draws come in pairs: draws must be even, got {draws}")
    distinct = (draws // 2 if antithetic else draws) * b
    if mode == "iid" and draws == 1:
        t = torch.randint(lo, hi + 1, (b,), generator=generator)
    else:
        t = timesteps_from_uniforms(uniforms(distinct, mode, generator, base), lo, hi)
    noise = torch.randn((distinct, *shape[1:]), generator=generator)
    if antithetic:
        t, noise = torch.cat([t, t]), torch.cat([noise, -noise])
    return t, noise


def repeat_draws(x: torch.Tensor, draws: int) -> torch.Tensor:
    """[B, ...] -> [K B, ...], draw-major (row k B + b is view b)."""
    return x if draws == 1 else x.repeat(draws, *([1] * (x.dim() - 1)))


def average_draws(g: torch.Tensor, draws: int) -> torch.Tensor:
    """[K B, ...] -> [B, ...]: the mean over each view's K draws."""
    return g if draws == 1 else g.reshape(draws, g.shape[0] // draws, *g.shape[1:]).mean(0)
