"""The guidance's config: what every engine shares, and each engine's own settings (guidance.ssd,
guidance.vsd), each with its checks beside its fields."""
from __future__ import annotations

from dataclasses import dataclass, field as dc_field
from typing import Literal, get_args

from ..errors import require, require_choice
from .reducers import T_SAMPLINGS, TSampling
from .schedule import WEIGHTINGS, Weighting
from .stein import MU_SHAPES, MuShape

Engine = Literal["sds", "vsd", "ssd"]
ENGINES = get_args(Engine)
# SSD's baseline phi: agreement of the image's depth (or normals) with the render's | constant 1
Baseline = Literal["depth", "normal", "constant"]
# stein: h = sigma grad phi - eps phi (zero mean) | paper: the project page's literal eps phi + grad phi,
# NOT zero mean: a labelled, biased ablation (does a depth-consistency push explain the paper's gains?)
SteinForm = Literal["stein", "paper"]
# f-distill's divergences for VSD (guidance/ratio.py): rkl is VSD itself; the others weight each
# sample by h(r), r = p_t/q_t from a discriminator (engines.f_divergence_weight)
Divergence = Literal["rkl", "kl", "js", "hellinger", "jeffreys"]


@dataclass
class SSDConfig:
    """Stein score distillation (guidance.engine=ssd): SDS's estimate plus a control variate built
    from the baseline phi, weighted by mu fitted on past steps (see guidance/stein.py)."""

    depth_model: str = "builtin"  # transformers depth-estimation folder or hub id (baselines depth, normal)
    baseline: Baseline = "depth"
    mu_shape: MuShape = "scalar"  # for keep_sds_cv=false
    mu_decay: float = 0.99  # a draw k steps old weighs decay**k in the sums that fit mu
    mu_init: float = 1.0  # mu before any past step (keep_sds_cv=false); 1 with phi == 1 is SDS
    # Keep SDS's -eps control variate next to the Stein term, both weights fitted (scalar): equivalent
    # to the baseline phi + c with c fitted, and never worse than SDS (see guidance/stein.py).
    keep_sds_cv: bool = True
    stein_form: SteinForm = "stein"  # paper: the biased literal term, for the ablation only

    def check(self, key: str = "guidance.ssd") -> None:
        require_choice(self.baseline, get_args(Baseline), f"{key}.baseline")
        require_choice(self.stein_form, get_args(SteinForm), f"{key}.stein_form")
        require_choice(self.mu_shape, MU_SHAPES, f"{key}.mu_shape")
        require(0.0 <= self.mu_decay < 1.0, f"{key}.mu_decay", "in [0, 1)")


@dataclass
class VSDConfig:
    """Variational score distillation (guidance.engine=vsd): a camera-conditioned LoRA on the same
    UNet learns the score of the current renders."""

    lora_rank: int = 4  # rank of the LoRA's low-rank updates
    lora_lr: float = 1e-4  # learning rate of the LoRA (and its camera embedding)
    pose_drop_p: float = 0.1  # probability of dropping the camera condition in a LoRA step
    divergence: Divergence = "rkl"  # rkl: VSD; kl, js, hellinger, jeffreys: f-distill's h(r) weights
    # The density ratio's discriminator (not used by rkl): learning rate, and steps it trains before
    # its ratio weights the gradient (h = 1 until then).
    ratio_lr: float = 1e-3
    ratio_warmup: int = 20
    # h(r) over its mean across the last 8 steps (a batch of 1 or 2 has no mean to speak of), clipped
    # to this range so that one sample cannot dominate a step
    h_clip: list[float] = dc_field(default_factory=lambda: [0.2, 5.0])
    # Teacher samples per view prompt (DDIM, pool_steps steps, CFG at guidance_scale), drawn once per run
    # and cached beside the text embeddings
    pool_per_view: int = 32
    pool_steps: int = 25

    def check(self, key: str = "guidance.vsd") -> None:
        require(self.lora_rank >= 1, f"{key}.lora_rank", ">= 1")
        require(0.0 <= self.pose_drop_p <= 1.0, f"{key}.pose_drop_p", "in [0, 1]")
        require_choice(self.divergence, get_args(Divergence), f"{key}.divergence")
        require(self.ratio_lr > 0 and self.ratio_warmup >= 0, f"{key}.ratio_lr/ratio_warmup", "> 0 and >= 0")
        require(len(self.h_clip) == 2 and 0 < self.h_clip[0] <= 1 <= self.h_clip[1], f"{key}.h_clip", "[lo, hi] with 0 < lo <= 1 <= hi")
        require(self.pool_per_view >= 1 and self.pool_steps >= 1, f"{key}.pool_per_view/pool_steps", ">= 1")


