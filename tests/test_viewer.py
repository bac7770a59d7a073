"""The live viewer: camera conversion, the time budget, and the real thing in headless Chromium
(`steindreamer view` on a GLB and on a run folder; `generate --viewer`'s callback during training,
driven through its buttons)."""
import math
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

viser = pytest.importorskip("viser", reason="the viewer needs viser (pip install viser)")

from browser import Browser, find_chromium, red_fraction, red_mask  # noqa: E402
from steindreamer.cameras import make_cameras  # noqa: E402
from steindreamer.cli import build_parser, main  # noqa: E402
from steindreamer.render.volume import render_frame  # noqa: E402
from steindreamer.runfolder import RunFolder  # noqa: E402
from steindreamer.viewer import FrameBudget, ViewerCallback, frame_size, viser_to_cameras  # noqa: E402

FAST = ["resolution=16", "render.samples=16", "field.grid.levels=4", "field.grid.log2_table=12", "field.grid.max_res=64",
        "train.val_every=2", "train.ckpt_every=1000", "train.val_views=2", "--quiet"]
SCREENSHOT = Path("/tmp/viewer_screenshot.png")  # kept for a person to look at
TRAINING_SCREENSHOT = Path("/tmp/viewer_training_screenshot.png")


# --- camera conversion ------------------------------------------------------------------------------
def _viser_pose(position, look_at=(0.0, 0.0, 0.0), up=(0.0, 1.0, 0.0)) -> np.ndarray:
    """The wxyz a browser reports for this pose, computed by viser's own CameraHandle."""
    from viser._viser import CameraHandle

    class _Conn:
        def queue_message(self, message):
            """No browser: the handle's messages go nowhere."""

    class _Client:
        _websock_connection = _Conn()

    cam = CameraHandle(_Client())
    cam._state.update_timestamp = 1.0
    cam._state.position = np.asarray(position, dtype=np.float64)
    cam._state.up_direction = np.asarray(up, dtype=np.float64)
    cam._state.look_at = np.asarray(position, dtype=np.float64) + 1.0  # differs from the target: the setter runs
    cam.look_at = look_at
    return np.array(cam.wxyz)


@pytest.mark.parametrize("elevation, azimuth, distance, fov", [(15, 0, 2.0, 50), (30, 45, 1.5, 40), (-10, -120, 2.5, 60), (60, 170, 1.8, 70)])
def test_viser_camera_matches_make_cameras(elevation, azimuth, distance, fov):
    ref = make_cameras([elevation], [azimuth], [distance], [fov])
    wxyz = _viser_pose(ref.position[0].numpy())
    cams = viser_to_cameras(wxyz, ref.position[0].numpy(), math.radians(fov))
    assert torch.allclose(cams.c2w, ref.c2w, atol=1e-5)
    for key in ("fov", "elevation", "azimuth", "distance"):
        assert torch.allclose(getattr(cams, key), getattr(ref, key), atol=1e-4), key


class _TwoToneBall(torch.nn.Module):
    """A ball at the origin, red above the equator (y > 0) and blue below: shows up/down and centring."""

    class cfg:  # noqa: N801 - what render_rays reads from a field
        bound = 1.0

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # gives render_frame a device

    def forward(self, x):
        sigma = torch.where(x.norm(dim=-1) < 0.5, 200.0, 0.0)
        red = (x[..., 1] > 0).float()
        return sigma, torch.stack([red, torch.zeros_like(red), 1 - red], -1)


