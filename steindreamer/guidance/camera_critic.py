"""A camera critic: a small classifier p(azimuth | x_t, t, y) on the diffusion model's noisy inputs.
Its log-probability gradient makes a text-only prior camera-conditioned by classifier guidance
(Dhariwal & Nichol 2021), from Bayes' rule p(x_t | y, c) ∝ p(x_t | y) p(c | x_t, y):

    ε̂(x_t; y, c) = ε̂(x_t; y) − s σ_t ∇_{x_t} log p(c | x_t, y)

s = 1 is Bayes' rule; a critic that is less certain than the truth needs s > 1. For score
distillation this gives each rendered view a score that knows where the camera is, so a shape with
a symmetry about the vertical axis (a cube, a pyramid) has one right yaw instead of a circle of them.

The azimuth is predicted as a distribution over `bins` equal sectors (soft targets: a wrapped
Gaussian of `target_deg` around the true azimuth); log p at any azimuth interpolates the sectors'
log-probabilities linearly around the circle, so it is smooth in the camera. t enters as a
sinusoidal embedding, the text as its mean-pooled token embeddings (the diffusion model's own text
encoder), both through FiLM in every block. A critic folder holds config.json and
model.safetensors; a diffusion model's card (steindreamer.json) names it under "camera_critic".
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..fsio import atomic_save, atomic_write

CONFIG, WEIGHTS = "config.json", "model.safetensors"


@dataclass
class CameraCriticConfig:
    in_channels: int = 3  # the diffusion model's input channels (pixels or latents)
    text_dim: int = 64  # the text encoder's hidden size (0: no text input)
    width: int = 32  # channels of the first block (then 2x, 4x, 4x)
    embed_dim: int = 64  # FiLM embedding of t and text
    bins: int = 36  # azimuth sectors
    target_deg: float = 7.5  # std of the soft targets around the true azimuth


class _Block(nn.Module):
    def __init__(self, c_in: int, c_out: int, embed: int, down: bool):
        super().__init__()
        self.conv1, self.norm1 = nn.Conv2d(c_in, c_out, 3, padding=1), nn.GroupNorm(8, c_out)
        self.film = nn.Linear(embed, 2 * c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, stride=2 if down else 1)
        self.norm2 = nn.GroupNorm(8, c_out)

    def forward(self, h: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        scale, shift = self.film(e)[:, :, None, None].chunk(2, 1)
        h = nn.functional.silu(self.norm1(self.conv1(h)) * (1 + scale) + shift)
        return nn.functional.silu(self.norm2(self.conv2(h)))


class CameraCritic(nn.Module):
    def __init__(self, cfg: CameraCriticConfig):
        super().__init__()
        self.cfg = cfg
        e = cfg.embed_dim
        self.t_mlp = nn.Sequential(nn.Linear(e, e), nn.SiLU(), nn.Linear(e, e))
        self.text_mlp = nn.Sequential(nn.Linear(cfg.text_dim, e), nn.SiLU(), nn.Linear(e, e)) if cfg.text_dim else None
        widths = [cfg.width, 2 * cfg.width, 4 * cfg.width, 4 * cfg.width]
        self.blocks = nn.ModuleList(_Block(c_in, c_out, e, down=i < 3)
                                    for i, (c_in, c_out) in enumerate(zip([cfg.in_channels, *widths], widths)))
        self.head = nn.Linear(widths[-1], cfg.bins)

    def embed(self, t: torch.Tensor, text: torch.Tensor | None) -> torch.Tensor:
        dtype = self.head.weight.dtype
        half = self.cfg.embed_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float64) / half)
        angle = t.double()[:, None] * freqs[None]
        e = self.t_mlp(torch.cat([angle.sin(), angle.cos()], 1).to(dtype))
        if self.text_mlp is not None and text is not None:
            e = e + self.text_mlp(text.to(dtype).mean(1))  # [B, L, D] token embeddings, mean-pooled
        return e

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, text: torch.Tensor | None = None) -> torch.Tensor:
        """Azimuth logits [B, bins] for noisy inputs x_t [B, C, H, W] at integer times t [B]."""
        e, h = self.embed(t, text), x_t.to(self.head.weight.dtype)
        for block in self.blocks:
            h = block(h, e)
        return self.head(h.mean((2, 3)))

    def log_prob(self, x_t, t, text, azimuth_deg: torch.Tensor) -> torch.Tensor:
        return azimuth_log_prob(self(x_t, t, text), azimuth_deg)

    def save_pretrained(self, folder: str | Path) -> None:
        from safetensors.torch import save_file

        folder = Path(folder)
        tensors = {k: v.contiguous() for k, v in self.state_dict().items()}
        atomic_save(folder / WEIGHTS, lambda tmp: save_file(tensors, str(tmp)))
        atomic_write(folder / CONFIG, json.dumps(asdict(self.cfg), indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> "CameraCritic":
        from safetensors.torch import load_file

        folder = Path(folder)
        critic = cls(CameraCriticConfig(**json.loads((folder / CONFIG).read_text())))
        critic.load_state_dict(load_file(str(folder / WEIGHTS)))
        return critic.eval().requires_grad_(False)


def _sector_centres(bins: int, device=None) -> torch.Tensor:
    return -180.0 + (torch.arange(bins, device=device) + 0.5) * (360.0 / bins)


def azimuth_log_prob(logits: torch.Tensor, azimuth_deg: torch.Tensor) -> torch.Tensor:
    """log p(azimuth) [B]: the sectors' log-probabilities interpolated linearly around the circle
    (exact at sector centres, continuous across ±180°)."""
    bins = logits.shape[1]
    logp = torch.log_softmax(logits, 1)
    pos = torch.remainder(azimuth_deg.to(logits.device, logits.dtype) + 180.0 - 180.0 / bins, 360.0) / (360.0 / bins)
    lo = pos.floor()
    frac = pos - lo
    i0 = lo.long() % bins
    i1 = (i0 + 1) % bins
    return (1 - frac) * logp.gather(1, i0[:, None])[:, 0] + frac * logp.gather(1, i1[:, None])[:, 0]


def soft_targets(azimuth_deg: torch.Tensor, bins: int, std_deg: float) -> torch.Tensor:
    """A wrapped Gaussian over the sectors around each azimuth [B] -> [B, bins], rows summing to 1."""
    d = torch.remainder(azimuth_deg[:, None] - _sector_centres(bins, azimuth_deg.device)[None] + 180.0, 360.0) - 180.0
    w = torch.exp(-0.5 * (d / std_deg) ** 2)
    return w / w.sum(1, keepdim=True)


def guidance_term(critic: CameraCritic, x_t: torch.Tensor, t: torch.Tensor, text: torch.Tensor | None,
                  azimuth_deg: torch.Tensor, sigma: torch.Tensor, scale: float) -> torch.Tensor:
    """−s σ_t ∇_{x_t} log p(azimuth | x_t, t, text): what classifier guidance adds to ε̂ (x_t's shape
    and dtype; computed in float32 with no graph to anything but x_t)."""
    with torch.enable_grad():
        # channels_last: 1.4x faster through the critic's convolutions on a CPU (6.0 -> 4.4 ms at 2x3x32x32)
        x = x_t.detach().float().contiguous(memory_format=torch.channels_last).requires_grad_(True)
        logp = critic.log_prob(x, t, None if text is None else text.detach(), azimuth_deg).sum()
        (grad,) = torch.autograd.grad(logp, x)
    return (-scale * sigma.float().view(-1, *[1] * (x.dim() - 1)) * grad).to(x_t.dtype)


def train_camera_critic(critic: CameraCritic, batches: Callable[[torch.Generator], tuple], alphas_cumprod: torch.Tensor,
                        steps: int, lr: float = 2e-3, seed: int = 0, log: Callable[[str], None] | None = None) -> list[float]:
    """Fit the critic by cross-entropy to soft azimuth targets on noised inputs, t uniform over the
    schedule. `batches(generator)` returns (x0 [B, C, H, W] in model space, azimuth_deg [B], text
    [B, L, D] or None). AdamW with a 2 % warm-up and cosine decay to 5 %. Returns the losses."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(critic.parameters(), lr=lr, weight_decay=0.01)
    abar = alphas_cumprod.float()
    losses = []
    critic.train()
    for step in range(steps):
        progress = step / max(1, steps)
        factor = min(1.0, progress / 0.02) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))
        for group in opt.param_groups:
            group["lr"] = lr * factor
        x0, azimuth, text = batches(gen)
        t = torch.randint(0, len(abar), (x0.shape[0],), generator=gen)
        a = abar[t].view(-1, *[1] * (x0.dim() - 1))
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * torch.randn(x0.shape, generator=gen)
        logits = critic(x_t, t, text)
        loss = -(soft_targets(azimuth, critic.cfg.bins, critic.cfg.target_deg) * torch.log_softmax(logits, 1)).sum(1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if log is not None and (step + 1) % 200 == 0:
            log(f"camera critic step {step + 1}/{steps} loss {sum(losses[-200:]) / 200:.3f}")
    return losses
