"""`steindreamer view RUN_DIR_OR_GLB`: serve a finished run's NeRF (rendered here, per client) or a
mesh (drawn by the browser) until Ctrl-C."""
from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from ..render.volume import render_frame
from .frames import frame_size, viser_to_cameras
from .server import _client_camera, _Server

IDLE_REFINE = 0.3  # `view`: seconds a camera must rest before the sharper frame is rendered
TURNTABLE_PERIOD = 12.0  # seconds per revolution


def _load_run(run_dir: Path):
    from ..runfolder import RunFolder

    run = RunFolder(run_dir)
    cfg = run.read_config()
    device = torch.device("cuda" if torch.cuda.is_available() and cfg.train.device != "cpu" else "cpu")
    field, background, step = run.load_nerf(cfg, device)
    return cfg, field, background, step


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
        cfg, field, background, step = _load_run(target)
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
    except KeyboardInterrupt:  # Ctrl-C is how `view` is meant to end
        return 0
    finally:
        srv.stop()
    return 0
