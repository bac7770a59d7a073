"""One typed config per component, composed here. Presets are YAML files in `configs/`, merged over
the dataclass defaults, then `key=value` overrides (dotted keys or the short keys below). Anything
unknown or out of range is rejected before any work with one line naming the key."""
from __future__ import annotations

from dataclasses import dataclass, field as dc_field
from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .cameras import CameraConfig
from .errors import UserError
from .field.nerf import BackgroundConfig, FieldConfig
from .render.shading import ShadingConfig
from .render.volume import RenderConfig

PRESET_DIR = Path(__file__).parent / "configs"
ENGINES = ("sds", "vsd", "ssd")
SHORT_KEYS = {
    "model": "guidance.model",
    "depth_model": "guidance.depth_model",
    "engine": "guidance.engine",
    "seed": "train.seed",
    "steps": "train.steps",
    "resolution": "render.resolution",
}


@dataclass
class GuidanceConfig:
    model: str = "builtin"  # diffusers folder, hub id, or "builtin"
    engine: str = "sds"  # sds | vsd | ssd
    guidance_scale: float = 100.0  # diffusers' CFG convention eps_u + s (eps_c - eps_u)
    t_min: float = 0.02  # fractions of the schedule
    t_max: float = 0.98
    anneal_step: int = -1  # from this step on t_max becomes anneal_t_max (-1: never)
    anneal_t_max: float = 0.5
    weighting: str = "sigma2"  # w(t): sigma2 (= 1 - alpha_bar) | uniform
    grad_clip: float = 0.0  # per-element clip of G, 0 = off
    view_dependent: bool = True  # append "front view" etc. to the prompt
    half_precision: bool = True  # fp16 weights on CUDA (always fp32 on CPU)
    cache_dir: str = ""  # text-embedding cache; "" = $STEINDREAMER_CACHE or ~/.cache/steindreamer
    # SSD (Stein score distillation)
    depth_model: str = "builtin"  # transformers depth-estimation folder or hub id
    baseline: str = "depth"  # depth | normal | constant
    mu_shape: str = "scalar"  # scalar | channel | pixel (for keep_sds_cv=false)
    mu_decay: float = 0.99  # EMA decay of the running sums that fit mu
    mu_init: float = 1.0  # mu before any past step (keep_sds_cv=false); 1 with phi == 1 is SDS
    # Keep SDS's -eps control variate next to the Stein term, both weights fitted (scalar): equivalent
    # to the baseline phi + c with c fitted, and never worse than SDS (see guidance/stein.py).
    keep_sds_cv: bool = True
    # VSD (variational score distillation)
    lora_rank: int = 4
    lora_lr: float = 1e-4
    pose_drop_p: float = 0.1


@dataclass
class TrainConfig:
    steps: int = 10000  # steps of the NeRF stage
    batch_size: int = 1
    seed: int = 0
    lr_grid: float = 1e-2
    lr_mlp: float = 1e-3
    val_every: int = 500
    val_views: int = 4
    ckpt_every: int = 500
    keep_checkpoints: int = 3
    lambda_opacity: float = 0.0  # sparsity: mean opacity
    lambda_entropy: float = 0.0  # binary entropy of opacity
    lambda_orient: float = 0.0  # normals facing away from the camera (needs normals)
    nan_patience: int = 5  # non-finite steps in a row before restoring the last good state
    max_restores: int = 3
    restore_lr_factor: float = 0.5
    variance_every: int = 50  # cheap variance meter every N steps (0: off)
    variance_draws: int = 4
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    threads: int = 0  # CPU threads for torch, 0 = torch's default


@dataclass
class MeshConfig:
    enabled: bool = True  # the mesh stage of `generate` (--no-mesh: export the NeRF's surface as is)
    steps: int = 1000
    resolution: int = 128  # render size of the mesh stage
    t_max: float = 0.5  # refinement uses the low-noise end of the schedule
    grid_resolution: int = 128  # marching-cubes grid along the occupied box's longest side
    threshold: float = -1.0  # density iso-level; < 0: automatic (Otsu on log density)
    target_faces: int = 30000
    min_component_fraction: float = 0.05  # drop floaters smaller than this fraction of the largest piece
    lr_offsets: float = 1e-3
    lr_scale: float = 0.1  # texture field learning rates relative to train.lr_grid / lr_mlp
    lambda_laplacian: float = 1000.0
    lambda_normal: float = 1000.0
    ckpt_every: int = 200


