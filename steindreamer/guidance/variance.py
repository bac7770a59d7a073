"""Gradient-variance meter (docs/method.md, "Variance"): draw K independent estimates at a fixed
theta and report the mean per-element variance of G (image space) and of the theta-gradient it
induces. Pure functions over callables; Welford accumulation keeps memory at two copies of a sample.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
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


# --------------------------------------------------------------------------------------------------
# The honest meter (docs/method.md, "Variance, measured honestly"): a nested design (C cameras, T
# timesteps per camera, E noises per (camera, t)) splits Var(G) into camera, t and eps parts; the
# per-step variance of any estimator configuration comes with a bootstrap interval, per unit cost.
# --------------------------------------------------------------------------------------------------
@dataclass
class NestedMoments:
    """What the nested decomposition needs, accumulated one (camera, t) group at a time: each
    group's mean [P] and the mean over elements of its unbiased within-group (eps) variance."""
    means: list[list[torch.Tensor]]  # [C][T] group means
    inner: list[list[float]]  # [C][T] mean per-element variance over the group's E draws
    e: int  # draws per group


def group_moments(samples: Sequence[torch.Tensor]) -> tuple[torch.Tensor, float]:
    """(mean, mean per-element unbiased variance) of one group's E flat samples."""
    s = Welford()
    for x in samples:
        s = welford_update(s, x)
    return s.mean, welford_variance(s)


def nested_components(m: NestedMoments) -> dict:
    """Var(G) of one draw at random (camera, t, eps) as camera + t + eps parts (mean per element),
    unbiased under the nested design: eps = E_{c,t} Var(G | c, t) (what any eps control variate can
    at most remove), t = E_c Var_t(E[G | c, t]), camera = Var_c(E[G | c]). `inner_fraction` = eps / total."""
    means = torch.stack([torch.stack(row) for row in m.means])  # [C, T, P]
    c, t = means.shape[:2]
    eps = float(torch.tensor(m.inner, dtype=torch.float64).mean())
    t_part = float(means.var(1, unbiased=True).mean()) - eps / m.e if t > 1 else float("nan")
    cam = float(means.mean(1).var(0, unbiased=True).mean()) - (t_part if t > 1 else 0.0) / t - eps / (t * m.e) if c > 1 else float("nan")
    total = cam + t_part + eps
    return {"camera": cam, "t": t_part, "eps": eps, "total": total, "inner_fraction": eps / total}


class StepSamples:
    """Independent per-step estimates of a flat gradient (at fixed theta), kept as their Gram matrix,
    so the mean per-element variance of any resample is exact and cheap (bootstrap). The samples
    themselves are needed only while more are added: `close` lets them go."""

    def __init__(self):
        self.rows: list[torch.Tensor] | None = []
        self.gram = torch.zeros(0, 0, dtype=torch.float64)
        self.count, self.size = 0, 0

    def add(self, x: torch.Tensor) -> None:
        if self.rows is None:
            raise RuntimeError("StepSamples is closed: its samples were released")
        x = x.detach().flatten().double()
        dots = torch.stack([row @ x for row in self.rows] + [x @ x])
        n = self.count
        g = torch.zeros(n + 1, n + 1, dtype=torch.float64)
        g[:n, :n] = self.gram
        g[n, :], g[:, n] = dots, dots
        self.gram, self.count, self.size = g, n + 1, x.numel()
        self.rows.append(x)

    def close(self) -> None:
        """Release the samples (the Gram matrix is all `variance` needs)."""
        self.rows = None

    def variance(self, idx: torch.Tensor | None = None) -> float:
        """Mean per-element unbiased variance of the samples at `idx` (a multiset; all by default)."""
        idx = torch.arange(self.count) if idx is None else idx
        m = len(idx)
        k = self.gram[idx][:, idx]
        return float((k.diagonal().sum() - k.sum() / m) / ((m - 1) * self.size))


def bootstrap_ratio(pairs: Sequence[tuple[StepSamples, StepSamples]], n_boot: int = 2000, level: float = 0.9,
                    seed: int = 0) -> dict:
    """The mean over `pairs` (e.g. checkpoints) of Var(a) / Var(b), with a percentile bootstrap
    interval (every sample set resampled independently in each replicate)."""
    gen = torch.Generator().manual_seed(seed)

    def resampled(s: StepSamples) -> float:
        return s.variance(torch.randint(s.count, (s.count,), generator=gen))

    boots = torch.tensor([float(np.mean([resampled(a) / max(resampled(b), 1e-300) for a, b in pairs])) for _ in range(n_boot)],
                         dtype=torch.float64)
    lo, hi = torch.quantile(boots, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)).tolist()
    return {"ratio": float(np.mean([a.variance() / b.variance() for a, b in pairs])), "interval": [lo, hi], "level": level}


def bucket_ratios(nested: list[dict], t_range: tuple[int, int], buckets: int, seed: int) -> dict:
    """Per t bucket and name: mean eps variance over SDS's at the same draws, with a 90 % bootstrap
    interval over (render, t) groups. `nested`: per checkpoint {"t": [C][T] timesteps, "inner": {name:
    [C][T] eps variances}}, "sds" among the names; an empty bucket is None."""
    lo, hi = t_range
    gen = torch.Generator().manual_seed(seed)
    edges = np.linspace(lo, hi + 1, buckets + 1)
    out = {}
    names = [n for n in nested[0]["inner"] if n != "sds"]
    for b in range(buckets):
        rows = [(i, c, k) for i, nd in enumerate(nested) for c, row in enumerate(nd["t"]) for k, t in enumerate(row)
                if edges[b] <= t < edges[b + 1]]
        key = f"{int(edges[b])}-{int(edges[b + 1]) - 1}"
        if not rows:
            out[key] = None
            continue
        val = {n: torch.tensor([nested[i]["inner"][n][c][k] for i, c, k in rows], dtype=torch.float64) for n in names + ["sds"]}
        entry = {"groups": len(rows)}
        for n in names:
            boots = []
            for _ in range(1000):
                idx = torch.randint(len(rows), (len(rows),), generator=gen)
                boots.append(float(val[n][idx].mean() / val["sds"][idx].mean()))
            entry[n] = {"ratio": float(val[n].mean() / val["sds"].mean()), "interval": np.quantile(boots, [0.05, 0.95]).tolist()}
        out[key] = entry
    return out
