"""The Stein weight mu of SSD, fitted on past steps only (docs/method.md, "Fitting μ on past steps").

mu minimises E|| w (eps_hat + mu h) ||^2; the mean of G does not depend on mu (E[h] = 0), so this is
the variance minimiser. Per element of the configured shape:

    mu* = -E[w^2 eps_hat h] / E[w^2 h h]

estimated from exponentially discounted sums. The w(t)^2 factor makes mu minimise the variance of G
itself (w varies with t); with a constant weight it is -E[eps_hat h] / E[h h] (docs/method.md).

`decay` (both `LaggedMu` and `LaggedJointMu`; config `mu_decay`) has one meaning: a sample folded in
k updates ago has weight decay**k in the sums (`discounted`: S <- decay S + new; the newest has
weight 1, the first draw no more than any other of its age). The fits are ratios / least-squares
solutions of these sums, so they are scale-invariant: the same as a normalised EMA with memory
~1 / (1 - decay) updates. decay = 0 fits on the latest update alone.

Fitting mu on the same noise sample it is applied to biases G (mu then correlates with h). `LaggedMu`
therefore has one entry point, `apply`, that computes G with the mu of *previous* steps and only then
folds the current sample in; there is no way to read a mu that has seen the current sample before
using it.

Initial mu (fewer than `warmup` updates, default 10, so mu is not a one-sample fit, which is wild for
the 'pixel' shape): `init`, default 1.0. With phi == 1 that is
exactly SDS, and the depth/normal baselines live in [0, 2] with phi ~ 1 while the shape is still
uncorrelated with the estimator's depth, so mu = 1 starts SSD close to SDS (h ~ -eps) instead of at
mu = 0, which would drop the control variate and start from the raw eps_hat (variance ~1 per element).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import torch

from .engines import _bcast, ssd

MuShape = Literal["scalar", "channel", "pixel"]  # what mu resolves: one number, one per channel, one per element
MU_SHAPES = get_args(MuShape)


def reduce_to_shape(x: torch.Tensor, shape: str) -> torch.Tensor:
    """Sum a [B, C, ...] tensor over the dimensions mu does not resolve; keeps dims for broadcasting.
    'scalar' -> [1, 1, ...], 'channel' -> [1, C, 1, ...], 'pixel' -> [1, C, H, ...] (batch summed)."""
    if shape == "scalar":
        dims = tuple(range(x.dim()))
    elif shape == "channel":
        dims = (0,) + tuple(range(2, x.dim()))
    elif shape == "pixel":
        dims = (0,)
    else:
        raise ValueError(f"unknown mu shape {shape!r}; expected one of {MU_SHAPES}")
    return x.sum(dim=dims, keepdim=True)


def optimal_mu(eh: torch.Tensor, hh: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Closed-form minimiser of E||eps_hat + mu h||^2 from the sums of eps_hat*h and h*h."""
    return -eh / hh.clamp_min(eps)


def discounted(old: torch.Tensor | None, new: torch.Tensor, decay: float) -> torch.Tensor:
    """The running sum with `new` folded in: decay * old + new (just `new` for the first update)."""
    return new if old is None else decay * old + new


@dataclass
class MuSums:
    """Running discounted sums (see `discounted`); `n` counts updates."""
    eh: torch.Tensor | None = None
    hh: torch.Tensor | None = None
    n: int = 0


def update_sums(sums: MuSums, eps_pred: torch.Tensor, h: torch.Tensor, shape: str, decay: float,
                weight: torch.Tensor | float | None = None) -> MuSums:
    """Return new sums with this batch folded in (pure: `sums` is not modified)."""
    eps_pred, h = eps_pred.detach(), h.detach()
    w2 = 1.0 if weight is None else _bcast(torch.as_tensor(weight, dtype=h.dtype,
                                                           device=h.device).detach(), h) ** 2
    eh = reduce_to_shape(w2 * eps_pred * h, shape)
    hh = reduce_to_shape(w2 * h * h, shape)
    if sums.n > 0:
        eh, hh = discounted(sums.eh, eh, decay), discounted(sums.hh, hh, decay)
    return MuSums(eh=eh, hh=hh, n=sums.n + 1)


