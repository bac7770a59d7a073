"""The mesh stage: the NeRF's surface (marching cubes) becomes a learnable mesh (vertex offsets)
with a texture field initialised from the NeRF's albedo, rasterised and refined with the same
distillation engine; Laplacian and normal-consistency regularisers keep it smooth."""
from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import torch

from .cameras import sample_cameras
from .config import Config
from .errors import UserError
from .export.extract import ExtractionError, extract_mesh
from .field.mesh import MeshField
from .fsio import atomic_torch_save
from .guidance.engines import injected_loss
from .progress import StepProgress
from .render.shading import sample_light, sample_mode
from .train import NeRFStage, config_fingerprint, load_checkpoint

MESH_PREFIX = "mesh_"


class AlbedoField(torch.nn.Module):
    """The texture field: a NeRF field's albedo head (hash grid + MLP) as a points -> RGB map."""

    def __init__(self, nerf_field):
        super().__init__()
        self.field = nerf_field

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.field(x)[1]


@torch.no_grad()
def extract_from_nerf(field, cfg: Config):
    m = cfg.mesh
    density = lambda x: field.density(x.to(next(field.parameters()).device)).float()  # noqa: E731
    try:
        return extract_mesh(density, field.cfg.bound, resolution=m.grid_resolution, threshold=None if m.threshold < 0 else m.threshold,
                            min_component_fraction=m.min_component_fraction, target_faces=m.target_faces)
    except ExtractionError as err:
        raise UserError(f"mesh extraction failed: {err}") from None