@dataclass
class NoiseConfig:
    """How each step draws (t, eps) for its renders (guidance/reducers.py): exact variance reducers
    that keep every engine's mean. Each extra draw costs one more model call, not a render."""

    draws: int = 1  # K draws (t, eps) per rendered view, their gradients averaged before the backward pass
    antithetic: bool = False  # draws in pairs (eps, -eps) at one t (needs an even `draws`)
    t_sampling: TSampling = "iid"  # iid | stratified: one t per stratum within a step | sequence: the run's view sequence, across steps

    def check(self, key: str = "guidance.noise") -> None:
        require(self.draws >= 1, f"{key}.draws", ">= 1")
        require(not self.antithetic or self.draws % 2 == 0, f"{key}.draws", "even when antithetic is on (pairs eps, -eps)")
        require_choice(self.t_sampling, T_SAMPLINGS, f"{key}.t_sampling")


@dataclass
class GuidanceConfig:
    """What every engine shares; each engine's own settings are under guidance.ssd / guidance.vsd."""

    model: str = "builtin"  # diffusers folder, hub id, or "builtin"
    engine: Engine = "sds"
    guidance_scale: float = 100.0  # diffusers' CFG convention eps_u + s (eps_c - eps_u)
    t_min: float = 0.02  # fractions of the schedule
    t_max: float = 0.98  # t is drawn uniformly from [t_min, t_max]
    anneal_step: int = -1  # from this step on t_max becomes anneal_t_max (-1: never)
    anneal_t_max: float = 0.5  # t_max from anneal_step on
    weighting: Weighting = "sigma2"
    grad_clip: float = 0.0  # per-element clip of G, 0 = off
    view_dependent: bool = True  # append "front view" etc. to the prompt
    # Classifier-guidance scale of the model's camera critic (used where the model's card names one,
    # see guidance/camera_critic.py): 1 is Bayes' rule, more sharpens an unsure critic; 0: off.
    camera_scale: float = 1.0
    half_precision: bool = True  # fp16 weights on CUDA (always fp32 on CPU)
    cache_dir: str = ""  # text-embedding cache; "" = $STEINDREAMER_CACHE or ~/.cache/steindreamer
    noise: NoiseConfig = dc_field(default_factory=NoiseConfig)
    ssd: SSDConfig = dc_field(default_factory=SSDConfig)
    vsd: VSDConfig = dc_field(default_factory=VSDConfig)

    def check(self, key: str = "guidance") -> None:
        require_choice(self.engine, ENGINES, f"{key}.engine")
        require(0.0 <= self.t_min < self.t_max <= 1.0, f"{key}.t_min/t_max", "0 <= t_min < t_max <= 1")
        require(self.anneal_step < 0 or self.t_min < self.anneal_t_max <= 1.0, f"{key}.anneal_t_max", "in (t_min, 1]")
        require(self.guidance_scale >= 0, f"{key}.guidance_scale", ">= 0")
        require_choice(self.weighting, WEIGHTINGS, f"{key}.weighting")
        require(self.grad_clip >= 0, f"{key}.grad_clip", ">= 0")
        require(self.camera_scale >= 0, f"{key}.camera_scale", ">= 0")
        require(bool(self.model.strip()), f"{key}.model", "a folder, hub id or builtin")
        self.noise.check(f"{key}.noise")
        self.ssd.check(f"{key}.ssd")
        self.vsd.check(f"{key}.vsd")
