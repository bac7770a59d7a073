"""The viser server shared by the live viewer and `view`: +Y up, a front-ish start view, per-client
camera tracking, frames sent as each client's background image."""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field as dc_field

import numpy as np

from ..errors import UserError


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
