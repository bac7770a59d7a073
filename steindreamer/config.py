"""One typed config per component, composed here. Presets are YAML files in `configs/`, merged over
the dataclass defaults, then `key=value` overrides (dotted keys or the short keys below). Anything
unknown or out of range is rejected before any work with one line naming the key.

Each component's dataclass lives beside the code it configures (CameraConfig in cameras.py,
RenderConfig in render/volume.py, ...) with a `check(key)` method next to its fields; choice fields
are `Literal`s, which OmegaConf enforces on every merge. `validate` walks the tree; checks that span
components are in `Config.check`."""
from __future__ import annotations

from dataclasses import dataclass, field as dc_field, fields
from pathlib import Path
from typing import Sequence

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .cameras import CameraConfig
from .errors import UserError, require
from .export.extract import ThresholdRule
from .export.pipeline import FORMATS, ExportFormat
from .field.nerf import BackgroundConfig, FieldConfig
from .guidance.config import GuidanceConfig, SSDConfig, VSDConfig
from .render.shading import ShadingConfig
from .render.volume import RenderConfig

PRESET_DIR = Path(__file__).parent / "configs"
SHORT_KEYS = {
    "model": "guidance.model",
    "depth_model": "guidance.ssd.depth_model",
    "engine": "guidance.engine",
    "divergence": "guidance.vsd.divergence",
    "seed": "train.seed",
    "steps": "train.steps",
    "resolution": "render.resolution",
}


@dataclass
class TrainConfig:
    steps: int = 10000  # steps of the NeRF stage
    batch_size: int = 1  # views per step
    seed: int = 0  # of every random draw of a run
    lr_grid: float = 1e-2  # Adam learning rate of the hash grid
    lr_mlp: float = 1e-3  # ... and of the MLPs
    val_every: int = 500  # a validation grid (renders/) every N steps
    val_views: int = 4  # views in it
    # loss.png / variance.png at a validation only when this many seconds passed since the last
    # plot (always at a stage's end): a plot costs ~0.5-1 s on a CPU, ~5 % of a toy asset's time
    plot_every_s: float = 30.0
    ckpt_every: int = 500  # a checkpoint every N steps
    keep_checkpoints: int = 3  # the newest N are kept
    lambda_opacity: float = 0.0  # sparsity: mean opacity
    lambda_entropy: float = 0.0  # binary entropy of opacity
    lambda_orient: float = 0.0  # normals facing away from the camera (needs normals)
    nan_patience: int = 5  # non-finite steps in a row before restoring the last good state
    max_restores: int = 3  # restores before the run fails
    restore_lr_factor: float = 0.5  # learning rates times this at each restore
    variance_every: int = 50  # cheap variance meter every N steps (0: off)
    variance_draws: int = 4  # extra draws (t, noise) of G per measurement
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    threads: int = 0  # CPU threads for torch, 0 = torch's default
    # torch's deterministic algorithms (process-wide, set when a run is built): with more than one
    # thread, some reductions (scatter_add, index_add) sum in an order that depends on thread timing,
    # so two runs of one seed differed on a loaded machine (and a resumed run from an uninterrupted one)
    deterministic: bool = True

    def check(self, key: str = "train") -> None:
        require(self.steps >= 0, f"{key}.steps", "a non-negative integer")
        require(self.batch_size >= 1, f"{key}.batch_size", ">= 1")
        for name in ("val_every", "ckpt_every", "keep_checkpoints", "val_views"):
            require(getattr(self, name) >= 1, f"{key}.{name}", ">= 1")
        require(self.lr_grid > 0 and self.lr_mlp > 0, f"{key}.lr_grid/lr_mlp", "> 0")
        require(self.threads >= 0, f"{key}.threads", ">= 0")
        require(self.plot_every_s >= 0, f"{key}.plot_every_s", ">= 0")
        require(self.nan_patience >= 1 and self.max_restores >= 0, f"{key}.nan_patience/max_restores", ">= 1 and >= 0")
        require(0 < self.restore_lr_factor <= 1, f"{key}.restore_lr_factor", "in (0, 1]")
        require(self.variance_every >= 0 and self.variance_draws >= 2, f"{key}.variance_every/variance_draws", ">= 0 and >= 2")
        require(self.device in ("auto", "cpu") or self.device.startswith("cuda"), f"{key}.device", "auto, cpu, cuda or cuda:N")


