"""The mesh stage: the NeRF's surface (marching cubes) becomes a learnable mesh (vertex offsets)
with a texture field initialised from the NeRF's albedo, rasterised, shaded as the NeRF stage
shades and refined with the same distillation engine; Laplacian and normal-consistency
regularisers keep it smooth."""
from __future__ import annotations

import copy

import numpy as np
import torch

from ..cameras import orbit_cameras
from ..export.extract import extract_field_surface
from ..field.mesh import MeshField
from ..field.nerf import AlbedoField, NeRFField
from ..render.shading import sample_light
from ..render.volume import to_uint8
from .context import Context
from .stage import Cadence, Stage, image_grid


class MeshStage(Stage):
    name = "mesh"

    def __init__(self, ctx: Context, nerf_field: NeRFField, vertices=None, faces=None):
        """Extracts the surface of `nerf_field` unless `vertices` and `faces` are given (resume)."""
        super().__init__(ctx)
        m, t = self.cfg.mesh, self.cfg.train
        self.cadence = Cadence(m.steps, m.ckpt_every, m.val_every, t.keep_checkpoints)
        self.extraction = None
        if vertices is None:
            vertices, faces, self.extraction = extract_field_surface(nerf_field, m)
        self.texture = AlbedoField(copy.deepcopy(nerf_field))
        self.mesh = MeshField(vertices, faces, self.texture).to(self.device)
        groups = [{"params": [self.mesh.offsets], "lr": m.lr_offsets, "name": "offsets"}]
        groups += self.texture.field.param_groups(t.lr_grid * m.lr_scale, t.lr_mlp * m.lr_scale)
        self.optimizer = torch.optim.Adam(groups, betas=(0.9, 0.99), eps=1e-15, fused=True)

    def notes(self) -> list[str]:
        """What the extraction found."""
        if self.extraction is None:
            return []
        e = self.extraction
        return [f"mesh: {e.get('faces', len(self.mesh.faces))} faces, threshold {e.get('threshold', float('nan')):.3g} ({e.get('threshold_rule', '')})"]

    def t_range(self) -> tuple[float, float]:
        """The low-noise end of the schedule (refinement)."""
        g = self.cfg.guidance
        return g.t_min, min(self.cfg.mesh.t_max, g.t_max)

    def _render(self, cams, height: int, width: int, shading: str = "albedo", light=None) -> dict:
        """The mesh over the run's background (the NeRF stage's, frozen)."""
        _, dirs = cams.rays(height, width)
        with torch.no_grad():
            background = self.ctx.background(dirs)
        return self.mesh.render(cams, height, width, background=background, light_direction=light,
                                ambient=self.cfg.shading.ambient, shading=shading)

    def render_train(self) -> tuple[dict, object]:
        """Random training views, shaded on the NeRF stage's schedule continued past its warm-up."""
        cfg, gen = self.cfg, self.ctx.generator
        cams, mode = self.ctx.sample_views(self.step_index, cfg.shading.albedo_steps + self.step_index)
        light = sample_light(cams.position, cfg.shading, gen) if mode != "albedo" else None
        return self._render(cams, cfg.mesh.resolution, cfg.mesh.resolution, mode, light), cams

    def regularizers(self, out: dict, cams) -> torch.Tensor:
        m = self.cfg.mesh
        return m.lambda_laplacian * self.mesh.laplacian_loss() + m.lambda_normal * self.mesh.normal_consistency_loss()

    @torch.no_grad()
    def validation_grid(self) -> np.ndarray:
        cfg = self.cfg
        cams = orbit_cameras(cfg.train.val_views, elevation=15.0, distance=float(np.mean(cfg.camera.distance)), fov=float(np.mean(cfg.camera.fov)))
        return image_grid(self._render(cams.to(self.device), cfg.mesh.resolution, cfg.mesh.resolution))

    @torch.no_grad()
    def preview(self, cameras, height: int, width: int) -> np.ndarray:
        out = self._render(cameras.to(self.device), height, width)
        return to_uint8(out["rgb"][0])

    def state_dict(self) -> dict:
        return {"mesh": self.mesh.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.mesh.load_state_dict(state["mesh"])
        self.optimizer.load_state_dict(state["optimizer"])
