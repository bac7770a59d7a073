"""The time budget that keeps the live viewer's share of a training run's wall time small."""
from __future__ import annotations

import time

VIEWER_SHARE = 0.2  # at most this share of wall time goes to the viewer while training


class FrameBudget:
    """Token bucket that keeps the viewer's share of wall time under `share`.

    Training time earns credit at share / (1 - share) seconds per second; everything the viewer does
    spends it. A frame is drawn only when the credit covers the expected cost of one, and the credit
    is capped near one frame's cost, so a browser that connects after an hour of training gets no
    burst. Over any long stretch: viewer time <= share * wall time (plus one frame)."""

    def __init__(self, share: float = VIEWER_SHARE, clock=time.perf_counter):
        if not 0.0 < share < 1.0:
            raise ValueError("share must be in (0, 1)")
        self.rate = share / (1.0 - share)
        self.clock = clock
        self.credit = 0.0
        self.frame_cost = 0.0  # running estimate of one frame's cost; 0 until one was measured
        self.viewer_seconds = 0.0
        self.other_seconds = 0.0  # training (everything outside the viewer), pauses excluded
        self._mark: float | None = None

    def enter(self) -> float:
        """Call when the viewer takes over the thread; credits the time since `leave()`."""
        now = self.clock()
        if self._mark is not None:
            earned = now - self._mark
            self.other_seconds += earned
            self.credit = min(self.credit + self.rate * earned, max(self.frame_cost, 0.05))
        return now

    def leave(self, entered: float, excluded: float = 0.0) -> None:
        """Call when handing the thread back; `excluded` is time spent paused (neither side's)."""
        now = self.clock()
        spent = max(0.0, now - entered - excluded)
        self.credit -= spent
        self.viewer_seconds += spent
        self._mark = now

    def allows_frame(self) -> bool:
        return self.credit >= self.frame_cost

    def measured_frame(self, seconds: float) -> None:
        self.frame_cost = seconds if self.frame_cost == 0.0 else 0.7 * self.frame_cost + 0.3 * seconds

    @property
    def share(self) -> float:
        total = self.viewer_seconds + self.other_seconds
        return self.viewer_seconds / total if total > 0 else 0.0
