"""Per-sample shading modes sampled each step (DreamFusion): albedo only, Lambertian under a
random light, or textureless (white albedo, shading only) which forces geometry to explain the image."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import torch

from ..errors import require, require_choice

MODES = ("albedo", "lambertian", "textureless")
# camera: a random point light near the camera | fixed: the direction light_dir
Light = Literal["camera", "fixed"]


@dataclass
class ShadingConfig:
    albedo_steps: int = 1000  # albedo only before this step
    lambertian_p: float = 0.75  # afterwards, probability that a step is shaded at all
    textureless_p: float = 0.5  # of the shaded steps, probability of textureless
    ambient: float = 0.1  # light level of a surface facing away from the light
    light_jitter: float = 0.5  # std of the light position around the camera (relative to its distance)
    light: Light = "camera"
    light_dir: tuple[float, float, float] = (0.35, 0.85, 0.40)  # towards the light (world), for light=fixed

    def check(self, key: str = "shading") -> None:
        require(0.0 <= self.lambertian_p <= 1.0 and 0.0 <= self.textureless_p <= 1.0, f"{key}.lambertian_p/textureless_p", "in [0, 1]")
        require_choice(self.light, get_args(Light), f"{key}.light")
        require(sum(v * v for v in self.light_dir) > 0, f"{key}.light_dir", "a non-zero direction")


def shade(albedo: torch.Tensor, normals: torch.Tensor | None, light_dir: torch.Tensor | None, mode: str, ambient: float) -> torch.Tensor:
    if mode == "albedo":
        return albedo
    diffuse = (normals * light_dir).sum(-1, keepdim=True).clamp(min=0.0)
    lum = ambient + (1.0 - ambient) * diffuse
    return lum.expand_as(albedo) if mode == "textureless" else albedo * lum


def sample_mode(cfg: ShadingConfig, step: int, generator: torch.Generator | None = None, uniform: float | None = None) -> str:
    """One step's shading mode. `uniform` (a sequence's point for this step) replaces the generator's
    two draws: below lambertian_p the step is shaded, and its rescaled position decides textureless."""
    if uniform is None:
        u = torch.rand(2, generator=generator)
        shaded, textureless = float(u[0]) < cfg.lambertian_p, float(u[1]) < cfg.textureless_p
    else:
        shaded = uniform < cfg.lambertian_p
        textureless = shaded and uniform / cfg.lambertian_p < cfg.textureless_p
    if step < cfg.albedo_steps or not shaded:
        return "albedo"
    return "textureless" if textureless else "lambertian"


def sample_light(camera_positions: torch.Tensor, cfg: ShadingConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """Unit directions towards the light [B, 3]: near each camera, or the fixed direction."""
    if cfg.light == "fixed":
        d = torch.nn.functional.normalize(torch.tensor(cfg.light_dir, dtype=camera_positions.dtype), dim=0)
        return d.to(camera_positions.device).expand_as(camera_positions).clone()
    dist = camera_positions.norm(dim=-1, keepdim=True)
    noise = torch.randn(camera_positions.shape, generator=generator).to(camera_positions) * cfg.light_jitter * dist
    return torch.nn.functional.normalize(camera_positions + noise, dim=-1)
