"""Distillation estimators as pure functions (the maths: docs/method.md).

Each engine maps tensors to an image-space gradient G (same shape as the rendered image or its
latent). `injected_loss` pushes any G into the 3D parameters with one backward pass through the
renderer. Nothing here holds state or touches a model: callers compute the noise predictions.

    sds               G = w (eps_hat - eps)
    control_variate   h = sigma grad_phi - eps phi             (Stein, zero mean)
    paper_term        eps phi + grad_phi                       (the page's literal form, biased: ablation)
    ssd               G = w (eps_hat + mu h)                   (phi == 1, mu = 1: SDS exactly)
    vsd               G = w h(r) (eps_pre - eps_lora)          (h from f_divergence_weight; None: VSD = rkl)
Stateful helpers live elsewhere: stein.LaggedMu (mu from past steps), lora.VSDLora (eps_lora),
baselines (phi, grad_phi), variance (the gradient-variance meter), analytic (test targets).
Noise maths (alpha_t, sigma_t, noising, model output -> eps) live in schedule.NoiseSchedule.
"""
from __future__ import annotations

import torch


def cfg_combine(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance, diffusers' convention: eps_u + s (eps_c - eps_u)."""
    return eps_uncond + scale * (eps_cond - eps_uncond)


def sds(eps_pred: torch.Tensor, noise: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """DreamFusion's SDS: G = w(t) (eps_hat - eps). `weight` broadcasts over the batch ([B] or scalar)."""
    return _bcast(weight, eps_pred) * (eps_pred - noise)


def injected_loss(x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """0.5 ||x - (x - G).detach()||^2 / batch: its gradient w.r.t. x is G / batch, i.e. the batch
    mean of per-sample losses whose gradient is G. Its value is 0.5 ||G||^2 / batch (a monitor, not a
    quantity being minimised)."""
    target = (x - grad).detach()
    return 0.5 * ((x - target) ** 2).sum() / x.shape[0]


def sanitize(grad: torch.Tensor, clip: float | None = None) -> tuple[torch.Tensor, bool]:
    """NaN guard and optional per-element clipping. Returns (G, finite) with non-finite entries zeroed."""
    finite = bool(torch.isfinite(grad).all())
    if not finite:
        grad = torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0)
    if clip is not None and clip > 0:
        grad = grad.clamp(-clip, clip)
    return grad, finite


def _bcast(w: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    w = torch.as_tensor(w, dtype=like.dtype, device=like.device)
    return w.view(-1, *([1] * (like.dim() - 1))) if w.dim() == 1 else w


# --------------------------------------------------------------------------------------------------
# Stein Score Distillation (docs/method.md, "SSD"). Sign convention, fixed here once for the project:
#     h = sigma_t * grad_phi - eps * phi          (zero mean by Stein's identity)
#     G_SSD = w(t) (eps_hat + mu * h)
# so phi == 1 gives h = -eps and mu = 1 gives exactly G_SDS = w(t) (eps_hat - eps).
# --------------------------------------------------------------------------------------------------
def control_variate(noise: torch.Tensor, phi: torch.Tensor, grad_phi: torch.Tensor,
                    sigma: torch.Tensor | float) -> torch.Tensor:
    """Stein control variate h = sigma_t grad_phi - eps phi. `phi` is per sample [B] (or scalar),
    `grad_phi` = d phi / d x_t (shape of x_t), `sigma` is [B] or scalar. E_eps[h] = 0 for smooth phi."""
    return _bcast(sigma, noise) * grad_phi - noise * _bcast(phi, noise)


def paper_term(noise: torch.Tensor, phi: torch.Tensor, grad_phi: torch.Tensor) -> torch.Tensor:
    """The term as printed on SteinDreamer's project page, eps phi + grad phi. NOT zero mean (no sigma,
    the relative sign flipped): G with it is biased. Kept only as the labelled ablation
    guidance.ssd.stein_form=paper."""
    return noise * _bcast(phi, noise) + grad_phi


def ssd(eps_pred: torch.Tensor, h: torch.Tensor, mu: torch.Tensor | float,
        weight: torch.Tensor | float) -> torch.Tensor:
    """SteinDreamer's estimator G = w(t) (eps_hat + mu * h). `mu` broadcasts against x_t (scalar,
    [1,C,1,1] or [1,C,H,W]); it must come from past steps (see stein.LaggedMu), never from this h."""
    mu = torch.as_tensor(mu, dtype=eps_pred.dtype, device=eps_pred.device)
    return _bcast(weight, eps_pred) * (eps_pred + mu * h)


def vsd(eps_pretrained: torch.Tensor, eps_lora: torch.Tensor, weight: torch.Tensor | float,
        f_weight: torch.Tensor | None = None) -> torch.Tensor:
    """ProlificDreamer's VSD, G = w(t) h(r) (eps_pre - eps_phi). `f_weight` is per-sample h(r) [B]
    from `f_divergence_weight`; None is reverse KL (h = 1), i.e. plain VSD."""
    g = _bcast(weight, eps_pretrained) * (eps_pretrained - eps_lora)
    return g if f_weight is None else _bcast(f_weight, g) * g


F_DIVERGENCES = ("rkl", "kl", "js", "hellinger", "jeffreys")


def f_divergence_weight(kind: str, r: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """f-distill's weight h(r) = r^2 f''(r) for the density ratio r = p_t/q_t (per sample, [B]), with
    D_f(p || q) = E_q[f(p/q)]: rkl (reverse KL, f = -log r): 1, i.e. VSD; kl (forward KL, r log r): r;
    js (Jensen-Shannon, r log r - (1+r) log((1+r)/2)): r/(1+r); hellinger (squared Hellinger,
    (sqrt r - 1)^2): sqrt(r)/2; jeffreys ((r-1) log r): r + 1. With `normalize` h is divided by its
    batch mean, which fixes the overall gradient scale (the direction is unchanged)."""
    if kind == "rkl":
        h = torch.ones_like(r)
    elif kind == "kl":
        h = r
    elif kind == "js":
        h = r / (1.0 + r)
    elif kind == "hellinger":
        h = 0.5 * r.sqrt()
    elif kind == "jeffreys":
        h = r + 1.0
    else:
        raise ValueError(f"unknown f-divergence {kind!r}; expected one of {F_DIVERGENCES}")
    return h / h.mean().clamp_min(torch.finfo(h.dtype).tiny) if normalize else h
