"""Recovery from divergence, the same for every stage."""
from __future__ import annotations

import copy

import torch

from ..errors import RunFailed


class DivergenceGuard:
    """A step with NaN/Inf in G, the loss or the gradients is skipped (Stage.step). After
    `nan_patience` bad steps in a row the last good state (the newest checkpoint's, kept in memory)
    comes back with every learning rate at its value when the guard started times
    `restore_lr_factor ** restores`; after `max_restores` restores the run stops with one line, its
    last good checkpoint intact on disk."""

    def __init__(self, stage, cfg):
        self.stage, self.cfg = stage, cfg
        self.bad = 0
        self.restores = 0
        # Set, not scaled, on each restore: the remembered state may carry an already lowered rate.
        self.base_lr = [group["lr"] for group in stage.optimizer.param_groups]
        self.remember()

    def remember(self) -> None:
        self.good = copy.deepcopy(self.stage.state())

    def healthy(self) -> bool:
        return self.bad == 0 and all(torch.isfinite(p).all() for p in self.stage.parameters())

    @property
    def lr_factor(self) -> float:
        return self.cfg.restore_lr_factor ** self.restores

    def check(self, info: dict) -> str | None:
        """Call after each step with its logged info; returns a line to show when it restored."""
        if not info.get("skipped") and self.healthy():
            self.bad = 0
            return None
        self.bad += 1
        if self.bad < self.cfg.nan_patience:
            return None
        if self.restores >= self.cfg.max_restores:
            raise RunFailed(f"training diverged: {self.bad} non-finite steps in a row after {self.restores} restores with lower learning rates; "
                            f"last good checkpoint kept ({self.stage.name} step {self.good['step']})")
        self.restores += 1
        step = self.stage.step_index
        self.stage.load_state(copy.deepcopy(self.good))
        self.stage.step_index = step  # keep counting forward: the restored state resumes from here
        for group, lr in zip(self.stage.optimizer.param_groups, self.base_lr):
            group["lr"] = lr * self.lr_factor
        self.bad = 0
        return (f"{self.stage.name} step {step}: {self.cfg.nan_patience} non-finite steps in a row; restored the state of step "
                f"{self.good['step']} with learning rates x{self.lr_factor:g}")