@dataclass
class ExportConfig:
    formats: list[str] = dc_field(default_factory=lambda: ["glb", "obj"])  # of glb, obj, ply
    texture_size: int = 1024
    turntable: bool = True
    turntable_frames: int = 36
    turntable_size: int = 256
    turntable_elevation: float = 15.0


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


def presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def _one_line(err: Exception) -> str:
    msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    key = getattr(err, "full_key", None)
    return f"{key}: {msg}" if key and key not in msg else msg


def load_config(preset: str | None = None, config_file: str | None = None, overrides: list[str] = ()) -> Config:
    """Defaults <- preset or file <- overrides, validated. Raises UserError with one line."""
    base = OmegaConf.structured(Config)
    layers: list[DictConfig] = []
    if preset and config_file:
        raise UserError("give either --preset or --config, not both")
    if preset:
        path = PRESET_DIR / f"{preset}.yaml"
        if not path.is_file():
            raise UserError(f"unknown preset '{preset}'; available: {', '.join(presets())}")
        layers.append(_read_yaml(path))
    elif config_file:
        layers.append(_read_yaml(Path(config_file)))
    dotlist = []
    for item in overrides:
        if "=" not in item:
            raise UserError(f"override '{item}' is not key=value")
        key, value = item.split("=", 1)
        key = SHORT_KEYS.get(key.strip(), key.strip())
        dotlist.append(f"{key}={value}")
    try:
        for layer in layers:
            base = OmegaConf.merge(base, layer)
        base = OmegaConf.merge(base, OmegaConf.from_dotlist(dotlist))
        cfg: Config = OmegaConf.to_object(base)
    except (OmegaConfBaseException, yaml.YAMLError, ValueError, TypeError) as err:  # YAML in values, too
        raise UserError(f"invalid config: {_one_line(err)}") from None
    validate(cfg)
    return cfg


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


def _check(ok: bool, key: str, allowed: str) -> None:
    if not ok:
        raise UserError(f"invalid config: {key} must be {allowed}")


def _check_range(cfg, key: str) -> None:
    lo, hi = _get(cfg, key)
    _check(lo <= hi, key, "a [low, high] pair with low <= high")


