"""Analytic harness: targets with closed-form noised scores under Stable Diffusion's schedule.

p_0 is a diagonal Gaussian mixture in R^d; after x_t = alpha_t x_0 + sigma_t eps (alpha_t, sigma_t from
`sd_schedule().alpha_sigma(t)`) every component is
N(alpha m_k, alpha^2 s_k^2 + sigma^2), so the exact noise prediction eps_hat = -sigma grad log p_t and
the density are closed form. Used by tests and variance benchmarks in place of a diffusion model.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from .schedule import NoiseSchedule


def sd_schedule(dtype: torch.dtype = torch.float64) -> NoiseSchedule:
    """Stable Diffusion's schedule (scaled_linear, 0.00085..0.012, 1000 steps), computed in float64
    by default: the harness's closed forms are checked to Monte-Carlo precision, not to float32's."""
    return NoiseSchedule.scaled_linear(1000, 0.00085, 0.012, dtype=dtype)


def diffuse(x: torch.Tensor, noise: torch.Tensor, alpha, sigma) -> torch.Tensor:
    return alpha * x + sigma * noise


class GaussianMixture:
    """p_0 = sum_k pi_k N(m_k, diag(s_k^2)) in R^d. weights [K], means [K, d], stds [K, d] (or [d])."""

    def __init__(self, weights: torch.Tensor, means: torch.Tensor, stds: torch.Tensor):
        self.log_w = torch.log(weights / weights.sum())
        self.means = means
        self.stds = stds.expand_as(means)

    @classmethod
    def gaussian(cls, mean: torch.Tensor, std: torch.Tensor) -> "GaussianMixture":
        return cls(torch.ones(1, dtype=mean.dtype), mean[None], std.expand_as(mean)[None])

    def _components(self, x_t, alpha, sigma):
        """Per-component log densities [N, K] and score terms [N, K, d] at x_t [N, d]; alpha and
        sigma are scalars or per-sample [N] / [N, 1]."""
        alpha, sigma = (torch.as_tensor(v, dtype=x_t.dtype) for v in (alpha, sigma))
        if alpha.dim() > 0:
            alpha, sigma = alpha.reshape(-1, 1, 1), sigma.reshape(-1, 1, 1)
        var = alpha ** 2 * self.stds ** 2 + sigma ** 2           # [K, d] or [N, K, d]
        diff = x_t[:, None, :] - alpha * self.means[None]        # [N, K, d]
        logp = -0.5 * (diff ** 2 / var + torch.log(2 * math.pi * var)).sum(-1) + self.log_w
        return logp, -diff / var

    def log_prob(self, x_t: torch.Tensor, alpha, sigma) -> torch.Tensor:
        """log p_t(x_t) [N]."""
        logp, _ = self._components(x_t, alpha, sigma)
        return torch.logsumexp(logp, -1)

    def score(self, x_t: torch.Tensor, alpha, sigma) -> torch.Tensor:
        """grad log p_t(x_t) [N, d]."""
        logp, s = self._components(x_t, alpha, sigma)
        resp = torch.softmax(logp, -1)
        return (resp[..., None] * s).sum(1)

    def eps(self, x_t: torch.Tensor, alpha, sigma) -> torch.Tensor:
        """The exact noise prediction eps_hat = -sigma grad log p_t = E[eps | x_t] under p."""
        sigma = torch.as_tensor(sigma, dtype=x_t.dtype)
        return -(sigma.reshape(-1, 1) if sigma.dim() > 0 else sigma) * self.score(x_t, alpha, sigma)

    def eps_posterior_var(self, alpha, sigma) -> torch.Tensor:
        """Var(eps | x_t) per coordinate for a single Gaussian: alpha^2 s^2 / (alpha^2 s^2 + sigma^2)."""
        if self.means.shape[0] != 1:
            raise ValueError("closed form only for a single Gaussian")
        a2s2 = alpha ** 2 * self.stds[0] ** 2
        return a2s2 / (a2s2 + sigma ** 2)

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        k = torch.multinomial(self.log_w.exp(), n, replacement=True, generator=generator)
        z = torch.randn(n, self.means.shape[1], generator=generator, dtype=self.means.dtype)
        return self.means[k] + self.stds[k] * z


def random_cameras(n: int, d_out: int, d_theta: int, generator: torch.Generator,
                   dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """n random linear 'cameras' A_c [n, d_out, d_theta] for the generator x = A_c theta."""
    return torch.randn(n, d_out, d_theta, generator=generator, dtype=dtype) / math.sqrt(d_theta)


class RandomCNN(nn.Module):
    """A frozen random CNN: image [B, 3, H, W] -> map [B, H, W] (a stand-in depth network)."""

    def __init__(self, width: int = 8, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.net = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.Tanh(),
                                 nn.Conv2d(width, width, 3, padding=1), nn.Tanh(),
                                 nn.Conv2d(width, 1, 3, padding=1))
        with torch.no_grad():
            for p in self.parameters():  # own generator: independent of the global RNG
                p.copy_(torch.randn(p.shape, generator=g) * (0.6 if p.dim() > 1 else 0.1))
        self.requires_grad_(False)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        return self.net(img)[:, 0]
