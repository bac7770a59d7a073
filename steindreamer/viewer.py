"""Live web viewer on viser: watch the NeRF train from any angle (`generate --viewer`), or look at a
finished run or an exported mesh (`steindreamer view RUN_DIR_OR_GLB`).

Each browser orbits its own camera. For a NeRF the server renders the field from that camera with
our volume renderer and sends the frame as that client's scene background image (viser stretches it
over the canvas, so frames are rendered at the canvas' aspect). A mesh goes to the browser as GLB
and three.js draws it there. viser is imported lazily: the rest of steindreamer runs without it."""
from __future__ import annotations

import argparse
import math
import sys
import threading
import time
from dataclasses import dataclass, field as dc_field
from pathlib import Path

import numpy as np
import torch

from .cameras import Cameras
from .errors import UserError

DEFAULT_PORT = 8080
VIEWER_SHARE = 0.2  # at most this share of wall time goes to the viewer while training
GUI_INTERVAL = 0.5  # seconds between status/plot updates
PLOT_POINTS = 1000  # a plot sends at most this many points (older history is thinned)
IDLE_REFINE = 0.3  # `view`: seconds a camera must rest before the sharper frame is rendered
TURNTABLE_PERIOD = 12.0  # seconds per revolution


# --- CLI ------------------------------------------------------------------------------------------
def add_viewer_args(parser: argparse.ArgumentParser) -> None:
    """`generate --viewer [--port N] [--host H]`."""
    group = parser.add_argument_group("live viewer")
    group.add_argument("--viewer", action="store_true", help="serve a live web viewer of the training run")
    _add_server_args(group)


def _add_server_args(parser) -> None:
    parser.add_argument("--port", type=int, default=DEFAULT_PORT,
                        help=f"viewer port (default {DEFAULT_PORT}; the next free one if taken, 0 = any free port)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1; 0.0.0.0 exposes the viewer to the network)")


def add_view_parser(subparsers) -> argparse.ArgumentParser:
    view = subparsers.add_parser("view", help="look at a run's NeRF or an exported mesh in the browser",
                                 description="Serve a web viewer for RUN_DIR (its latest NeRF checkpoint) or a GLB/glTF mesh. Ctrl-C stops it.")
    view.add_argument("target", metavar="RUN_DIR_OR_GLB", help="a run folder or a .glb/.gltf file")
    _add_server_args(view)
    view.add_argument("--max-seconds", type=float, default=None, help=argparse.SUPPRESS)  # tests: stop by itself
    return view


# --- camera conversion ----------------------------------------------------------------------------
def quat_to_matrix(wxyz) -> np.ndarray:
    w, x, y, z = np.asarray(wxyz, dtype=np.float64) / np.linalg.norm(wxyz)
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
        [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
        [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
    ])


def rotation_y(angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])


def viser_to_cameras(wxyz, position, fov: float, turntable: float = 0.0) -> Cameras:
    """A viser client camera as our `Cameras` (batch of one).

    viser reports R_world_camera as a quaternion in OpenCV's camera frame (x right, y down, looking
    along +z); ours is OpenGL's (x right, y up, looking along -z), so y and z flip. fov is vertical
    radians in both. `turntable` (radians) spins the object about world +Y, i.e. moves the camera by
    the opposite angle."""
    r_cv = quat_to_matrix(wxyz)
    spin = rotation_y(-turntable)
    c2w = np.eye(4)
    c2w[:3, :3] = spin @ (r_cv * np.array([1.0, -1.0, -1.0]))
    c2w[:3, 3] = spin @ np.asarray(position, dtype=np.float64)
    eye = c2w[:3, 3]
    distance = float(np.linalg.norm(eye))
    elevation = math.degrees(math.asin(max(-1.0, min(1.0, eye[1] / distance)))) if distance > 0 else 0.0
    azimuth = math.degrees(math.atan2(eye[0], eye[2]))  # azimuth 0 on +Z, growing towards +X
    as_t = lambda v: torch.tensor([v], dtype=torch.float32)  # noqa: E731
    return Cameras(torch.tensor(c2w, dtype=torch.float32)[None], as_t(fov), as_t(elevation), as_t(azimuth), as_t(distance))


def frame_size(image_width: int, image_height: int, longest: int) -> tuple[int, int]:
    """(height, width) at the canvas' aspect with the longer side `longest` pixels."""
    aspect = image_width / image_height if image_width > 0 and image_height > 0 else 1.0
    if aspect >= 1.0:
        return max(1, round(longest / aspect)), longest
    return longest, max(1, round(longest * aspect))