class MeshStage:
    def __init__(self, nerf: NeRFStage, vertices=None, faces=None):
        self.nerf, self.cfg = nerf, nerf.cfg
        self.guidance, self.distiller, self.generator = nerf.guidance, nerf.distiller, nerf.generator
        self.extraction = None
        if vertices is None:
            vertices, faces, self.extraction = extract_from_nerf(nerf.field, self.cfg)
        self.texture = AlbedoField(copy.deepcopy(nerf.field))
        self.mesh = MeshField(vertices, faces, self.texture).to(nerf.device)
        m, t = self.cfg.mesh, self.cfg.train
        groups = [{"params": [self.mesh.offsets], "lr": m.lr_offsets, "name": "offsets"}]
        groups += self.texture.field.param_groups(t.lr_grid * m.lr_scale, t.lr_mlp * m.lr_scale)
        self.optimizer = torch.optim.Adam(groups, betas=(0.9, 0.99), eps=1e-15, fused=True)
        self.step_index = 0

    def render_train(self) -> tuple[dict, object]:
        """Random training views of the mesh (shading continues the NeRF stage's schedule)."""
        cfg, m, gen = self.cfg, self.cfg.mesh, self.generator
        cams = sample_cameras(cfg.camera, cfg.train.batch_size, gen).to(self.nerf.device)
        mode = sample_mode(cfg.shading, cfg.shading.albedo_steps + self.step_index, gen)
        light = sample_light(cams.position, cfg.shading, gen) if mode != "albedo" else None
        _, dirs = cams.rays(m.resolution, m.resolution)
        with torch.no_grad():
            background = self.nerf.background(dirs)
        out = self.mesh.render(cams, m.resolution, m.resolution, background=background, light_direction=light, ambient=cfg.shading.ambient)
        return out, cams

    def draw_noise(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """t from the low-noise end of the schedule (refinement) and the noise."""
        g = self.cfg.guidance
        t = self.guidance.sample_t(x.shape[0], g.t_min, min(self.cfg.mesh.t_max, g.t_max), self.generator)
        return t, torch.randn(x.shape, generator=self.generator).to(x.device, torch.float32)

    def regularizer(self) -> torch.Tensor:
        m = self.cfg.mesh
        return m.lambda_laplacian * self.mesh.laplacian_loss() + m.lambda_normal * self.mesh.normal_consistency_loss()

    def step(self) -> dict:
        gen = self.generator
        t0 = time.perf_counter()
        out, cams = self.render_train()
        x = self.guidance.encode(out["rgb"].permute(0, 3, 1, 2))
        cond = self.nerf.text_for(cams)
        t, noise = self.draw_noise(x)
        grad, logs = self.distiller.gradient(x, out, cams, cond, self.nerf.uncond, t, noise, generator=gen)
        finite = logs.pop("finite")
        reg = self.regularizer()
        loss = injected_loss(x.float(), grad) + reg
        skipped = not (finite and torch.isfinite(loss))
        if not skipped:
            loss.backward()
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step_index += 1
        return {"loss": float(loss.detach()) if not skipped else float("nan"), "reg": float(reg.detach()), "t": int(t[0]), "skipped": skipped,
                "opacity": float(out["opacity"].detach().mean()), **logs, "seconds": time.perf_counter() - t0}

    def state(self) -> dict:
        return {"stage": "mesh", "step": self.step_index, "mesh": self.mesh.state_dict(), "optimizer": self.optimizer.state_dict(),
                "generator": self.generator.get_state(), "config": config_fingerprint(self.cfg), "prompt": self.nerf.prompt,
                "distiller": self.distiller.state_dict()}

    def load_state(self, state: dict) -> None:
        self.mesh.load_state_dict(state["mesh"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        self.distiller.load_state_dict(state.get("distiller", {}))
        self.step_index = int(state["step"])


def mesh_checkpoints(run_dir: Path) -> list[Path]:
    folder = Path(run_dir) / "checkpoints"
    return sorted(folder.glob(f"{MESH_PREFIX}*.pt")) if folder.is_dir() else []


def restore_mesh_stage(nerf: NeRFStage, path: Path) -> MeshStage:
    state = load_checkpoint(path, nerf.device)
    if state.get("config") != config_fingerprint(nerf.cfg) or state.get("prompt") != nerf.prompt:
        raise UserError(f"checkpoint {path.name} was made with a different prompt or config; start a new run folder")
    stage = MeshStage(nerf, state["mesh"]["base_vertices"].cpu(), state["mesh"]["faces"].cpu())
    stage.load_state(state)
    return stage


def save_mesh_checkpoint(run_dir: Path, stage: MeshStage, keep: int) -> Path:
    path = Path(run_dir) / "checkpoints" / f"{MESH_PREFIX}{stage.step_index:07d}.pt"
    state = stage.state()
    atomic_torch_save(path, state)
    for old in mesh_checkpoints(run_dir)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def run_mesh_stage(nerf: NeRFStage, run_dir: Path, resume: bool = False, show_progress: bool = True) -> MeshStage:
    run_dir = Path(run_dir)
    existing = mesh_checkpoints(run_dir) if resume else []
    stage = restore_mesh_stage(nerf, existing[-1]) if existing else MeshStage(nerf)
    if stage.extraction is not None:
        info = {k: v for k, v in stage.extraction.items() if isinstance(v, (int, float, str, list))}
        print(f"mesh: {info.get('faces', len(stage.mesh.faces))} faces, threshold {info.get('threshold', float('nan')):.3g} ({info.get('threshold_rule', '')})")
    m = nerf.cfg.mesh
    with StepProgress(m.steps, stage.step_index, enabled=show_progress, label="mesh") as bar, open(run_dir / "metrics.jsonl", "a") as log:
        while stage.step_index < m.steps:
            info = stage.step()
            log.write(json.dumps({"stage": "mesh", "step": nerf.step_index + stage.step_index, "mesh_step": stage.step_index, **info}) + "\n")
            log.flush()
            bar.update(stage.step_index, info["loss"])
            if stage.step_index % m.ckpt_every == 0 or stage.step_index == m.steps:
                save_mesh_checkpoint(run_dir, stage, nerf.cfg.train.keep_checkpoints)
    if not mesh_checkpoints(run_dir):
        save_mesh_checkpoint(run_dir, stage, nerf.cfg.train.keep_checkpoints)
    return stage
