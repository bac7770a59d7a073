"""The NeRF stage's radiance field: hash grid + small MLP for density and albedo, a Magic3D-style
density blob at the origin, and the background models."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

import torch
from torch import nn

from ..errors import require, require_choice
from ..render.occupancy import OccupancyConfig, OccupancyGrid
from .hashgrid import HashGridConfig, make_hashgrid

BackgroundKind = Literal["mlp", "white", "black"]  # mlp: an environment map on the view direction


@dataclass
class FieldConfig:
    grid: HashGridConfig = field(default_factory=HashGridConfig)
    hidden: int = 64  # width of the density/albedo MLP
    layers: int = 1  # hidden layers of the density/albedo MLP
    bound: float = 1.0  # radius of the scene sphere; the field lives in [-bound, bound]^3
    blob_density: float = 10.0  # Magic3D blob: density bias scale * (1 - |x| / radius) ...
    blob_radius: float = 0.5  # ... inside this radius (world units)
    occupancy: OccupancyConfig = field(default_factory=OccupancyConfig)  # skip empty space when rendering

    def check(self, key: str = "field") -> None:
        require(self.bound > 0 and self.blob_radius > 0, f"{key}.bound/blob_radius", "> 0")
        self.grid.check(f"{key}.grid")
        self.occupancy.check(f"{key}.occupancy")


@dataclass
class BackgroundConfig:
    kind: BackgroundKind = "mlp"
    random_p: float = 0.5  # probability per step of a random solid colour instead (training only)

    def check(self, key: str = "background") -> None:
        require_choice(self.kind, get_args(BackgroundKind), f"{key}.kind")
        require(0.0 <= self.random_p <= 1.0, f"{key}.random_p", "in [0, 1]")


def mlp(d_in: int, hidden: int, d_out: int, layers: int) -> nn.Sequential:
    mods: list[nn.Module] = []
    d = d_in
    for _ in range(layers):
        mods += [nn.Linear(d, hidden), nn.ReLU(inplace=True)]
        d = hidden
    mods.append(nn.Linear(d, d_out))
    return nn.Sequential(*mods)


class NeRFField(nn.Module):
    def __init__(self, cfg: FieldConfig, device="cpu"):
        super().__init__()
        self.cfg = cfg
        self.encoding = make_hashgrid(cfg.grid, cfg.bound, device)
        self.net = mlp(self.encoding.out_dim, cfg.hidden, 4, cfg.layers)
        self.occupancy = OccupancyGrid(cfg.occupancy, cfg.bound) if cfg.occupancy.resolution > 0 else None

    def density_bias(self, x: torch.Tensor) -> torch.Tensor:
        # Magic3D's blob: a dense ball at the origin so early gradients shape an object, not fog.
        return self.cfg.blob_density * (1.0 - x.norm(dim=-1) / self.cfg.blob_radius)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Density [...] (>= 0) and albedo [..., 3] in [0, 1] at points x [..., 3]."""
        h = self.net(self.encoding(x))
        sigma = nn.functional.softplus(h[..., 0] + self.density_bias(x))
        return sigma, torch.sigmoid(h[..., 1:])

    def density(self, x: torch.Tensor) -> torch.Tensor:
        return self(x)[0]

    def param_groups(self, lr_grid: float, lr_mlp: float) -> list[dict]:
        return [
            {"params": list(self.encoding.parameters()), "lr": lr_grid, "name": "grid"},
            {"params": list(self.net.parameters()), "lr": lr_mlp, "name": "mlp"},
        ]


class Background(nn.Module):
    """Environment colour as a function of the view direction, or a fixed colour."""

    def __init__(self, cfg: BackgroundConfig, frequencies: int = 4, hidden: int = 32):
        super().__init__()
        self.cfg, self.frequencies = cfg, frequencies
        self.net = mlp(3 + 6 * frequencies, hidden, 3, 1) if cfg.kind == "mlp" else None

    def forward(self, dirs: torch.Tensor) -> torch.Tensor:
        if self.cfg.kind == "white":
            return torch.ones_like(dirs)
        if self.cfg.kind == "black":
            return torch.zeros_like(dirs)
        freqs = 2.0 ** torch.arange(self.frequencies, device=dirs.device, dtype=dirs.dtype)
        ang = dirs[..., None, :] * freqs[:, None]  # [..., F, 3]
        enc = torch.cat([dirs, ang.sin().flatten(-2), ang.cos().flatten(-2)], -1)
        return torch.sigmoid(self.net(enc))


class AlbedoField(nn.Module):
    """A NeRF field's albedo head as a points -> RGB map: the mesh stage's texture and the colour
    that export bakes."""

    def __init__(self, nerf_field: NeRFField):
        super().__init__()
        self.field = nerf_field

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.field(x)[1]