@torch.no_grad()
def render_frame(field, background, cameras: Cameras, render_cfg, height: int, width: int) -> np.ndarray:
    """One view at any aspect as uint8 [H, W, 3]. `render_views` renders squares only, so the rays
    are made here and go through `render_rays` in chunks (deterministic: no sample jitter, no RNG)."""
    from .render.volume import render_rays

    device = next(field.parameters()).device
    origins, dirs = cameras.to(device).rays(height, width)
    o, d = origins.reshape(-1, 3), dirs.reshape(-1, 3)
    bg = background(d)
    chunk = render_cfg.chunk
    parts = [render_rays(field, o[i:i + chunk], d[i:i + chunk], bg[i:i + chunk], render_cfg, perturb=False)["rgb"]
             for i in range(0, o.shape[0], chunk)]
    rgb = torch.cat(parts).reshape(height, width, 3)
    return (rgb.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()


# --- time budget ----------------------------------------------------------------------------------
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


# --- shared server plumbing -----------------------------------------------------------------------
@dataclass
class _ClientState:
    camera_time: float = 0.0  # viser's timestamp of the newest camera message
    drawn: tuple = ()  # what the last frame showed (model version, camera time, size[, turntable angle])


@dataclass
class _Server:
    """A viser server with +Y up, a front-ish start view and per-client camera tracking."""

    host: str
    port: int
    label: str
    distance: float = 2.5
    wake: threading.Event = dc_field(default_factory=threading.Event)
    clients: dict = dc_field(default_factory=dict)

    def __post_init__(self):
        try:
            import viser
        except ImportError:
            raise UserError("the viewer needs viser: pip install viser") from None
        self.viser = viser
        _check_host(self.host)
        try:
            self.server = viser.ViserServer(host=self.host, port=self.port, label=self.label, verbose=False)
        except OSError as err:
            raise UserError(f"cannot start the viewer on {self.host}:{self.port}: {err.strerror or err}") from None
        scene = self.server.scene
        scene.set_up_direction("+y")  # our world (and glTF's) is +Y up; orbiting follows it
        cam = self.server.initial_camera
        elev, azim = math.radians(20.0), math.radians(30.0)
        d = self.distance
        cam.position = (d * math.cos(elev) * math.sin(azim), d * math.sin(elev), d * math.cos(elev) * math.cos(azim))
        cam.look_at = (0.0, 0.0, 0.0)
        cam.up = (0.0, 1.0, 0.0)
        cam.fov = math.radians(50.0)
        self.lock = threading.Lock()
        self.server.on_client_connect(self._connected)
        self.server.on_client_disconnect(self._disconnected)
        self.url = f"http://{self.host}:{self.server.get_port()}"
        print(f"viewer: {self.url}", flush=True)

    def _connected(self, client) -> None:
        with self.lock:
            self.clients[client.client_id] = _ClientState(camera_time=client.camera.update_timestamp)

        @client.camera.on_update
        def _(camera) -> None:
            with self.lock:
                state = self.clients.get(client.client_id)
                if state is not None:
                    state.camera_time = camera.update_timestamp
            self.wake.set()

        self.wake.set()

    def _disconnected(self, client) -> None:
        with self.lock:
            self.clients.pop(client.client_id, None)

    def connected(self) -> list:
        """(handle, state) of clients that have reported a camera."""
        handles = self.server.get_clients()
        with self.lock:
            return [(h, self.clients[cid]) for cid, h in handles.items() if cid in self.clients]

    def send_frame(self, client, image: np.ndarray) -> None:
        client.scene.set_background_image(image, format="jpeg", jpeg_quality=90)
        client.flush()  # frames should not wait for viser's batching window

    def stop(self) -> None:
        self.server.stop()


def _check_host(host: str) -> None:
    """viser retries port after port on any bind error and never returns when the address itself is
    unusable (a typo, an address of another machine), so the address is tried here first."""
    import socket

    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as probe:
            probe.bind(addr)
    except OSError as err:
        raise UserError(f"cannot listen on --host {host}: {err.strerror or err}") from None


def _client_camera(client) -> tuple[np.ndarray, np.ndarray, float, int, int]:
    cam = client.camera
    return np.array(cam.wxyz), np.array(cam.position), float(cam.fov), int(cam.image_width), int(cam.image_height)


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


# --- live viewer during training --------------------------------------------------------------------
class ViewerCallback:
    """`cb(stage, info)` after each training step: renders the current NeRF for every connected
    browser within the time budget, updates status and plots, shows the newest validation grid,
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
        from .train import RunPaths, save_checkpoint

        self._snapshot.clear()
        if self.run_dir is None:
            return
        self.last_snapshot = save_checkpoint(RunPaths(self.run_dir), stage, stage.cfg.train.keep_checkpoints)
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
            image = render_frame(stage.field, stage.background, viser_to_cameras(wxyz, position, fov), stage.cfg.render, *size)
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
        total = stage.cfg.train.steps
        parts = [f"**step** {info.get('step', stage.step_index)} / {total}"]
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


# --- `steindreamer view` ------------------------------------------------------------------------------
def _load_run(run_dir: Path):
    from .config import from_yaml_text
    from .field.nerf import Background, NeRFField
    from .train import RunPaths, load_checkpoint

    paths = RunPaths(run_dir)
    if not paths.config.is_file():
        raise UserError(f"not a run folder (no config.yaml): {run_dir}")
    ckpt = paths.latest_checkpoint()
    if ckpt is None:
        raise UserError(f"run folder {run_dir} has no checkpoint yet")
    try:
        cfg = from_yaml_text(paths.config.read_text())
    except OSError as err:
        raise UserError(f"cannot read {paths.config}: {err.strerror}") from None
    device = torch.device("cuda" if torch.cuda.is_available() and cfg.train.device != "cpu" else "cpu")
    state = load_checkpoint(ckpt, device)
    field, background = NeRFField(cfg.field, device).to(device), Background(cfg.background).to(device)
    try:
        field.load_state_dict(state["field"])
        background.load_state_dict(state["background"])
    except (KeyError, RuntimeError) as err:
        raise UserError(f"checkpoint {ckpt.name} does not match the run's config.yaml ({type(err).__name__})") from None
    field.eval()
    return cfg, field, background, ckpt, int(state.get("step", 0))


def _load_mesh(path: Path) -> tuple[bytes, float]:
    """GLB bytes for viser and the mesh's radius (for the start view)."""
    import trimesh

    try:
        scene = trimesh.load(path, force="scene")
    except Exception as err:  # noqa: BLE001 - any parse failure is the user's file
        raise UserError(f"cannot read mesh {path}: {type(err).__name__}") from None
    if scene.is_empty:
        raise UserError(f"mesh {path} has no geometry")
    # A .glb goes as it is (keeps every material and texture); other formats are converted.
    data = path.read_bytes() if path.suffix.lower() == ".glb" else scene.export(file_type="glb")
    radius = float(np.linalg.norm(scene.bounds, axis=1).max())
    return data, radius


def cmd_view(args) -> int:
    target = Path(args.target)
    if not target.exists():
        raise UserError(f"no such run folder or mesh file: {target}")
    if target.is_dir():
        cfg, field, background, ckpt, step = _load_run(target)
        mesh, distance = None, float(np.mean(cfg.camera.distance)) * 1.2
        title = f"{target.name} · step {step}"
    elif target.suffix.lower() in (".glb", ".gltf"):
        mesh, radius = _load_mesh(target)
        distance, title = max(3.0 * radius, 0.1), target.name
    else:
        raise UserError(f"not a run folder or .glb/.gltf file: {target}")
    srv = _Server(args.host, args.port, f"steindreamer · {title}", distance=distance)
    gui = srv.server.gui
    gui.add_markdown(f"**{title}**")
    turntable = gui.add_checkbox("Turntable", initial_value=False)
    turntable.on_update(lambda _: srv.wake.set())
    node = None
    if mesh is not None:
        node = srv.server.scene.add_glb("/mesh", mesh)
    else:
        resolution = gui.add_slider("Frame size (px)", min=32, max=1024, step=32,
                                    initial_value=256 if torch.cuda.is_available() else 160)
        resolution.on_update(lambda _: srv.wake.set())
    deadline = None if args.max_seconds is None else time.monotonic() + args.max_seconds
    start = time.monotonic()
    try:
        while deadline is None or time.monotonic() < deadline:
            spinning = bool(turntable.value)
            # Spinning needs a steady frame clock; otherwise sleep until a camera or control moves.
            srv.wake.wait(timeout=(1 / 15 if node is not None else 0.05) if spinning else IDLE_REFINE)
            srv.wake.clear()
            angle = (2 * math.pi * (time.monotonic() - start) / TURNTABLE_PERIOD) % (2 * math.pi) if spinning else 0.0
            if node is not None:
                node.wxyz = (math.cos(angle / 2), 0.0, math.sin(angle / 2), 0.0)  # about +Y
                continue
            for client, state in srv.connected():
                try:
                    wxyz, position, fov, width, height = _client_camera(client)
                except AssertionError:
                    continue
                # While the camera moves (or spins) frames come at the interactive size; once it has
                # rested, one frame at twice that size (at most the canvas) sharpens the view.
                rest = time.time() - state.camera_time
                sharp = not spinning and rest >= IDLE_REFINE
                longest = int(resolution.value) * (2 if sharp else 1)
                longest = min(longest, max(width, height, 32)) if sharp else longest
                size = frame_size(width, height, longest)
                key = (0, state.camera_time, size, angle)
                if state.drawn == key:
                    continue
                image = render_frame(field, background, viser_to_cameras(wxyz, position, fov, angle), cfg.render, *size)
                srv.send_frame(client, image)
                state.drawn = key
    except KeyboardInterrupt:
        pass
    finally:
        srv.stop()
    return 0