class LaggedMu:
    """mu for SSD, always fitted on past steps only; `decay` as in the module docstring.

    Usage, once per training step:
        G = est.apply(eps_pred, h, weight)   # uses mu from previous steps, then learns from this one
        log(mu=est.summary())
    """

    def __init__(self, shape: str = "scalar", decay: float = 0.99, init: float = 1.0,
                 warmup: int = 10, clamp: tuple[float, float] | None = None):
        if shape not in MU_SHAPES:
            raise ValueError(f"unknown mu shape {shape!r}; expected one of {MU_SHAPES}")
        if not 0.0 <= decay < 1.0:
            raise ValueError("decay must be in [0, 1)")
        self.shape, self.decay, self.init, self.warmup, self.clamp = shape, decay, init, warmup, clamp
        self._sums = MuSums()

    def _current(self) -> torch.Tensor | float:
        if self._sums.n < self.warmup:
            return self.init
        mu = optimal_mu(self._sums.eh, self._sums.hh)
        return mu.clamp(*self.clamp) if self.clamp is not None else mu

    def apply(self, eps_pred: torch.Tensor, h: torch.Tensor, weight: torch.Tensor | float = 1.0,
              update: bool = True) -> torch.Tensor:
        """G_SSD = w (eps_hat + mu h) with mu from earlier steps; then (if `update`) fold this sample
        into the sums. update=False is for extra draws that must not be learned from (variance meter)."""
        g = ssd(eps_pred, h, self._current(), weight)
        if update:
            self._sums = update_sums(self._sums, eps_pred, h, self.shape, self.decay, weight)
        return g

    def summary(self) -> float:
        """Mean of the mu the next `apply` will use (for logs)."""
        mu = self._current()
        return float(mu.mean()) if torch.is_tensor(mu) else float(mu)

    def state_dict(self) -> dict:
        return {"eh": self._sums.eh, "hh": self._sums.hh, "n": self._sums.n}

    def load_state_dict(self, state: dict) -> None:
        self._sums = MuSums(eh=state["eh"], hh=state["hh"], n=int(state["n"]))


class LaggedJointMu:
    """SSD with the SDS control variate kept: G = w (eps_hat + mu h - nu eps), (mu, nu) fitted jointly
    on past steps by least squares (2x2 normal equations of E||G||^2, w^2-weighted sums).

    Why: h_phi alone beats SDS only if the baseline family contains the constant. Since
    mu h - nu eps = mu (sigma grad phi - eps (phi + nu / mu)), this is SSD with the baseline phi + c,
    c fitted too: still a Stein control variate (zero mean), and (mu, nu) = (0, 1), plain SDS, is in
    the family, so the optimum is never worse than SDS. Starts at (0, 1) until `warmup` updates.
    `decay` discounts past updates exactly as in `LaggedMu` (module docstring)."""

    def __init__(self, decay: float = 0.99, warmup: int = 10, ridge: float = 1e-6):
        if not 0.0 <= decay < 1.0:
            raise ValueError("decay must be in [0, 1)")
        self.decay, self.warmup, self.ridge = decay, warmup, ridge
        self.sums: torch.Tensor | None = None  # [hh, h(-eps), (-eps)(-eps), eps_hat h, eps_hat (-eps)]
        self.n = 0

    def coefficients(self) -> tuple[float, float]:
        if self.n < self.warmup or self.sums is None:
            return 0.0, 1.0
        s = self.sums.double()
        a = torch.stack([torch.stack([s[0], s[1]]), torch.stack([s[1], s[2]])])
        a = a + self.ridge * torch.trace(a) * torch.eye(2, dtype=a.dtype)  # phi == const makes h parallel to eps
        mu, nu = torch.linalg.solve(a, -s[3:5]).tolist()  # coefficients of h and of c2 = -eps
        return mu, nu

    def apply(self, eps_pred: torch.Tensor, h: torch.Tensor, noise: torch.Tensor, weight: torch.Tensor | float = 1.0,
              update: bool = True) -> torch.Tensor:
        mu, nu = self.coefficients()
        w = _bcast(weight, eps_pred)
        g = w * (eps_pred + mu * h - nu * noise)
        if update:
            w2 = (w * w).expand_as(eps_pred)
            c2 = -noise
            new = torch.stack([(w2 * h * h).sum(), (w2 * h * c2).sum(), (w2 * c2 * c2).sum(),
                               (w2 * eps_pred * h).sum(), (w2 * eps_pred * c2).sum()]).double().cpu()
            self.sums = discounted(self.sums, new, self.decay)
            self.n += 1
        return g

    def summary(self) -> float:
        return self.coefficients()[0]

    def state_dict(self) -> dict:
        return {"sums": self.sums, "n": self.n, "discounted": True} if self.sums is not None else {"n": self.n}

    def load_state_dict(self, state: dict) -> None:
        self.sums, self.n = state.get("sums"), int(state.get("n", 0))
        if self.sums is not None and not state.get("discounted", False):
            # Saved by the earlier EMA (decay old + (1 - decay) new): bring it to the discounted sums'
            # scale so the history keeps its weight against new draws.
            self.sums = self.sums / (1.0 - self.decay)
