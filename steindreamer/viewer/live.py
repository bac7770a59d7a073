"""The live viewer during training (`generate --viewer`): a step callback that renders the current
NeRF for each browser within the time budget, with status, metric plots, the newest validation grid,
Pause/Resume and Snapshot."""
from __future__ import annotations

import math
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

from .args import DEFAULT_PORT
from .budget import VIEWER_SHARE, FrameBudget
from .frames import frame_size, viser_to_cameras
from .server import _client_camera, _Server

GUI_INTERVAL = 0.5  # seconds between status/plot updates
PLOT_POINTS = 1000  # a plot sends at most this many points (older history is thinned)


def _scalar(value) -> float | None:
    """A plottable float from a metric (number, 0-d or small tensor/array: its mean), else None."""
    try:
        if isinstance(value, torch.Tensor):
            value = value.detach().float().mean().item()
        elif isinstance(value, np.ndarray) or isinstance(value, (list, tuple)):
            value = float(np.mean(np.asarray(value, dtype=np.float64)))
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


class _History:
    """Metric series for the plots; thinned to at most PLOT_POINTS when sent."""

    def __init__(self):
        self.steps: list[float] = []
        self.series: dict[str, list[float]] = {}

    def add(self, step: int, values: dict[str, float | None]) -> None:
        self.steps.append(float(step))
        n = len(self.steps)
        for key, value in values.items():
            column = self.series.setdefault(key, [float("nan")] * (n - 1))
            column.append(float("nan") if value is None else value)
        for column in self.series.values():  # keys that went missing this step
            if len(column) < n:
                column.append(float("nan"))

    def arrays(self, keys) -> tuple[np.ndarray, ...]:
        stride = max(1, math.ceil(len(self.steps) / PLOT_POINTS))
        pick = lambda xs: np.asarray(xs[::-1][::stride][::-1], dtype=np.float64)  # noqa: E731 - keep the newest
        return (pick(self.steps), *(pick(self.series[k]) for k in keys))


