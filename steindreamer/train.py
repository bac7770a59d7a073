"""The NeRF stage: prompt -> cameras -> render -> guidance -> update, with checkpoints, metrics,
validation renders and resume. One torch.Generator drives every random draw so a run is
deterministic on CPU under its seed and continues identically after --resume."""
from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .cameras import orbit_cameras, sample_cameras, view_prompt, view_suffixes, VIEWS
from .config import Config, to_yaml
from .errors import RunFailed, UserError
from .field.nerf import Background, NeRFField
from .fsio import atomic_save, atomic_torch_save, atomic_write
from .guidance.diffusion import DiffusionGuidance, pick_device
from .guidance.distill import Distiller
from .guidance.engines import injected_loss
from .plots import plot_run
from .progress import StepProgress
from .render.shading import sample_light, sample_mode
from .render.volume import render_views

CKPT_PREFIX = "step_"


class StopTraining(Exception):
    """Raised by a step callback to end the run cleanly (a checkpoint is written first)."""


@dataclass
class RunPaths:
    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def renders(self) -> Path:
        return self.root / "renders"

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / f"{CKPT_PREFIX}{step:07d}.pt"

    def latest_checkpoint(self) -> Path | None:
        found = sorted(self.checkpoints.glob(f"{CKPT_PREFIX}*.pt")) if self.checkpoints.is_dir() else []
        return found[-1] if found else None


def config_fingerprint(cfg: Config) -> str:
    """What a checkpoint must agree with to be resumed: everything but the schedule's length and
    logging cadence (a run may be extended)."""
    text = to_yaml(cfg)
    keep = [line for line in text.splitlines() if not line.strip().startswith(("steps:", "val_every:", "ckpt_every:", "keep_checkpoints:", "threads:", "device:"))]
    return "\n".join(keep)


def check_prompt(prompt: str, builtin: bool) -> str:
    prompt = prompt.strip()
    if not prompt:
        raise UserError("the prompt is empty")
    if len(prompt) > 1000:
        raise UserError(f"the prompt is {len(prompt)} characters long; at most 1000 are allowed")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in prompt):
        raise UserError("the prompt contains control characters")
    if builtin:
        from .toy.vocab import check_prompt as check_vocab

        try:
            check_vocab(prompt)
        except ValueError as err:
            raise UserError(str(err).splitlines()[0]) from None
    return prompt


