"""The forward-diffusion maths, in one place: x_t = alpha_t x0 + sigma_t eps with
alpha_t = sqrt(alpha_bar_t), sigma_t = sqrt(1 - alpha_bar_t), t an integer index into the schedule.

`NoiseSchedule` owns alpha_bar (`alphas_cumprod`), the number of training steps and the model's
prediction type, and everything derived from them: noising, the SDS weight, t sampling, model output
-> eps (`eps_from_output`) and its inverse, the training target for the prediction type (`target`).
Guidance (`DiffusionGuidance.schedule`), the VSD LoRA and the analytic harness all use it; nothing
else converts between parameterisations.

Prediction types (diffusers' names), with v = alpha eps - sigma x0:
    epsilon       output = eps        eps = output
    v_prediction  output = v          eps = alpha v + sigma x_t
    sample        output = x0         eps = (x_t - alpha x0) / sigma
"""
from __future__ import annotations

from typing import Literal, get_args

import torch

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
Weighting = Literal["sigma2", "uniform"]  # w(t): sigma2 (= 1 - alpha_bar) | uniform
WEIGHTINGS = get_args(Weighting)


class NoiseSchedule:
    """alpha_bar [T] (any float dtype and device; kept as given) and the prediction type.

    Arithmetic runs in alpha_bar's dtype. `add_noise` returns x's dtype; `eps_from_output` and `target`
    return their input itself where the conversion is the identity, else alpha_bar's dtype."""

    def __init__(self, alphas_cumprod: torch.Tensor, prediction_type: str = "epsilon"):
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"unsupported prediction_type {prediction_type!r}; expected one of {PREDICTION_TYPES}")
        if alphas_cumprod.dim() != 1 or not alphas_cumprod.is_floating_point():
            raise ValueError("alphas_cumprod must be a 1-D float tensor")
        self.alphas_cumprod = alphas_cumprod
        self.prediction_type = prediction_type

    # --- construction ----------------------------------------------------------------------------
    @classmethod
    def from_scheduler(cls, scheduler, device: torch.device | str | None = None) -> "NoiseSchedule":
        """From a diffusers scheduler: its alphas_cumprod (as float32 on `device`) and prediction type."""
        abar = scheduler.alphas_cumprod.to(device=device, dtype=torch.float32)
        if abar.numel() != scheduler.config.num_train_timesteps:
            raise ValueError("scheduler.alphas_cumprod does not have num_train_timesteps entries")
        return cls(abar, scheduler.config.prediction_type)

    @classmethod
    def from_betas(cls, betas: torch.Tensor, prediction_type: str = "epsilon") -> "NoiseSchedule":
        """alpha_bar = cumprod(1 - beta), in betas' dtype (float32 betas: diffusers' arithmetic)."""
        return cls(torch.cumprod(1.0 - betas, dim=0), prediction_type)

    @classmethod
    def scaled_linear(cls, num_steps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012,
                      prediction_type: str = "epsilon", dtype: torch.dtype = torch.float32) -> "NoiseSchedule":
        """Stable Diffusion's schedule (diffusers' "scaled_linear": betas linear in sqrt). With the
        default float32 it is diffusers' DDPMScheduler(beta_schedule="scaled_linear") bit for bit."""
        betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, num_steps, dtype=dtype) ** 2
        return cls.from_betas(betas, prediction_type)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "NoiseSchedule":
        return NoiseSchedule(self.alphas_cumprod.to(device=device, dtype=dtype), self.prediction_type)

    @property
    def num_train_timesteps(self) -> int:
        return self.alphas_cumprod.shape[0]

    @property
    def device(self) -> torch.device:
        return self.alphas_cumprod.device

    # --- noise -----------------------------------------------------------------------------------
    def alpha_sigma(self, t: torch.Tensor | int) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha_t, sigma_t), shaped like t."""
        abar = self.alphas_cumprod[t]
        return abar.sqrt(), (1.0 - abar).sqrt()

    def _alpha_sigma_like(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """alpha_t, sigma_t viewed as [B, 1, ...] to broadcast against a [B, ...] tensor."""
        a, s = self.alpha_sigma(t)
        shape = (-1,) + (1,) * (like.dim() - 1)
        return a.view(shape), s.view(shape)

    def add_noise(self, x: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t = alpha_t x + sigma_t noise, computed in the schedule's dtype, returned in x's dtype."""
        a, s = self._alpha_sigma_like(t, x)
        return (a * x.to(a.dtype) + s * noise.to(a.dtype)).to(x.dtype)

    def ddim_step(self, x_t: torch.Tensor, eps: torch.Tensor, t: int, t_prev: int) -> torch.Tensor:
        """Deterministic DDIM (eta = 0) from t to t_prev < t (t_prev = -1: to the clean sample):
        x0 = (x_t - sigma_t eps) / alpha_t, then x_prev = alpha_prev x0 + sigma_prev eps."""
        a, s = (v.to(x_t.dtype) for v in self.alpha_sigma(t))
        x0 = (x_t - s * eps) / a
        if t_prev < 0:
            return x0
        a_prev, s_prev = (v.to(x_t.dtype) for v in self.alpha_sigma(t_prev))
        return a_prev * x0 + s_prev * eps

    def weight(self, t: torch.Tensor, weighting: str = "sigma2") -> torch.Tensor:
        """The SDS weight w(t): 'sigma2' is sigma_t^2 = 1 - alpha_bar_t, 'uniform' is 1."""
        if weighting == "sigma2":
            return 1.0 - self.alphas_cumprod[t]
        if weighting == "uniform":
            return torch.ones_like(t, dtype=self.alphas_cumprod.dtype)
        raise ValueError(f"unknown weighting {weighting!r}; expected one of {WEIGHTINGS}")

    def sample_t(self, batch: int, t_min: float, t_max: float, generator: torch.Generator | None = None) -> torch.Tensor:
        """`batch` integer timesteps uniform on [t_min T, t_max T] (clamped to [0, T - 1]), drawn on the
        CPU from `generator` and moved to the schedule's device."""
        lo, hi = self.t_bounds(t_min, t_max)
        return torch.randint(lo, hi + 1, (batch,), generator=generator).to(self.device)

    def t_bounds(self, t_min: float, t_max: float) -> tuple[int, int]:
        """The integer timesteps [lo, hi] that the fractions [t_min, t_max] of the schedule cover."""
        n = self.num_train_timesteps
        return max(int(t_min * n), 0), min(int(t_max * n), n - 1)

    # --- parameterisations -------------------------------------------------------------------------
    def eps_from_output(self, output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The model's output at (x_t, t) as a noise prediction (see the module docstring)."""
        kind = self.prediction_type
        if kind == "epsilon":
            return output
        a, s = self._alpha_sigma_like(t, x_t)
        if kind == "v_prediction":
            return a * output.to(a.dtype) + s * x_t.to(a.dtype)
        return (x_t.to(a.dtype) - a * output.to(a.dtype)) / s  # sample

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The denoising training target for the prediction type, for x_t = add_noise(x0, noise, t):
        noise, v = alpha noise - sigma x0, or x0. `eps_from_output(target(x0, noise, t), x_t, t)`
        is `noise`."""
        kind = self.prediction_type
        if kind == "epsilon":
            return noise
        if kind == "sample":
            return x0
        a, s = self._alpha_sigma_like(t, x0)
        return a * noise.to(a.dtype) - s * x0.to(a.dtype)

    def __repr__(self) -> str:
        return (f"NoiseSchedule(T={self.num_train_timesteps}, prediction_type={self.prediction_type!r}, "
                f"dtype={self.alphas_cumprod.dtype}, device={self.device})")
