"""Cameras: DreamFusion-style random views, fixed orbits, rays and view-dependent prompts.

Conventions (shared by the NeRF, the toy world and export):
- world up is +Y (glTF's up), the object sits at the origin;
- azimuth 0 puts the camera on +Z looking at the origin ("front"), azimuth grows towards +X;
- elevation is the angle above the XZ plane, in degrees;
- camera frames are OpenGL's: x right, y up, the camera looks along -z.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

import torch

from .errors import require, require_choice

# iid: independent views, azimuth stratified over the batch | sequence: the run's low-discrepancy
# view sequence (steindreamer/sequence.py), the stage hands each step's points in
CameraSampling = Literal["iid", "sequence"]


@dataclass
class CameraConfig:
    """Random training views: each [low, high] range is sampled uniformly per view."""

    distance: tuple[float, float] = (1.5, 2.0)  # camera to origin (world units)
    fov: tuple[float, float] = (40.0, 70.0)  # vertical field of view, degrees
    elevation: tuple[float, float] = (-10.0, 45.0)  # degrees
    azimuth: tuple[float, float] = (-180.0, 180.0)  # degrees
    jitter: float = 0.0  # std of the look-at point's offset (world units)
    front_angle: float = 45.0  # |azimuth| below this is "front", above 180 - this is "back"
    overhead_angle: float = 60.0  # elevation above this is "overhead"
    sampling: CameraSampling = "iid"  # iid | sequence: consecutive steps' views spread evenly (same law per view)

    def check(self, key: str = "camera") -> None:
        require_choice(self.sampling, get_args(CameraSampling), f"{key}.sampling")
        for name in ("distance", "fov", "elevation", "azimuth"):
            lo, hi = getattr(self, name)
            require(lo <= hi, f"{key}.{name}", "a [low, high] pair with low <= high")
        require(self.distance[0] > 0, f"{key}.distance", "> 0")
        require(0 < self.fov[0] and self.fov[1] < 180, f"{key}.fov", "in (0, 180) degrees")


@dataclass
class Cameras:
    c2w: torch.Tensor  # [B, 4, 4] camera-to-world
    fov: torch.Tensor  # [B] vertical field of view, radians
    elevation: torch.Tensor  # [B] degrees
    azimuth: torch.Tensor  # [B] degrees, wrapped to [-180, 180)
    distance: torch.Tensor  # [B]

    def __len__(self) -> int:
        return self.c2w.shape[0]

    def _map(self, fn) -> "Cameras":
        """A Cameras of fn applied to every field."""
        return Cameras(*(fn(getattr(self, f)) for f in ("c2w", "fov", "elevation", "azimuth", "distance")))

    def to(self, device) -> "Cameras":
        return self._map(lambda t: t.to(device))

    def __getitem__(self, idx) -> "Cameras":
        out = self._map(lambda t: t[idx] if t.dim() > 0 else t)
        if out.c2w.dim() == 2:  # single index: keep a batch of one
            out = out._map(lambda t: t.unsqueeze(0))
        return out

    def repeat(self, k: int) -> "Cameras":
        """The batch k times over, batch-major blocks (row j B + b is camera b)."""
        return self._map(lambda t: t.repeat(k, *([1] * (t.dim() - 1))))

    @property
    def position(self) -> torch.Tensor:
        return self.c2w[:, :3, 3]

    def rays(self, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Ray origins and unit directions through pixel centres, each [B, H, W, 3]."""
        return get_rays(self.c2w, self.fov, height, width)

    def flat_pose(self) -> torch.Tensor:
        """The flattened 4x4 pose [B, 16], the camera conditioning VSD's LoRA receives."""
        return self.c2w.reshape(len(self), 16)


def look_at(eye: torch.Tensor, target: torch.Tensor, up: torch.Tensor | None = None) -> torch.Tensor:
    """Camera-to-world matrices [B, 4, 4] for cameras at `eye` looking at `target` (OpenGL frame)."""
    if up is None:
        up = torch.tensor([0.0, 1.0, 0.0], dtype=eye.dtype, device=eye.device).expand_as(eye)
    forward = torch.nn.functional.normalize(target - eye, dim=-1)  # camera -z
    right = torch.cross(forward, up, dim=-1)
    # Looking straight up or down: any right vector will do.
    degenerate = right.norm(dim=-1, keepdim=True) < 1e-6
    right = torch.where(degenerate, torch.tensor([1.0, 0.0, 0.0], dtype=eye.dtype, device=eye.device), right)
    right = torch.nn.functional.normalize(right, dim=-1)
    true_up = torch.cross(right, forward, dim=-1)
    c2w = torch.zeros(eye.shape[0], 4, 4, dtype=eye.dtype, device=eye.device)
    c2w[:, :3, 0] = right
    c2w[:, :3, 1] = true_up
    c2w[:, :3, 2] = -forward
    c2w[:, :3, 3] = eye
    c2w[:, 3, 3] = 1.0
    return c2w


