"""From a viser client camera to a frame: the camera conversion to our `Cameras` and the frame
size at the canvas' aspect (the NeRF's frame itself is `render.volume.render_frame`)."""
from __future__ import annotations

import math

import numpy as np
import torch

from ..cameras import Cameras


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