def _get(cfg, dotted: str):
    obj = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def validate(cfg: Config) -> None:
    t, g, r = cfg.train, cfg.guidance, cfg.render
    _check(t.steps >= 0, "train.steps", "a non-negative integer")
    _check(t.batch_size >= 1, "train.batch_size", ">= 1")
    for key in ("val_every", "ckpt_every", "keep_checkpoints", "val_views"):
        _check(getattr(t, key) >= 1, f"train.{key}", ">= 1")
    _check(t.lr_grid > 0 and t.lr_mlp > 0, "train.lr_grid/lr_mlp", "> 0")
    _check(t.threads >= 0, "train.threads", ">= 0")
    _check(t.nan_patience >= 1 and t.max_restores >= 0, "train.nan_patience/max_restores", ">= 1 and >= 0")
    _check(0 < t.restore_lr_factor <= 1, "train.restore_lr_factor", "in (0, 1]")
    _check(t.variance_every >= 0 and t.variance_draws >= 2, "train.variance_every/variance_draws", ">= 0 and >= 2")
    _check(t.device == "auto" or t.device == "cpu" or t.device.startswith("cuda"), "train.device", "auto, cpu, cuda or cuda:N")
    _check(r.resolution >= 8 and r.resolution % 8 == 0, "render.resolution", "a positive multiple of 8")
    _check(r.samples >= 2, "render.samples", ">= 2")
    _check(r.chunk >= 1, "render.chunk", ">= 1")
    _check(r.backend in ("auto", "torch", "nerfacc"), "render.backend", "one of auto, torch, nerfacc")
    _check(r.normals in ("surface", "samples", "difference"), "render.normals", "one of surface, samples, difference")
    _check(r.normal_eps > 0, "render.normal_eps", "> 0")
    _check(g.engine in ENGINES, "guidance.engine", f"one of {', '.join(ENGINES)}")
    _check(0.0 <= g.t_min < g.t_max <= 1.0, "guidance.t_min/t_max", "0 <= t_min < t_max <= 1")
    _check(g.anneal_step < 0 or g.t_min < g.anneal_t_max <= 1.0, "guidance.anneal_t_max", "in (t_min, 1]")
    _check(g.guidance_scale >= 0, "guidance.guidance_scale", ">= 0")
    _check(g.weighting in ("sigma2", "uniform"), "guidance.weighting", "one of sigma2, uniform")
    _check(g.grad_clip >= 0, "guidance.grad_clip", ">= 0")
    _check(bool(g.model.strip()), "guidance.model", "a folder, hub id or builtin")
    _check(g.baseline in ("depth", "normal", "constant"), "guidance.baseline", "one of depth, normal, constant")
    _check(g.mu_shape in ("scalar", "channel", "pixel"), "guidance.mu_shape", "one of scalar, channel, pixel")
    _check(0.0 <= g.mu_decay < 1.0, "guidance.mu_decay", "in [0, 1)")
    _check(g.lora_rank >= 1, "guidance.lora_rank", ">= 1")
    _check(0.0 <= g.pose_drop_p <= 1.0, "guidance.pose_drop_p", "in [0, 1]")
    f = cfg.field
    _check(f.bound > 0 and f.blob_radius > 0, "field.bound/blob_radius", "> 0")
    _check(f.grid.levels >= 1 and f.grid.features >= 1, "field.grid.levels/features", ">= 1")
    _check(1 <= f.grid.log2_table <= 24, "field.grid.log2_table", "in [1, 24]")
    _check(1 <= f.grid.base_res <= f.grid.max_res, "field.grid.base_res/max_res", "1 <= base_res <= max_res")
    _check(f.grid.backend in ("auto", "torch", "tcnn", "triton", "cpu"), "field.grid.backend", "one of auto, torch, tcnn, triton, cpu")
    o = f.occupancy
    _check(o.resolution == 0 or 8 <= o.resolution <= 256, "field.occupancy.resolution", "0 (off) or in [8, 256]")
    _check(0 <= o.dilate <= 4, "field.occupancy.dilate", "in [0, 4]")
    _check(o.update_every >= 1, "field.occupancy.update_every", ">= 1")
    _check(0 < o.threshold < 1 and 0 <= o.decay <= 1, "field.occupancy.threshold/decay", "threshold in (0, 1), decay in [0, 1]")
    _check(cfg.background.kind in ("mlp", "white", "black"), "background.kind", "one of mlp, white, black")
    _check(0.0 <= cfg.background.random_p <= 1.0, "background.random_p", "in [0, 1]")
    s = cfg.shading
    _check(0.0 <= s.lambertian_p <= 1.0 and 0.0 <= s.textureless_p <= 1.0, "shading.lambertian_p/textureless_p", "in [0, 1]")
    m, e = cfg.mesh, cfg.export
    _check(m.steps >= 0 and m.ckpt_every >= 1, "mesh.steps/ckpt_every", ">= 0 and >= 1")
    _check(m.resolution >= 8 and m.resolution % 8 == 0, "mesh.resolution", "a positive multiple of 8")
    _check(g.t_min < m.t_max <= 1.0, "mesh.t_max", "in (guidance.t_min, 1]")
    _check(16 <= m.grid_resolution <= 1024, "mesh.grid_resolution", "in [16, 1024]")
    _check(m.target_faces >= 100, "mesh.target_faces", ">= 100")
    _check(0.0 <= m.min_component_fraction < 1.0, "mesh.min_component_fraction", "in [0, 1)")
    _check(m.lr_offsets >= 0 and m.lr_scale >= 0 and m.lambda_laplacian >= 0 and m.lambda_normal >= 0, "mesh.lr_*/lambda_*", ">= 0")
    _check(bool(e.formats) and set(e.formats) <= {"glb", "obj", "ply"}, "export.formats", "a non-empty list of glb, obj, ply")
    _check(16 <= e.texture_size <= 8192, "export.texture_size", "in [16, 8192]")
    _check(e.turntable_frames >= 1 and e.turntable_size >= 8, "export.turntable_frames/turntable_size", ">= 1 and >= 8")
    _check(s.light in ("camera", "fixed"), "shading.light", "one of camera, fixed")
    _check(sum(v * v for v in s.light_dir) > 0, "shading.light_dir", "a non-zero direction")
    c = cfg.camera
    for key in ("distance", "fov", "elevation", "azimuth"):
        _check_range(cfg, f"camera.{key}")
    _check(c.distance[0] > 0, "camera.distance", "> 0")
    _check(0 < c.fov[0] and c.fov[1] < 180, "camera.fov", "in (0, 180) degrees")


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def from_yaml_text(text: str) -> Config:
    """The resolved config saved in a run folder, read back (for resume, export, render)."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.create(text))
        cfg = OmegaConf.to_object(merged)
    except (OmegaConfBaseException, yaml.YAMLError, ValueError, TypeError) as err:
        raise UserError(f"invalid saved config: {_one_line(err)}") from None
    validate(cfg)
    return cfg