class NeRFStage:
    """State of the NeRF stage; `step()` does one distillation update."""

    def __init__(self, prompt: str, cfg: Config, guidance: DiffusionGuidance):
        self.prompt, self.cfg, self.guidance = prompt, cfg, guidance
        self.device = guidance.device
        torch.manual_seed(cfg.train.seed)
        self.generator = torch.Generator().manual_seed(cfg.train.seed)
        self.field = NeRFField(cfg.field, self.device).to(self.device)
        self.background = Background(cfg.background).to(self.device)
        t = cfg.train
        groups = self.field.param_groups(t.lr_grid, t.lr_mlp)
        bg_params = list(self.background.parameters())
        if bg_params:
            groups.append({"params": bg_params, "lr": t.lr_mlp, "name": "background"})
        # fused: one kernel for all parameters (a quarter of the foreach step on CPU, measured).
        self.optimizer = torch.optim.Adam(groups, betas=(0.9, 0.99), eps=1e-15, fused=True)
        self.step_index = 0
        self.distiller = Distiller(cfg.guidance, guidance)
        self.uncond = guidance.text_embeddings([""])
        suffixes = VIEWS if cfg.guidance.view_dependent else ("",)
        self.prompts = {s: (view_prompt(prompt, s) if s else prompt) for s in suffixes}
        guidance.text_embeddings(list(self.prompts.values()))  # encode (or load) all views once

    def text_for(self, cameras) -> torch.Tensor:
        if not self.cfg.guidance.view_dependent:
            return self.guidance.text_embeddings([self.prompt] * len(cameras))
        return self.guidance.text_embeddings([self.prompts[s] for s in view_suffixes(cameras, self.cfg.camera)])

    def t_max(self) -> float:
        g = self.cfg.guidance
        return g.anneal_t_max if 0 <= g.anneal_step <= self.step_index else g.t_max

    def render_train(self) -> tuple[dict, object]:
        cfg, gen = self.cfg, self.generator
        cams = sample_cameras(cfg.camera, cfg.train.batch_size, gen).to(self.device)
        mode = sample_mode(cfg.shading, self.step_index, gen)
        light = sample_light(cams.position, cfg.shading, gen) if mode != "albedo" else None
        bg_color = None
        if cfg.background.random_p > 0 and float(torch.rand(1, generator=gen)) < cfg.background.random_p:
            bg_color = torch.rand(len(cams), 3, generator=gen).to(self.device)
        need_normals = cfg.train.lambda_orient > 0 or self.distiller.needs_normals
        out = render_views(self.field, self.background, cams, cfg.render, shading=mode, light_dir=light, bg_color=bg_color,
                           need_normals=need_normals, generator=gen, ambient=cfg.shading.ambient)
        return out, cams

    def step(self) -> dict:
        t_cfg = self.cfg.train
        timings = {}
        t0 = time.perf_counter()
        out, cams = self.render_train()
        rgb = out["rgb"].permute(0, 3, 1, 2)
        x = self.guidance.encode(rgb)
        timings["render"] = time.perf_counter() - t0
        cond = self.text_for(cams)
        t1 = time.perf_counter()
        t, noise = self.draw_noise(x)
        grad, logs = self.distiller.gradient(x, out, cams, cond, self.uncond, t, noise, generator=self.generator)
        finite = logs.pop("finite")
        every = t_cfg.variance_every
        if every > 0 and self.step_index % every == 0:
            logs["variance"] = self.variance_estimate(x, out, cams, cond, t_cfg.variance_draws)
        timings["guidance"] = time.perf_counter() - t1
        t2 = time.perf_counter()
        loss = injected_loss(x.float(), grad) + self.regularizers(out, cams)
        skipped = not (finite and torch.isfinite(loss))
        if not skipped:
            loss.backward()
            skipped = not all(torch.isfinite(p.grad).all() for grp in self.optimizer.param_groups for p in grp["params"] if p.grad is not None)
        if not skipped:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        timings["backward"] = time.perf_counter() - t2
        occupied = self.update_occupancy()
        if occupied is not None:
            logs["occupied"] = occupied
        self.step_index += 1
        return {"loss": float(loss.detach()) if not skipped else float("nan"), "t": int(t[0]), "skipped": skipped, **logs,
                "grad_norm": float(grad.norm() / math.sqrt(grad.numel())), "opacity": float(out["opacity"].detach().mean()), **{f"time_{k}": v for k, v in timings.items()}}

    def update_occupancy(self) -> float | None:
        """Every `update_every` steps, refresh the occupancy grid; returns the occupied fraction then."""
        grid = self.field.occupancy
        if grid is None or self.step_index % grid.cfg.update_every != 0:
            return None
        return grid.update(self.field.density, self.generator)

    def draw_noise(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = self.guidance.sample_t(x.shape[0], self.cfg.guidance.t_min, self.t_max(), self.generator)
        noise = torch.randn(x.shape, generator=self.generator).to(x.device, torch.float32)
        return t, noise

    def variance_estimate(self, x, out, cams, cond, draws: int) -> float:
        """Cheap variance meter: mean per-element variance of G over a few extra (t, noise) draws at
        this render, learning nothing from them. The full meter (camera draws, theta space) is in
        scripts/bench_engines.py."""
        samples = []
        for _ in range(draws):
            t, noise = self.draw_noise(x)
            g, _ = self.distiller.gradient(x, out, cams, cond, self.uncond, t, noise, update=False)
            samples.append(g.float())
        return float(torch.stack(samples).var(0, unbiased=True).mean())

    def regularizers(self, out: dict, cams) -> torch.Tensor:
        t = self.cfg.train
        reg = torch.zeros((), device=self.device)
        opacity = out["opacity"].clamp(1e-5, 1 - 1e-5)
        if t.lambda_opacity > 0:
            reg = reg + t.lambda_opacity * opacity.mean()
        if t.lambda_entropy > 0:
            reg = reg + t.lambda_entropy * (-(opacity * opacity.log() + (1 - opacity) * (1 - opacity).log())).mean()
        if t.lambda_orient > 0 and "normal" in out:
            # DreamFusion's orientation loss: penalise visible normals facing away from the camera.
            origins, dirs = cams.rays(out["normal"].shape[1], out["normal"].shape[2])
            facing = (out["normal"] * dirs).sum(-1, keepdim=True).clamp(min=0.0)
            reg = reg + t.lambda_orient * (out["opacity"].detach() * facing**2).mean()
        return reg

    # --- checkpoints ------------------------------------------------------------------------------
    def state(self) -> dict:
        return {"step": self.step_index, "field": self.field.state_dict(), "background": self.background.state_dict(),
                "optimizer": self.optimizer.state_dict(), "generator": self.generator.get_state(),
                "config": config_fingerprint(self.cfg), "prompt": self.prompt, "distiller": self.distiller.state_dict()}

    def load_state(self, state: dict) -> None:
        self.field.load_state_dict(state["field"])
        self.background.load_state_dict(state["background"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        self.step_index = int(state["step"])
        self.distiller.load_state_dict(state.get("distiller", {}))


def save_checkpoint(paths: RunPaths, stage: NeRFStage, keep: int) -> Path:
    path = paths.checkpoint(stage.step_index)
    state = stage.state()
    atomic_torch_save(path, state)
    # Older checkpoints go only once the new one is complete on disk.
    for old in sorted(paths.checkpoints.glob(f"{CKPT_PREFIX}*.pt"))[:-keep]:
        old.unlink(missing_ok=True)
    return path


def load_checkpoint(path: Path, device) -> dict:
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as err:  # noqa: BLE001 - truncated or foreign files
        raise UserError(f"checkpoint {path} cannot be read ({type(err).__name__}); delete it to fall back to an older one") from None


@torch.no_grad()
def render_orbit(field, background, cfg: Config, n: int, resolution: int | None = None, elevation: float = 15.0) -> dict:
    cams = orbit_cameras(n, elevation=elevation, distance=float(np.mean(cfg.camera.distance)), fov=float(np.mean(cfg.camera.fov)))
    return render_views(field, background, cams.to(next(field.parameters()).device), cfg.render, resolution, perturb=False)


def image_grid(out: dict) -> np.ndarray:
    """Top row RGB, bottom row opacity, one column per view."""
    rgb = out["rgb"].clamp(0, 1).cpu().numpy()
    alpha = out["opacity"].clamp(0, 1).expand_as(out["rgb"]).cpu().numpy()
    rows = [np.concatenate(list(rgb), 1), np.concatenate(list(alpha), 1)]
    return (np.concatenate(rows, 0) * 255).round().astype(np.uint8)


def save_png(path: Path, image: np.ndarray) -> None:
    import imageio.v3 as iio

    atomic_save(path, lambda tmp: iio.imwrite(tmp, image, extension=".png"))


def run_nerf_stage(prompt: str, cfg: Config, run_dir: Path, resume: bool = False, show_progress: bool = True,
                   callbacks: tuple = ()) -> dict:
    """Train (or continue) the NeRF stage. Each callback is called as cb(stage, info) after every step
    (the live viewer, tests); a callback may raise StopTraining to end the run after a checkpoint."""
    paths = RunPaths(Path(run_dir))
    device = pick_device(cfg.train.device)
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    guidance = DiffusionGuidance(cfg.guidance.model, device, cfg.guidance.half_precision, cfg.guidance.cache_dir)
    prompt = check_prompt(prompt, guidance.is_builtin)
    stage = NeRFStage(prompt, cfg, guidance)
    latest = paths.latest_checkpoint() if resume else None
    if latest is not None:
        state = load_checkpoint(latest, device)
        if state.get("config") != config_fingerprint(cfg) or state.get("prompt") != prompt:
            raise UserError(f"checkpoint {latest.name} was made with a different prompt or config; start a new run folder")
        stage.load_state(state)
    _trim_metrics(paths.metrics, stage.step_index)
    steps = cfg.train.steps
    last: dict = {}
    start = time.perf_counter()
    for stale in paths.checkpoints.glob(".*.tmp") if paths.checkpoints.is_dir() else ():
        stale.unlink(missing_ok=True)  # a write cut by a crash; the completed checkpoints are intact
    guard = DivergenceGuard(stage, cfg.train)
    with StepProgress(steps, stage.step_index, enabled=show_progress) as bar, open(paths.metrics, "a") as log:
        while stage.step_index < steps:
            t0 = time.perf_counter()
            info = stage.step()
            info = {"step": stage.step_index, **info, "seconds": time.perf_counter() - t0, "engine": cfg.guidance.engine}
            note = guard.check(info)
            if note:
                info["recovery"] = note
                bar.log(note)
            log.write(json.dumps(info) + "\n")
            log.flush()
            bar.update(stage.step_index, info["loss"])
            last = info
            if stage.step_index % cfg.train.val_every == 0 or stage.step_index == steps:
                save_png(paths.renders / f"val_{stage.step_index:07d}.png", image_grid(render_orbit(stage.field, stage.background, cfg, cfg.train.val_views)))
                plot_run(paths.root)
            stop = False
            for callback in callbacks:
                try:
                    callback(stage, info)
                except StopTraining:
                    stop = True
            if stop or stage.step_index % cfg.train.ckpt_every == 0 or stage.step_index == steps:
                if guard.healthy():
                    save_checkpoint(paths, stage, cfg.train.keep_checkpoints)
                    guard.remember()
            if stop:
                break
    if paths.latest_checkpoint() is None:  # steps=0, or resumed at the end: still leave a checkpoint
        save_checkpoint(paths, stage, cfg.train.keep_checkpoints)
    return {"step": stage.step_index, "seconds": time.perf_counter() - start, "last": last, "stage": stage}


class DivergenceGuard:
    """NaN/Inf in G, the loss or the gradients skips the step (NeRFStage.step); after `nan_patience`
    bad steps in a row the last good state (the newest checkpoint's, kept in memory) comes back with
    the learning rates scaled by `restore_lr_factor`; after `max_restores` restores the run stops with
    one line, its last good checkpoint intact on disk."""

    def __init__(self, stage: NeRFStage, cfg):
        self.stage, self.cfg = stage, cfg
        self.bad = 0
        self.restores = 0
        self.remember()

    def remember(self) -> None:
        self.good = copy.deepcopy(self.stage.state())

    def healthy(self) -> bool:
        return self.bad == 0 and all(torch.isfinite(p).all() for p in self.stage.field.parameters())

    def check(self, info: dict) -> str | None:
        if not info.get("skipped") and self.healthy():
            self.bad = 0
            return None
        self.bad += 1
        if self.bad < self.cfg.nan_patience:
            return None
        if self.restores >= self.cfg.max_restores:
            raise RunFailed(f"training diverged: {self.bad} non-finite steps in a row after {self.restores} restores with lower learning rates; "
                            f"last good checkpoint kept (step {self.good['step']})")
        self.restores += 1
        step = self.stage.step_index
        self.stage.load_state(copy.deepcopy(self.good))
        self.stage.step_index = step  # keep counting forward: the restored state resumes from here
        for group in self.stage.optimizer.param_groups:
            group["lr"] *= self.cfg.restore_lr_factor ** self.restores
        self.bad = 0
        return (f"step {step}: {self.cfg.nan_patience} non-finite steps in a row; restored the state of step {self.good['step']} "
                f"with learning rates x{self.cfg.restore_lr_factor ** self.restores:g}")


def _trim_metrics(path: Path, step: int) -> None:
    """On resume, drop metric lines past the checkpoint so the log has each step once."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except json.JSONDecodeError:
            continue  # a line cut by a crash
    atomic_write(path, "".join(k + "\n" for k in kept))