class ViewerCallback:
    """`cb(stage, info)` after each training step of either stage: renders the current NeRF or mesh
    (`stage.preview`) for every connected browser within the time budget, updates status and plots, shows the newest validation grid,
    and honours the Pause/Resume and Snapshot buttons. Runs in the training thread, so frames and
    snapshots always see a consistent model."""

    PLOTS = (("loss", ("loss",)), ("SSD control variate", ("mu", "variance")))

    def __init__(self, host: str = "127.0.0.1", port: int = DEFAULT_PORT, run_dir=None, share: float = VIEWER_SHARE,
                 resolution: int | None = None, clock=time.perf_counter):
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.budget = FrameBudget(share, clock)
        self.clock = clock
        self._srv = _Server(host, port, "steindreamer · training")
        self.url, self.server = self._srv.url, self._srv.server
        self._paused = threading.Event()
        self._snapshot = threading.Event()
        self._closed = False
        self._history = _History()
        self._last_gui = -math.inf
        self._val_shown: Path | None = None
        self._plots: dict[str, object] = {}
        self.frames = 0
        self.errors: list[Exception] = []
        self.gui_seconds = self.frame_seconds = 0.0  # where the viewer's time went (shown in tests' failures)
        self.last_snapshot: Path | None = None
        gui = self.server.gui
        self._status = gui.add_markdown("waiting for the first step…")
        self._pause_button = gui.add_button("Pause", icon=self._srv.viser.Icon.PLAYER_PAUSE)
        self._pause_button.on_click(lambda _: self.resume() if self.paused else self.pause())
        snapshot = gui.add_button("Snapshot", icon=self._srv.viser.Icon.DEVICE_FLOPPY, hint="write a checkpoint now")
        snapshot.on_click(lambda _: self.request_snapshot())
        default_res = resolution or (256 if torch.cuda.is_available() else 128)
        self._resolution = gui.add_slider("Frame size (px)", min=32, max=1024, step=32, initial_value=default_res)
        self._val_folder = gui.add_folder("Validation")
        self._val_image = None
        self._plot_folder = gui.add_folder("Metrics")

    # button actions (called from viser's threads: they only flip flags) -------------------------------
    @property
    def paused(self) -> bool:
        return self._paused.is_set()

    def pause(self) -> None:
        self._paused.set()
        self._pause_button.label = "Resume"
        self._pause_button.icon = self._srv.viser.Icon.PLAYER_PLAY
        self._srv.wake.set()

    def resume(self) -> None:
        self._paused.clear()
        self._pause_button.label = "Pause"
        self._pause_button.icon = self._srv.viser.Icon.PLAYER_PAUSE
        self._srv.wake.set()

    def request_snapshot(self) -> None:
        self._snapshot.set()
        self._srv.wake.set()

    # the step callback ------------------------------------------------------------------------------
    def __call__(self, stage, info: dict) -> None:
        if self._closed:
            return
        try:
            self._step(stage, info)
        except Exception as err:  # noqa: BLE001 - a viewer fault must not end a long training run
            self.errors.append(err)
            if len(self.errors) == 1:
                print(f"viewer: {type(err).__name__}: {err} (training continues)", file=sys.stderr, flush=True)

    def _step(self, stage, info: dict) -> None:
        entered = self.budget.enter()
        paused_for = 0.0
        self._record(info)
        if self._snapshot.is_set():
            self._take_snapshot(stage)
        if self.clock() - self._last_gui >= GUI_INTERVAL:
            t0 = self.clock()
            self._update_gui(stage, info)
            self.gui_seconds += self.clock() - t0
        t0 = self.clock()
        self._draw(stage, budgeted=True)
        self.frame_seconds += self.clock() - t0
        if self._paused.is_set():
            paused_for = self._wait_paused(stage, info)
        self.budget.leave(entered, excluded=paused_for)

    def _wait_paused(self, stage, info) -> float:
        """Blocks the training thread until resumed; meanwhile serves snapshots and camera moves.
        Waits on an event (woken by buttons and camera messages), never spins."""
        start = self.clock()
        self._update_gui(stage, info)
        while self._paused.is_set() and not self._closed:
            self._srv.wake.wait(timeout=1.0)
            self._srv.wake.clear()
            if self._snapshot.is_set():
                self._take_snapshot(stage)
                self._update_gui(stage, info)
            self._draw(stage, budgeted=False)
        return self.clock() - start

    def _take_snapshot(self, stage) -> None:
        from ..runfolder import RunFolder

        self._snapshot.clear()
        if self.run_dir is None:
            return
        self.last_snapshot = RunFolder(self.run_dir).save_checkpoint(stage.name, stage.step_index, stage.state(), stage.cadence.keep)
        for client in self.server.get_clients().values():
            client.add_notification(title="Snapshot saved", body=str(self.last_snapshot), auto_close_seconds=4.0)

    def _draw(self, stage, budgeted: bool) -> None:
        version = stage.step_index
        for client, state in self._srv.connected():
            try:
                wxyz, position, fov, width, height = _client_camera(client)
            except AssertionError:  # viser: no camera message yet
                continue
            size = frame_size(width, height, int(self._resolution.value))
            key = (version, state.camera_time, size)
            if state.drawn == key:
                continue
            if budgeted and not self.budget.allows_frame():
                return
            t0 = self.clock()
            image = stage.preview(viser_to_cameras(wxyz, position, fov), *size)
            self._srv.send_frame(client, image)
            self.budget.measured_frame(self.clock() - t0)
            state.drawn = key
            self.frames += 1

    # status, plots, validation grid -------------------------------------------------------------------
    def _record(self, info: dict) -> None:
        keys = {k for _, ks in self.PLOTS for k in ks}
        self._history.add(int(info.get("step", 0)), {k: _scalar(info[k]) for k in keys if k in info})

    def _update_gui(self, stage, info: dict) -> None:
        self._last_gui = self.clock()
        parts = [f"**{stage.name}** step {stage.step_index} / {stage.cadence.steps}"]
        if "engine" in info:
            parts.append(f"**engine** {info['engine']}")
        for key, label, fmt in (("loss", "loss", "{:.4g}"), ("mu", "μ", "{:.4g}"), ("variance", "variance", "{:.4g}"),
                                ("t", "t", "{}"), ("opacity", "opacity", "{:.3f}"), ("seconds", "s/step", "{:.3f}")):
            value = _scalar(info[key]) if key in info else None
            if value is not None:
                parts.append(f"**{label}** " + fmt.format(int(value) if key == "t" else value))
        if self.paused:
            parts.append("**paused**")
        parts.append(f"viewer {100 * self.budget.share:.0f}% of time")
        self._status.content = "  \n".join(parts)
        self._update_plots()
        self._update_validation()

    def _update_plots(self) -> None:
        uplot = self._srv.viser.uplot
        colors = ("#1c7ed6", "#e8590c", "#2f9e44")
        for title, keys in self.PLOTS:
            present = [k for k in keys if k in self._history.series and not np.isnan(self._history.series[k]).all()]
            if not present or len(self._history.steps) < 2:
                continue
            data = self._history.arrays(present)
            plot = self._plots.get(title)
            if plot is None:
                series = (uplot.Series(label="step"), *(uplot.Series(label=k, stroke=colors[i % 3], width=1.5) for i, k in enumerate(present)))
                with self._plot_folder:
                    self._plots[title] = self.server.gui.add_uplot(data=data, series=series, title=title, aspect=1.6)
            elif len(plot.data) == len(data):
                plot.data = data

    def _update_validation(self) -> None:
        if self.run_dir is None:
            return
        grids = sorted((self.run_dir / "renders").glob("val_*.png"))
        if not grids or grids[-1] == self._val_shown:
            return
        import imageio.v3 as iio

        try:
            image = np.asarray(iio.imread(grids[-1]))[..., :3]
        except (OSError, ValueError):  # being replaced right now: next time
            return
        if image.shape[1] < 256:  # small training renders: enlarge (nearest) so the panel shows them
            k = -(-256 // image.shape[1])
            image = image.repeat(k, 0).repeat(k, 1)
        if self._val_image is None:
            with self._val_folder:
                self._val_image = self.server.gui.add_image(image, label=grids[-1].name, format="png")
        else:
            self._val_image.image = image
            self._val_image.label = grids[-1].name
        self._val_shown = grids[-1]

    def close(self) -> None:
        """Stops the server; a paused training thread is released first."""
        if self._closed:
            return
        self._closed = True
        self._paused.clear()
        self._srv.wake.set()
        self._srv.stop()
