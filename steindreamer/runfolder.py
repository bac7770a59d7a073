"""The run folder, and the one place that knows its layout::

    config.yaml   the resolved config          prompt.txt   the prompt as typed (stripped)
    metrics.jsonl one JSON object per step     result.json  what `generate` produced
    checkpoints/  step_NNNNNNN.pt (NeRF stage), mesh_NNNNNNN.pt (mesh stage)
    renders/      validation grids and the turntable's contact sheet
    model.glb, mesh.obj (+ .mtl, .png), mesh.ply, turntable.mp4, loss.png, variance.png

Checkpoints are written atomically and load with `weights_only=True`; a checkpoint is resumed only
under the config and prompt it was made with (`fingerprint`)."""
from __future__ import annotations

import contextlib
import json
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Iterator, Literal

import torch

from .config import Config, from_yaml_text, to_yaml
from .errors import UserError
from .fsio import atomic_save, atomic_torch_save, atomic_write

StageName = Literal["nerf", "mesh"]
PREFIX: dict[str, str] = {"nerf": "step_", "mesh": "mesh_"}
# What a run may change and still resume: the schedule's length, its cadences and where it runs.
RESUMABLE_CHANGES = {"train": ("steps", "val_every", "ckpt_every", "keep_checkpoints", "threads", "device"),
                     "mesh": ("steps", "val_every", "ckpt_every")}


def fingerprint(cfg: Config) -> str:
    """What a checkpoint must agree with to be resumed: every config field but RESUMABLE_CHANGES."""
    fields = asdict(cfg)
    for section, names in RESUMABLE_CHANGES.items():
        for name in names:
            fields[section].pop(name, None)
    return json.dumps(fields, sort_keys=True, default=str)


