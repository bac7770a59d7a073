"""f-distill's density ratio r = p_t / q_t and its weights h(r) for the VSD engine.

A discriminator D(x_t, t) is trained alongside the LoRA, by logistic regression, to tell noisy
samples of the frozen teacher (p: a pool drawn once per run, guidance/teacher_pool.py) from noisy
renders (the student, q) at the same t. At its optimum its logit is log p_t(x)/q_t(x), so
r = D / (1 - D) = exp(logit). The gradient of D_f(p || q) is then VSD's score difference weighted by
h(r) = r^2 f''(r) (engines.f_divergence_weight; Xu, Nie, Vahdat: "One-step Diffusion Models with
f-Divergence Distribution Matching").

h is divided by its mean over the last few steps' batches, the current one included (f-distill
divides by the batch mean; at the batch sizes of score distillation, 1 to 4 views, that alone would
make every h close to 1), and clipped to `guidance.vsd.h_clip`, so that one sample cannot dominate a
step. The window is short because r drifts by orders of magnitude as the discriminator learns: a
slow running mean (decay 0.99) lagged behind a falling r and pinned every h to the clip's floor from
step ~60 of a toy run on, which only shrank VSD's steps 5x
(benchmarks/quality_builtin_quick_vsd_kl_running_mean.json).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .engines import f_divergence_weight

LOG_R_CLIP = 8.0  # |log r| beyond this is the discriminator's overconfidence, not a ratio


def _time_features(t: torch.Tensor, dim: int = 16) -> torch.Tensor:
    """Fourier features of t in [0, 1] ([B] -> [B, dim])."""
    freqs = torch.exp(torch.linspace(0.0, math.log(100.0), dim // 2, device=t.device))
    angles = t.float()[:, None] * freqs[None] * math.pi
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class ConvRatioNet(nn.Module):
    """logit(x_t, t) for images in the model's space [B, C, H, W]: three convolutions (two strided),
    pooled, plus an embedding of t."""

    def __init__(self, channels: int, width: int = 32):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1), nn.SiLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1), nn.SiLU())
        self.time = nn.Sequential(nn.Linear(16, 2 * width), nn.SiLU(), nn.Linear(2 * width, 2 * width))
        self.head = nn.Sequential(nn.SiLU(), nn.Linear(2 * width, 2 * width), nn.SiLU(), nn.Linear(2 * width, 1))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h = self.features(x).mean(dim=(2, 3)) + self.time(_time_features(t))
        return self.head(h).squeeze(-1)


class MLPRatioNet(nn.Module):
    """logit(x_t, t) for vectors [B, D] (the analytic harness)."""

    def __init__(self, dim: int, width: int = 64):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim + 16, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(), nn.Linear(width, 1))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([x.flatten(1).float(), _time_features(t)], dim=1)).squeeze(-1)


class DensityRatio:
    """A discriminator between p (label 1) and q (label 0) samples at the same noise level, and the
    ratio it implies. `t` is always the fraction of the schedule, in [0, 1]."""

    def __init__(self, net: nn.Module, lr: float = 1e-3):
        self.net = net
        self.opt = torch.optim.Adam(net.parameters(), lr=lr)
        self.steps = 0

    def log_ratio(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.net(x_t.float(), t).clamp(-LOG_R_CLIP, LOG_R_CLIP)

    def ratio(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.log_ratio(x_t, t).exp()

    def train_step(self, p_t: torch.Tensor, q_t: torch.Tensor, t_p: torch.Tensor, t_q: torch.Tensor) -> float:
        """One logistic-regression step on a batch of p and one of q; returns the loss. Trains under a
        caller's no_grad too (the variance meter draws whole steps so), as the LoRA does."""
        with torch.enable_grad():
            logits = self.net(torch.cat([p_t, q_t]).float(), torch.cat([t_p, t_q]))
            labels = torch.cat([torch.ones(len(p_t)), torch.zeros(len(q_t))]).to(logits)
            loss = F.binary_cross_entropy_with_logits(logits, labels)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.steps += 1
        return float(loss.detach())

    def state_dict(self) -> dict:
        return {"net": self.net.state_dict(), "opt": self.opt.state_dict(), "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.net.load_state_dict(state["net"])
        self.opt.load_state_dict(state["opt"])
        self.steps = int(state["steps"])


class FWeight:
    """h(r) for one divergence, over its mean across the last `window` batches (this one included),
    clipped to [lo, hi]."""

    def __init__(self, kind: str, clip: tuple[float, float] = (0.2, 5.0), window: int = 8):
        self.kind, self.clip, self.window = kind, (float(clip[0]), float(clip[1])), window
        self.recent: list[float] = []  # the batch means of h, newest last

    def __call__(self, r: torch.Tensor, update: bool = True) -> torch.Tensor:
        h = f_divergence_weight(self.kind, r.double(), normalize=False)
        means = (self.recent + [float(h.mean())])[-self.window:]
        if update:
            self.recent = means
        return (h / max(sum(means) / len(means), 1e-300)).clamp(*self.clip).float()

    def state_dict(self) -> dict:
        return {"recent": list(self.recent)}

    def load_state_dict(self, state: dict) -> None:
        self.recent = [float(m) for m in state.get("recent", [])]