@dataclass
class MeshConfig:
    enabled: bool = True  # the mesh stage of `generate` (--no-mesh: export the NeRF's surface as is)
    steps: int = 1000  # steps of the mesh stage
    resolution: int = 128  # render size of the mesh stage
    t_max: float = 0.5  # refinement uses the low-noise end of the schedule
    grid_resolution: int = 128  # marching-cubes grid along the occupied box's longest side
    threshold: float = -1.0  # density iso-level; < 0: automatic, by threshold_rule
    threshold_rule: ThresholdRule = "silhouette"  # the automatic rule: the NeRF's rendered silhouettes, Otsu on log density, or mean
    fill_cavities: bool = True  # fill enclosed empty regions: the mesh is the outer shell only
    target_faces: int = 30000  # faces after decimation
    min_component_fraction: float = 0.05  # drop floaters smaller than this fraction of the largest piece
    lr_offsets: float = 1e-3  # learning rate of the vertex offsets
    lr_scale: float = 0.1  # texture field learning rates relative to train.lr_grid / lr_mlp
    lambda_laplacian: float = 1000.0  # uniform-Laplacian smoothness of the mesh
    lambda_normal: float = 1000.0  # normal consistency of adjacent faces
    ckpt_every: int = 200  # a checkpoint every N mesh steps
    val_every: int = 0  # a validation grid (renders/val_mesh_*.png) every N mesh steps and at the end; 0: none

    def check(self, key: str = "mesh") -> None:  # t_max against guidance.t_min: Config.check
        require(self.steps >= 0 and self.ckpt_every >= 1, f"{key}.steps/ckpt_every", ">= 0 and >= 1")
        require(self.val_every >= 0, f"{key}.val_every", ">= 0")
        require(self.resolution >= 8 and self.resolution % 8 == 0, f"{key}.resolution", "a positive multiple of 8")
        require(16 <= self.grid_resolution <= 1024, f"{key}.grid_resolution", "in [16, 1024]")
        require(self.target_faces >= 100, f"{key}.target_faces", ">= 100")
        require(0.0 <= self.min_component_fraction < 1.0, f"{key}.min_component_fraction", "in [0, 1)")
        require(self.lr_offsets >= 0 and self.lr_scale >= 0 and self.lambda_laplacian >= 0 and self.lambda_normal >= 0,
                f"{key}.lr_*/lambda_*", ">= 0")


@dataclass
class ExportConfig:
    formats: list[ExportFormat] = dc_field(default_factory=lambda: ["glb", "obj"])  # files `generate` writes
    texture_size: int = 1024  # baked texture, pixels per side
    turntable: bool = True  # render turntable.mp4
    turntable_frames: int = 36  # frames of the video (one turn)
    turntable_size: int = 256  # pixels per side
    turntable_elevation: float = 15.0  # degrees

    def check(self, key: str = "export") -> None:
        allowed = FORMATS
        require(bool(self.formats) and set(self.formats) <= set(allowed), f"{key}.formats", f"a non-empty list of {', '.join(allowed)}")
        require(16 <= self.texture_size <= 8192, f"{key}.texture_size", "in [16, 8192]")
        require(self.turntable_frames >= 1 and self.turntable_size >= 8, f"{key}.turntable_frames/turntable_size", ">= 1 and >= 8")


@dataclass
class Config:
    camera: CameraConfig = dc_field(default_factory=CameraConfig)
    field: FieldConfig = dc_field(default_factory=FieldConfig)
    background: BackgroundConfig = dc_field(default_factory=BackgroundConfig)
    render: RenderConfig = dc_field(default_factory=RenderConfig)
    shading: ShadingConfig = dc_field(default_factory=ShadingConfig)
    guidance: GuidanceConfig = dc_field(default_factory=GuidanceConfig)
    train: TrainConfig = dc_field(default_factory=TrainConfig)
    mesh: MeshConfig = dc_field(default_factory=MeshConfig)
    export: ExportConfig = dc_field(default_factory=ExportConfig)

    def check(self) -> None:
        """What spans components (each component's own ranges: its `check`, run by `validate`)."""
        require(self.guidance.t_min < self.mesh.t_max <= 1.0, "mesh.t_max", "in (guidance.t_min, 1]")


def check_machine(cfg: Config) -> None:
    """What this machine cannot serve, refused as one line (UserError) before any model loads or any
    folder is made: a CUDA device without CUDA, an accelerated backend named that does not run here
    ("auto" always runs: it falls back to PyTorch)."""
    import torch

    from .backends import hashgrid_backend, volume_backend
    from .field import hashgrid_cpu

    device = cfg.train.device
    cuda = torch.cuda.is_available()
    if device == "auto":
        device = "cuda" if cuda else "cpu"
    require(device == "cpu" or cuda, "train.device", "auto or cpu on this machine (CUDA is not available)")
    picks = {"render.backend": (cfg.render.backend, lambda r: volume_backend(device, r)),
             "field.grid.backend": (cfg.field.grid.backend, lambda r: hashgrid_backend(device, r, cpu_kernel=hashgrid_cpu.library))}
    for key, (requested, pick) in picks.items():
        if requested in ("auto", "torch"):
            continue
        try:
            pick(requested)
        except RuntimeError as err:
            raise UserError(f"invalid config: {key}={requested}: {err}; use {key}=auto") from None


def presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def _one_line(err: Exception) -> str:
    msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    key = getattr(err, "full_key", None)
    name = key.removeprefix("guidance.") if isinstance(key, str) else None
    if name in _FLAT_ENGINE_KEYS and "not in 'GuidanceConfig'" in msg:  # a key from before the engine split
        msg = f"Key '{name}' not in 'GuidanceConfig' (it is guidance.{_FLAT_ENGINE_KEYS[name]}.{name})"
    return f"{key}: {msg}" if key and key not in msg else msg


def load_config(preset: str | None = None, config_file: str | None = None, overrides: Sequence[str] = ()) -> Config:
    """Defaults <- preset or file <- overrides, validated. Raises UserError with one line."""
    if preset and config_file:
        raise UserError("give either --preset or --config, not both")
    layers: list[DictConfig] = []
    if preset:
        path = PRESET_DIR / f"{preset}.yaml"
        if not path.is_file():
            raise UserError(f"unknown preset '{preset}'; available: {', '.join(presets())}")
        layers.append(_read_yaml(path))
    elif config_file:
        layers.append(_read_yaml(Path(config_file)))
    return _compose(layers, overrides, "invalid config")


def config_from_saved(text: str, overrides: Sequence[str] = ()) -> Config:
    """A run's saved config.yaml text as the base layer (where load_config has the preset), the
    overrides on top, validated: the config `generate --resume` continues with. Raises UserError
    with one line ("invalid saved config: ..." for the text, "invalid config: ..." for an override)."""
    try:
        layer = OmegaConf.create(text)
    except (OmegaConfBaseException, yaml.YAMLError, ValueError, TypeError) as err:
        raise UserError(f"invalid saved config: {_one_line(err)}") from None
    if isinstance(layer, DictConfig):
        _nest_flat_engine_keys(layer)
    return _compose([layer], overrides, "invalid saved config")


def _dotlist(overrides: Sequence[str]) -> list[str]:
    """`key=value` items as OmegaConf's dotlist, short keys (SHORT_KEYS) expanded."""
    out = []
    for item in overrides:
        if "=" not in item:
            raise UserError(f"override '{item}' is not key=value")
        key, value = item.split("=", 1)
        out.append(f"{SHORT_KEYS.get(key.strip(), key.strip())}={value}")
    return out


def _compose(layers: list, overrides: Sequence[str], label: str) -> Config:
    """Defaults <- each layer (its errors: `label`) <- overrides, as a validated Config."""
    dotlist = _dotlist(overrides)
    merged = OmegaConf.structured(Config)
    try:
        for layer in layers:
            merged = OmegaConf.merge(merged, layer)
    except (OmegaConfBaseException, yaml.YAMLError, ValueError, TypeError) as err:
        raise UserError(f"{label}: {_one_line(err)}") from None
    try:
        merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(dotlist))
        cfg: Config = OmegaConf.to_object(merged)
    except (OmegaConfBaseException, yaml.YAMLError, ValueError, TypeError) as err:  # YAML in values, too
        raise UserError(f"invalid config: {_one_line(err)}") from None
    validate(cfg)
    return cfg


# Run folders saved before guidance split per engine keep these keys flat under guidance.
_FLAT_ENGINE_KEYS = {**{f.name: "ssd" for f in fields(SSDConfig)}, **{f.name: "vsd" for f in fields(VSDConfig)}}


def _nest_flat_engine_keys(saved: DictConfig) -> None:
    """guidance.baseline -> guidance.ssd.baseline etc. in an old run's saved config (in place);
    presets, config files and overrides must use the nested keys."""
    g = saved.get("guidance")
    if not isinstance(g, DictConfig):
        return
    for name, engine in _FLAT_ENGINE_KEYS.items():
        if name in g:
            if engine not in g:
                g[engine] = {}
            if isinstance(g[engine], DictConfig) and name not in g[engine]:
                g[engine][name] = g.pop(name)


def _read_yaml(path: Path) -> DictConfig:
    try:
        data = OmegaConf.load(path)
    except FileNotFoundError:
        raise UserError(f"config file not found: {path}") from None
    except Exception as err:  # noqa: BLE001 - YAML errors of any kind become one line
        raise UserError(f"cannot read config {path}: {_one_line(err)}") from None
    if not isinstance(data, DictConfig):
        raise UserError(f"config {path} must be a mapping of keys to values")
    data.pop("defaults", None)
    return data


def validate(cfg: Config) -> None:
    """Every component's `check` under its key, then the checks across components."""
    for f in fields(cfg):
        getattr(cfg, f.name).check(f.name)
    cfg.check()


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def from_yaml_text(text: str) -> Config:
    """The resolved config saved in a run folder, read back (for resume, export, render)."""
    return config_from_saved(text)
