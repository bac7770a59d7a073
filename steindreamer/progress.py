"""Progress display for long loops: step, loss, it/s and ETA (rich)."""
from __future__ import annotations

import time

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class StepProgress:
    def __init__(self, total: int, start: int = 0, enabled: bool = True, label: str = "nerf"):
        self.total, self.start, self.enabled, self.label = total, start, enabled, label
        self._progress = None
        self._t0 = time.perf_counter()

    def __enter__(self) -> "StepProgress":
        if self.enabled:
            self._progress = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[speed]} it/s"),
                TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
            )
            self._progress.start()
            self._task = self._progress.add_task(self.label, total=self.total, completed=self.start, loss="-", speed="-")
        return self

    def update(self, step: int, loss: float | None = None) -> None:
        if self._progress is None:
            return
        rate = (step - self.start) / max(time.perf_counter() - self._t0, 1e-9)
        self._progress.update(self._task, completed=step, loss="-" if loss is None else f"{loss:.4g}", speed=f"{rate:.2f}")

    def log(self, message: str) -> None:
        """A line for the person watching (above the bar, or plain stderr without one)."""
        if self._progress is not None:
            self._progress.console.print(message)
        else:
            import sys

            print(message, file=sys.stderr)

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.stop()