class RunFolder:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    config = property(lambda self: self.root / "config.yaml")
    prompt_file = property(lambda self: self.root / "prompt.txt")
    checkpoints = property(lambda self: self.root / "checkpoints")
    metrics = property(lambda self: self.root / "metrics.jsonl")
    renders = property(lambda self: self.root / "renders")
    result = property(lambda self: self.root / "result.json")

    # --- starting and reading a run ---------------------------------------------------------------
    def started(self) -> bool:
        return self.config.exists() or self.checkpoints.exists()

    def prepare(self, resume: bool, overwrite: bool) -> None:
        """Make the folder ready for a run: refuse to reuse a started one unless resuming or
        overwriting, check it is writable, and (resuming) sweep temp files of writes a crash cut."""
        if self.root.exists() and not self.root.is_dir():
            raise UserError(f"output path exists and is not a folder: {self.root}")
        if self.started() and not resume:
            if not overwrite:
                raise UserError(f"run folder {self.root} already exists; use --resume to continue it or --overwrite to start over")
            shutil.rmtree(self.root)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / ".write-test"
            probe.write_bytes(b"")
            probe.unlink()
            if resume:
                self.sweep_temp()
        except OSError as err:
            raise UserError(f"cannot write to output folder {self.root}: {err.strerror or err}") from None

    def sweep_temp(self) -> None:
        """Temp files of writes cut by a crash (fsio writes `.NAME.*.tmp` next to the target)."""
        for folder in (self.root, self.renders, self.checkpoints):
            for stale in folder.glob(".*.tmp") if folder.is_dir() else ():
                stale.unlink(missing_ok=True)

    def write_start(self, cfg: Config, prompt: str) -> None:
        try:
            atomic_write(self.config, to_yaml(cfg))
            atomic_write(self.prompt_file, prompt + "\n")
        except OSError as err:
            raise UserError(f"cannot write to output folder {self.root}: {err.strerror or err}") from None

    def config_text(self) -> str:
        if not self.root.is_dir():
            raise UserError(f"run folder not found: {self.root}")
        if not self.config.is_file():
            raise UserError(f"not a run folder (no config.yaml): {self.root}")
        try:
            return self.config.read_text()
        except OSError as err:
            raise UserError(f"cannot read {self.config}: {err.strerror}") from None

    def read_config(self) -> Config:
        return from_yaml_text(self.config_text())

    # --- checkpoints ------------------------------------------------------------------------------
    def checkpoint_path(self, stage: StageName, step: int) -> Path:
        return self.checkpoints / f"{PREFIX[stage]}{step:07d}.pt"

    def checkpoints_of(self, stage: StageName) -> list[Path]:
        return sorted(self.checkpoints.glob(f"{PREFIX[stage]}*.pt")) if self.checkpoints.is_dir() else []

    def latest(self, stage: StageName) -> Path | None:
        found = self.checkpoints_of(stage)
        return found[-1] if found else None

    def latest_step(self, stage: StageName) -> int | None:
        latest = self.latest(stage)
        try:
            return int(latest.stem[len(PREFIX[stage]):]) if latest is not None else None
        except ValueError:
            return None

    def save_checkpoint(self, stage: StageName, step: int, state: dict, keep: int) -> Path:
        """Write atomically, then prune: older checkpoints go only once the new one is on disk."""
        path = self.checkpoint_path(stage, step)
        atomic_torch_save(path, state)
        self.prune(stage, keep)
        return path

    def prune(self, stage: StageName, keep: int) -> None:
        """Keep `stage`'s newest `keep` checkpoints. Also run when a stage starts: a kill between a
        checkpoint's rename and this pruning leaves one too many, and a finished stage saves no more."""
        for old in self.checkpoints_of(stage)[:-keep]:
            old.unlink(missing_ok=True)

    @staticmethod
    def load_checkpoint(path: Path, device="cpu") -> dict:
        try:
            return torch.load(path, map_location=device, weights_only=True)
        except Exception as err:  # noqa: BLE001 - truncated or foreign files
            raise UserError(f"checkpoint {path} cannot be read ({type(err).__name__}); delete it to fall back to an older one") from None

    def resume_state(self, stage: StageName, cfg: Config, prompt: str, device) -> dict | None:
        """The newest checkpoint of `stage`, refused unless made with this config and prompt."""
        latest = self.latest(stage)
        if latest is None:
            return None
        state = self.load_checkpoint(latest, device)
        if state.get("config") != fingerprint(cfg) or state.get("prompt") != prompt:
            raise UserError(f"checkpoint {latest.name} was made with a different prompt or config; start a new run folder")
        return state

    # --- metrics and pictures ---------------------------------------------------------------------
    def trim_metrics(self, stage: StageName, step: int) -> None:
        """On resume, drop `stage`'s metric lines past its checkpoint (global `step`), so the log has
        each step once; other stages' lines stay."""
        if not self.metrics.exists():
            return
        lines = self.metrics.read_text().splitlines()
        kept = []
        for line in lines:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a crash
            if row.get("stage", "nerf") != stage or row.get("step", 0) <= step:
                kept.append(line)
        if len(kept) < len(lines):  # a fresh stage (the mesh stage after the NeRF's) rewrites nothing
            atomic_write(self.metrics, "".join(k + "\n" for k in kept))

    @contextlib.contextmanager
    def metrics_log(self) -> Iterator:
        with open(self.metrics, "a") as log:
            yield log

    def save_png(self, relative: str, image) -> Path:
        import imageio.v3 as iio

        path = self.root / relative
        atomic_save(path, lambda tmp: iio.imwrite(tmp, image, extension=".png"))
        return path

    def files(self) -> list[str]:
        return sorted(str(p.relative_to(self.root)) for p in self.root.rglob("*") if p.is_file() and not p.name.startswith("."))

    # --- the trained models -----------------------------------------------------------------------
    def load_nerf(self, cfg: Config, device="cpu"):
        """(field, background, step) of the newest NeRF checkpoint, in eval mode."""
        from .field.nerf import Background, NeRFField

        latest = self.latest("nerf")
        if latest is None:
            raise UserError(f"no NeRF checkpoint in {self.checkpoints}")
        state = self.load_checkpoint(latest, device)
        field, background = NeRFField(cfg.field, device).to(device), Background(cfg.background).to(device)
        try:
            field.load_state_dict(state["field"])
            background.load_state_dict(state["background"])
        except (KeyError, RuntimeError) as err:
            raise UserError(f"checkpoint {latest.name} does not match the run's config.yaml ({type(err).__name__})") from None
        return field.eval(), background.eval(), int(state.get("step", 0))

    def load_mesh(self, cfg: Config, device="cpu"):
        """(vertices, faces, albedo module) of the newest mesh-stage checkpoint, or None."""
        from .field.mesh import MeshField
        from .field.nerf import AlbedoField, NeRFField

        latest = self.latest("mesh")
        if latest is None:
            return None
        state = self.load_checkpoint(latest, device)["mesh"]
        texture = AlbedoField(NeRFField(cfg.field, device))
        mesh = MeshField(state["base_vertices"].cpu(), state["faces"].cpu(), texture).to(device)
        try:
            mesh.load_state_dict(state)
        except (KeyError, RuntimeError) as err:
            raise UserError(f"checkpoint {latest.name} does not match the run's config.yaml ({type(err).__name__})") from None
        v, f = mesh.export_arrays()
        return v, f, texture.eval()