def test_frame_from_viser_camera_is_upright_and_centred():
    # At eye level the equator runs through the middle row: red must fill the top half, blue the bottom.
    position = make_cameras([0.0], [30.0], [2.0], [50.0]).position[0].numpy()
    height, width = frame_size(640, 480, 64)  # a landscape canvas
    assert (height, width) == (48, 64)
    image = render_frame(_TwoToneBall(), lambda d: torch.ones_like(d), viser_to_cameras(_viser_pose(position), position, math.radians(50.0)),
                         build_config().render, height, width).astype(int)
    hit = (image.sum(-1) < 600)  # not the white background
    rows, cols = np.nonzero(hit)
    assert abs(rows.mean() - (height - 1) / 2) < 2 and abs(cols.mean() - (width - 1) / 2) < 2
    ball_w, ball_h = cols.max() - cols.min(), rows.max() - rows.min()
    assert abs(ball_w - ball_h) <= 2  # square pixels on a non-square frame: still round
    top, bottom = image[: height // 2][hit[: height // 2]], image[height // 2:][hit[height // 2:]]
    assert (top[:, 0] > top[:, 2]).mean() > 0.95  # red on top: +Y is up on screen
    assert (bottom[:, 2] > bottom[:, 0]).mean() > 0.95


def build_config():
    from steindreamer.config import load_config

    return load_config(None, None, ["render.samples=48"])


# --- time budget --------------------------------------------------------------------------------------
class _Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


@pytest.mark.parametrize("step_s, frame_s", [(0.05, 0.3), (1.0, 0.02), (0.01, 0.01)])
def test_frame_budget_keeps_viewer_under_its_share(step_s, frame_s):
    clock = _Clock()
    budget = FrameBudget(0.2, clock)
    frames = 0
    for _ in range(3000):
        clock.now += step_s  # a training step
        entered = budget.enter()
        clock.now += 0.001  # status bookkeeping
        if budget.allows_frame():
            clock.now += frame_s
            budget.measured_frame(frame_s)
            frames += 1
        budget.leave(entered)
    assert budget.share <= 0.2 + 1e-6
    # ... and it is used, not starved: a frame every step when affordable, else most of the share.
    assert frames == 3000 or budget.share > 0.15


def test_frame_budget_gives_no_burst_after_a_long_idle_stretch():
    clock = _Clock()
    budget = FrameBudget(0.2, clock)
    budget.measured_frame(0.5)
    budget.leave(budget.enter())
    clock.now += 3600.0  # an hour of training with no browser
    budget.enter()
    assert budget.credit <= 0.5 + 1e-9  # at most one frame's worth


def test_status_and_plots_show_ssd_metrics():
    """No browser needed: status text and plots follow `info`, μ and variance included."""
    from types import SimpleNamespace

    clock = _Clock()
    viewer = ViewerCallback("127.0.0.1", 0, None, clock=clock)
    port = viewer.server.get_port()
    stage = SimpleNamespace(name="nerf", step_index=0, cadence=SimpleNamespace(steps=10))
    try:
        for step in range(1, 5):
            stage.step_index = step
            clock.now += 1.0
            viewer(stage, {"step": step, "loss": 1.0 / step, "t": 500, "engine": "ssd", "mu": torch.tensor([0.5, 0.7]), "variance": 2.0 * step})
        assert not viewer.errors, viewer.errors
        text = viewer._status.content
        assert "**nerf** step 4 / 10" in text and "ssd" in text and "μ** 0.6" in text and "**variance** 8" in text
        assert set(viewer._plots) == {"loss", "SSD control variate"}
        steps, mu, variance = viewer._plots["SSD control variate"].data
        assert steps.tolist() == [1, 2, 3, 4] and np.allclose(mu, 0.6) and variance.tolist() == [2, 4, 6, 8]
    finally:
        viewer.close()
    assert _free(port)


# --- CLI --------------------------------------------------------------------------------------------------
def test_generate_takes_viewer_options():
    args = build_parser().parse_args(["generate", "a red cube", "--viewer", "--port", "9000", "--host", "0.0.0.0"])
    assert (args.viewer, args.port, args.host) == (True, 9000, "0.0.0.0")
    args = build_parser().parse_args(["generate", "a red cube"])
    assert (args.viewer, args.port, args.host) == (False, 8080, "127.0.0.1")


@pytest.mark.parametrize("make, message", [
    (lambda tmp: tmp / "missing", "no such"),
    (lambda tmp: tmp, "not a run folder"),
    (lambda tmp: (tmp / "x.txt").write_text("x") and tmp / "x.txt", "not a run folder or .glb"),
    (lambda tmp: (tmp / "bad.glb").write_bytes(b"not a glb") and tmp / "bad.glb", "cannot read mesh"),
])
def test_view_bad_path_is_one_line_and_status_2(make, message, tmp_path, capsys):
    assert main(["view", str(make(tmp_path))]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and message in err and "\n" not in err


def test_unusable_host_is_one_line_and_status_2(tmp_path, capsys):
    # 192.0.2.1 (TEST-NET-1) is never an address of this machine: binding fails at once.
    assert main(["view", str(_red_box_glb(tmp_path / "box.glb")), "--host", "192.0.2.1", "--port", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "cannot listen" in err and "\n" not in err


# --- in the browser ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def chromium():
    if find_chromium() is None:
        pytest.skip("chromium is not installed (apt-get install chromium); browser tests skipped")
    return find_chromium()


def _free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def _open(url: str) -> Browser:
    try:
        return Browser(url, 800, 600)
    except RuntimeError as err:
        pytest.skip(f"headless chromium does not start here: {err}")


def _serve(target: Path, tmp_path: Path):
    """`steindreamer view TARGET` in a subprocess; returns (process, url) once it listens."""
    # Default SIGINT in the child: a test run started in the background by a non-interactive shell
    # ignores SIGINT, the child would inherit that and never see the Ctrl-C that _stop sends.
    proc = subprocess.Popen([sys.executable, "-m", "steindreamer", "view", str(target), "--port", "0", "--max-seconds", "120"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=Path(__file__).parents[1],
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    lines = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        found = re.match(r"viewer: (http://\S+)", line)
        if found:
            # Keep draining the output so the server never blocks on a full pipe.
            threading.Thread(target=lambda: [lines.append(x) for x in proc.stdout], daemon=True).start()
            return proc, found.group(1), lines
    proc.kill()
    pytest.fail("viewer did not start:\n" + "".join(lines))


def _stop(proc, url: str, lines) -> None:
    proc.send_signal(signal.SIGINT)  # Ctrl-C
    assert proc.wait(30) == 0, "".join(lines)
    assert _free(int(url.rsplit(":", 1)[1]))


def _red_box_glb(path: Path) -> Path:
    import trimesh

    box = trimesh.creation.box(extents=(1.0, 1.0, 1.0))
    box.visual.face_colors = np.tile([230, 0, 0, 255], (len(box.faces), 1))
    box.export(path)
    return path


def test_view_glb_in_browser(chromium, tmp_path):
    proc, url, lines = _serve(_red_box_glb(tmp_path / "box.glb"), tmp_path)
    try:
        with _open(url) as browser:
            png, image = browser.wait_for(lambda im: red_fraction(im) > 0.03, timeout=45)
            (tmp_path / "glb.png").write_bytes(png)
            assert red_fraction(image) > 0.03, f"no red box on screen (screenshot {tmp_path / 'glb.png'})"
    finally:
        if proc.poll() is None:
            _stop(proc, url, lines)


@pytest.fixture
def red_run(tiny_latent_model, tmp_path):
    """A real run folder (one step of `generate`) whose NeRF is then painted red: the blob's
    density stays, the colour head outputs pure red everywhere."""
    from steindreamer.config import load_config, to_yaml
    from steindreamer.pipeline import build_stages
    from steindreamer.runfolder import RunFolder
    from steindreamer.stages import run_stage

    out = tmp_path / "run"
    out.mkdir()
    # What `generate` leaves after its NeRF stage (config.yaml + checkpoints), without the mesh stage.
    cfg = load_config(None, None, [f"model={tiny_latent_model}", "steps=1", "background.kind=white", *[o for o in FAST if "=" in o]])
    (out / "config.yaml").write_text(to_yaml(cfg))
    run_stage(build_stages("a red cube", cfg)[1], RunFolder(out), show_progress=False)
    ckpt = sorted((out / "checkpoints").glob("*.pt"))[-1]
    state = torch.load(ckpt, weights_only=True)
    last = max(k for k in state["field"] if k.startswith("net.") and k.endswith(".weight"))
    state["field"][last].zero_()
    state["field"][last.replace("weight", "bias")].copy_(torch.tensor([0.0, 12.0, -12.0, -12.0]))
    torch.save(state, ckpt)
    return out


def test_view_run_folder_in_browser(chromium, red_run, tmp_path):
    proc, url, lines = _serve(red_run, tmp_path)
    try:
        with _open(url) as browser:
            png, image = browser.wait_for(lambda im: red_fraction(im) > 0.03, timeout=60)
            shot = tmp_path / "nerf.png"
            shot.write_bytes(png)
            shutil.copy(shot, SCREENSHOT)
            assert red_fraction(image) > 0.03, f"the red NeRF is not on screen (screenshot {shot})"
            # Centred: the red blob's middle is near the canvas' middle (the GUI panel sits on the right).
            # The same red as the wait above: a stricter test (green < 100) once caught a frame still
            # pink (fading in) and found only the axes gizmo's red arm, in the bottom-left corner.
            rows, cols = np.nonzero(red_mask(image))
            h, w = image.shape[:2]
            assert abs(rows.mean() - h / 2) < 0.1 * h and abs(cols.mean() - w / 2) < 0.1 * w
    finally:
        if proc.poll() is None:
            _stop(proc, url, lines)


def test_viewer_callback_during_training(chromium, tiny_latent_model, tmp_path):
    from steindreamer.config import load_config
    from steindreamer.pipeline import generate
    from steindreamer.stages import StopTraining

    run_dir = tmp_path / "live"
    run_dir.mkdir()
    cfg = load_config(None, None, [f"model={tiny_latent_model}", "steps=100000", *[o for o in FAST if "=" in o]])
    viewer = ViewerCallback("127.0.0.1", 0, run_dir, resolution=64)  # small frames: this machine may be busy
    port = viewer.server.get_port()
    calls: list[tuple[float, float, int]] = []  # (enter, leave, step) of each viewer call
    stop = threading.Event()

    def timed(stage, info):
        t0 = time.perf_counter()
        viewer(stage, info)
        calls.append((t0, time.perf_counter(), stage.step_index))

    def stopper(stage, info):
        if stop.is_set():
            raise StopTraining

    errors = []
    thread = threading.Thread(target=lambda: _catch(errors, generate, "a red cube", cfg, run_dir, show_progress=False, callbacks=(timed, stopper)))
    thread.start()
    try:
        with _open(viewer.url) as browser:
            deadline = time.monotonic() + 60
            while viewer.frames < 3 and time.monotonic() < deadline and thread.is_alive():
                time.sleep(0.2)
            assert not errors, errors
            assert viewer.frames >= 3, (f"{viewer.frames} frames reached the browser in {len(calls)} steps; viewer time: "
                                        f"frames {viewer.frame_seconds:.2f} s, gui {viewer.gui_seconds:.2f} s, "
                                        f"budget {vars(viewer.budget)}")
            # Time share while frames were being drawn: from the first call after the browser's
            # first frame to now, time inside the viewer over wall time.
            first = next(i for i, c in enumerate(calls) if c[2] >= 1)
            window = calls[first:]
            inside = sum(b - a for a, b, _ in window)
            share = inside / (window[-1][1] - window[0][0])
            assert share < 0.2 + 0.05, f"viewer took {share:.0%} of the time"

            deadline = time.monotonic() + 30
            while (viewer._val_shown is None or not viewer._plots) and time.monotonic() < deadline:
                time.sleep(0.2)
            assert viewer._val_shown is not None and "loss" in viewer._plots
            png, _ = browser.screenshot()
            (tmp_path / "training.png").write_bytes(png)
            shutil.copy(tmp_path / "training.png", TRAINING_SCREENSHOT)

            assert browser.click_button("Pause")
            deadline = time.monotonic() + 20
            while not viewer.paused and time.monotonic() < deadline:
                time.sleep(0.1)
            assert viewer.paused
            time.sleep(0.5)
            held = len(calls)
            time.sleep(1.5)
            assert len(calls) == held, "training went on while paused"
            assert browser.click_button("Snapshot")
            deadline = time.monotonic() + 20
            while viewer.last_snapshot is None and time.monotonic() < deadline:
                time.sleep(0.1)
            assert viewer.last_snapshot is not None and viewer.last_snapshot.exists()
            assert browser.click_button("Resume")
            deadline = time.monotonic() + 20
            while len(calls) <= held and time.monotonic() < deadline:
                time.sleep(0.1)
            assert len(calls) > held, "training did not resume"
    finally:
        stop.set()
        viewer.resume()
        thread.join(60)
        viewer.close()
    assert not errors, errors
    assert not viewer.errors, viewer.errors
    assert _free(port)
    # The paused step's checkpoint is a loadable one.
    assert torch.load(viewer.last_snapshot, weights_only=True)["step"] >= 1


def test_viewer_gets_frames_during_the_mesh_stage(chromium, tiny_latent_model, tmp_path):
    """The one loop calls the viewer in both stages: frames keep reaching the browser once the
    NeRF stage has ended and the mesh stage trains, drawn from the mesh (`MeshStage.preview`)."""
    from steindreamer.config import load_config
    from steindreamer.pipeline import generate
    from steindreamer.stages import StopTraining

    run_dir = tmp_path / "live"
    run_dir.mkdir()
    cfg = load_config(None, None, [f"model={tiny_latent_model}", "steps=2", "mesh.enabled=true", "mesh.steps=100000",
                                   "mesh.resolution=16", "mesh.target_faces=500", *[o for o in FAST if "=" in o]])
    viewer = ViewerCallback("127.0.0.1", 0, run_dir, resolution=64)
    port = viewer.server.get_port()
    seen: dict[str, int] = {}  # stage name -> frames sent while that stage trained
    stop = threading.Event()

    def counting(stage, info):
        before = viewer.frames
        viewer(stage, info)
        seen[stage.name] = seen.get(stage.name, 0) + viewer.frames - before
        if stop.is_set():
            raise StopTraining

    errors, result = [], {}
    thread = threading.Thread(target=lambda: result.update(_catch(errors, generate, "a red cube", cfg, run_dir, show_progress=False,
                                                                  callbacks=(counting,)) or {}))
    thread.start()
    try:
        with _open(viewer.url):
            deadline = time.monotonic() + 90
            while seen.get("mesh", 0) < 3 and time.monotonic() < deadline and thread.is_alive():
                time.sleep(0.2)
            assert not errors, errors
            assert seen.get("mesh", 0) >= 3, f"frames per stage: {seen}; viewer errors: {viewer.errors}"
            assert "mesh" in viewer._status.content
    finally:
        stop.set()
        thread.join(60)
        viewer.close()
    assert not errors and not viewer.errors, (errors, viewer.errors)
    assert result.get("stopped") is True  # a stop during the mesh stage exports nothing
    assert not (run_dir / "model.glb").exists() and RunFolder(run_dir).latest("mesh") is not None
    assert _free(port)


def _catch(errors, fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except BaseException as err:  # noqa: BLE001 - surfaced by the test thread
        errors.append(err)