def spherical_to_position(elevation_deg: torch.Tensor, azimuth_deg: torch.Tensor, distance: torch.Tensor) -> torch.Tensor:
    e, a = torch.deg2rad(elevation_deg), torch.deg2rad(azimuth_deg)
    return torch.stack([distance * torch.cos(e) * torch.sin(a), distance * torch.sin(e), distance * torch.cos(e) * torch.cos(a)], -1)


def make_cameras(elevation, azimuth, distance, fov_deg, target: torch.Tensor | None = None) -> Cameras:
    """Cameras from per-view spherical coordinates (degrees), all tensors of shape [B]."""
    elevation, azimuth, distance, fov_deg = (torch.as_tensor(v, dtype=torch.float32) for v in (elevation, azimuth, distance, fov_deg))
    elevation, azimuth, distance, fov_deg = torch.broadcast_tensors(elevation, azimuth, distance, fov_deg)
    eye = spherical_to_position(elevation, azimuth, distance)
    if target is None:
        target = torch.zeros_like(eye)
    c2w = look_at(eye + 0.0, target)
    wrapped = torch.remainder(azimuth + 180.0, 360.0) - 180.0
    return Cameras(c2w, torch.deg2rad(fov_deg), elevation.clone(), wrapped, distance.clone())


def sample_cameras(cfg: CameraConfig, batch: int, generator: torch.Generator | None = None,
                   uniforms: torch.Tensor | None = None) -> Cameras:
    """Random training views, each range sampled uniformly per view: by default azimuth stratified over
    the batch so one batch sees all sides; given `uniforms` [batch, >= 4] (points of a sequence, in the
    order azimuth, elevation, distance, fov) the views are those points mapped onto the ranges."""
    if uniforms is None:
        u = lambda: torch.rand(batch, generator=generator)  # noqa: E731
        a = (torch.arange(batch) + u()) / batch
        e, d, f = u(), u(), u()
    else:
        a, e, d, f = uniforms[:, :4].float().unbind(1)
    azimuth = cfg.azimuth[0] + a * (cfg.azimuth[1] - cfg.azimuth[0])
    elevation = cfg.elevation[0] + e * (cfg.elevation[1] - cfg.elevation[0])
    distance = cfg.distance[0] + d * (cfg.distance[1] - cfg.distance[0])
    fov = cfg.fov[0] + f * (cfg.fov[1] - cfg.fov[0])
    target = None
    if cfg.jitter > 0:
        target = torch.randn(batch, 3, generator=generator) * cfg.jitter
    return make_cameras(elevation, azimuth, distance, fov, target)


def orbit_cameras(n: int, elevation: float = 15.0, distance: float = 1.75, fov: float = 55.0) -> Cameras:
    """n views evenly spaced in azimuth at a fixed elevation, starting at the front: for
    validation grids, turntables and the 3D check."""
    azimuth = torch.arange(n, dtype=torch.float32) * (360.0 / n)
    return make_cameras(torch.full((n,), elevation), azimuth, torch.full((n,), distance), torch.full((n,), fov))


def get_rays(c2w: torch.Tensor, fov: torch.Tensor, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    b = c2w.shape[0]
    focal = 0.5 * height / torch.tan(0.5 * fov)  # [B], pixels; square pixels
    j = torch.arange(width, dtype=c2w.dtype, device=c2w.device) + 0.5
    i = torch.arange(height, dtype=c2w.dtype, device=c2w.device) + 0.5
    ii, jj = torch.meshgrid(i, j, indexing="ij")
    f = focal.view(b, 1, 1)
    dirs_cam = torch.stack([(jj - 0.5 * width) / f, -(ii - 0.5 * height) / f, -torch.ones_like(f.expand(b, height, width))], -1)
    dirs = torch.einsum("bij,bhwj->bhwi", c2w[:, :3, :3], dirs_cam)
    dirs = torch.nn.functional.normalize(dirs, dim=-1)
    origins = c2w[:, None, None, :3, 3].expand_as(dirs)
    return origins, dirs


VIEWS = ("front view", "side view", "back view", "overhead view")


def view_suffix(elevation_deg: float, azimuth_deg: float, cfg: CameraConfig | None = None) -> str:
    cfg = cfg or CameraConfig()
    if elevation_deg > cfg.overhead_angle:
        return "overhead view"
    a = abs(math.remainder(azimuth_deg, 360.0))
    if a < cfg.front_angle:
        return "front view"
    if a > 180.0 - cfg.front_angle:
        return "back view"
    return "side view"


def view_prompt(prompt: str, suffix: str) -> str:
    """DreamFusion's view-dependent prompt: the suffix is appended after a comma."""
    return f"{prompt}, {suffix}"


def view_suffixes(cameras: Cameras, cfg: CameraConfig | None = None) -> list[str]:
    return [view_suffix(float(e), float(a), cfg) for e, a in zip(cameras.elevation, cameras.azimuth)]
