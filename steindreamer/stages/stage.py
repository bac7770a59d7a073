"""One distillation step, the same for every stage: render training views -> the model's input
space -> noise -> the engine's image-space gradient G -> one backward pass into the stage's
parameters. A stage (NeRF, mesh) says only how it renders, which t range it uses, what it
regularises and what it keeps in a checkpoint."""
from __future__ import annotations

import math
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np
import torch

from ..guidance.engines import injected_loss
from ..runfolder import fingerprint
from .context import Context


@dataclass(frozen=True)
class Cadence:
    """How long a stage runs and how often the loop checkpoints and renders it."""
    steps: int  # steps of this stage
    ckpt_every: int  # a checkpoint every N steps (and at the end)
    val_every: int  # a validation grid every N steps and at the end (0: none)
    keep: int  # checkpoints of this stage kept on disk
    variance_every: int = 0  # the cheap variance meter every N steps (0: off)
    variance_draws: int = 4  # extra (t, noise) draws per meter reading


class Stage(ABC):
    """A stage sets `name`, `cadence` and `optimizer` and says how it renders, which t range it
    draws from, what it regularises, and what its checkpoint holds."""

    name: str
    cadence: Cadence

    def __init__(self, ctx: Context):
        self.ctx, self.cfg = ctx, ctx.cfg
        self.device = ctx.device
        self.step_index = 0

    # --- what a stage provides ------------------------------------------------------------------
    @abstractmethod
    def render_train(self) -> tuple[dict, object]:
        """Random training views: (render dict of [B, H, W, C] maps, cameras)."""

    @abstractmethod
    def t_range(self) -> tuple[float, float]:
        """The (t_min, t_max) fractions of the schedule this step draws t from."""

    @abstractmethod
    def regularizers(self, out: dict, cams) -> torch.Tensor:
        """A scalar added to the distillation loss."""

    def notes(self) -> list[str]:
        """Lines for the person watching when the stage starts."""
        return []

    def after_update(self) -> dict:
        """Work after the parameter update (the NeRF's occupancy grid); returns numbers to log."""
        return {}

    def parameters(self) -> list[torch.Tensor]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    # --- the step ---------------------------------------------------------------------------------
    def step(self) -> dict:
        ctx = self.ctx
        timings = {}
        t0 = time.perf_counter()
        out, cams = self.render_train()
        x = ctx.guidance.encode(out["rgb"].permute(0, 3, 1, 2))
        timings["render"] = time.perf_counter() - t0
        cond = ctx.text_for(cams)
        t1 = time.perf_counter()
        t, noise = ctx.draw_noise(x, *self.t_range(), step=self.step_index)
        grad, logs = ctx.distiller.gradient(x, out, cams, cond, ctx.uncond, t, noise, generator=ctx.generator)
        finite = logs.pop("finite")
        every = self.cadence.variance_every
        if every > 0 and self.step_index % every == 0:
            logs["variance"] = self.variance_estimate(x, out, cams, cond, self.cadence.variance_draws)
        timings["guidance"] = time.perf_counter() - t1
        t2 = time.perf_counter()
        reg = self.regularizers(out, cams)
        loss = injected_loss(x.float(), grad) + reg
        skipped = not (finite and torch.isfinite(loss))
        if not skipped:
            loss.backward()
            skipped = not all(torch.isfinite(p.grad).all() for p in self.parameters() if p.grad is not None)
        if not skipped:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        timings["backward"] = time.perf_counter() - t2
        logs.update(self.after_update())
        self.step_index += 1
        return {"loss": float(loss.detach()) if not skipped else float("nan"), "reg": float(reg.detach()), "t": int(t[0]),
                "skipped": skipped, **logs, "grad_norm": float(grad.norm() / math.sqrt(grad.numel())),
                "opacity": float(out["opacity"].detach().mean()), **{f"time_{k}": v for k, v in timings.items()}}

    def variance_estimate(self, x, out, cams, cond, draws: int) -> float:
        """Cheap variance meter: mean per-element variance of G over a few extra (t, noise) draws at
        this render, learning nothing from them (the full meter is scripts/bench_engines.py)."""
        samples = []
        for _ in range(draws):
            t, noise = self.ctx.draw_noise(x, *self.t_range(), step=self.step_index, independent=True)
            g, _ = self.ctx.distiller.gradient(x, out, cams, cond, self.ctx.uncond, t, noise, update=False)
            samples.append(g.float())
        return float(torch.stack(samples).var(0, unbiased=True).mean())

    def state(self) -> dict:
        """A checkpoint: the stage's own state, the shared context's, and what resuming checks."""
        return {"stage": self.name, "step": self.step_index, **self.state_dict(), **self.ctx.state_dict(),
                "config": fingerprint(self.cfg), "prompt": self.ctx.prompt}

    @abstractmethod
    def state_dict(self) -> dict:
        """The stage's own tensors and optimizer state."""

    @abstractmethod
    def load_state_dict(self, state: dict) -> None:
        """Inverse of state_dict."""

    @abstractmethod
    def validation_grid(self) -> np.ndarray:
        """A picture of the stage now from a few fixed views (see image_grid)."""

    @abstractmethod
    def preview(self, cameras, height: int, width: int) -> np.ndarray:
        """One uint8 [H, W, 3] view for a person watching (the live viewer); no RNG, no gradients."""

    def load_state(self, state: dict) -> None:
        self.load_state_dict(state)
        self.ctx.load_state_dict(state)
        self.step_index = int(state["step"])


def image_grid(out: dict) -> np.ndarray:
    """A validation picture: top row RGB, bottom row opacity, one column per view."""
    rgb = out["rgb"].clamp(0, 1).cpu().numpy()
    alpha = out["opacity"].clamp(0, 1).expand_as(out["rgb"]).cpu().numpy()
    rows = [np.concatenate(list(rgb), 1), np.concatenate(list(alpha), 1)]
    return (np.concatenate(rows, 0) * 255).round().astype(np.uint8)
