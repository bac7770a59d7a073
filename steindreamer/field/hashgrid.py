"""Multiresolution hash-grid encoding (Instant-NGP), pure PyTorch, with tinycudann as an optional
CUDA backend behind the same interface (picked in `steindreamer.backends`)."""
from __future__ import annotations

import functools
import importlib
import logging
import math
from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from ..backends import hashgrid_backend
from ..errors import require, require_choice
from . import hashgrid_cpu

log = logging.getLogger(__name__)

# auto | torch | tcnn (CUDA) | triton (CUDA, fused Triton kernel) | cpu (fused C kernel)
GridBackend = Literal["auto", "torch", "tcnn", "triton", "cpu"]
GRID_BACKENDS = get_args(GridBackend)

# Instant-NGP's spatial-hash primes (the first is 1 so the x coordinate stays coherent in memory).
_PRIMES = (1, 2654435761, 805459861)
_PRIMES32 = tuple(p - 2**32 if p >= 2**31 else p for p in _PRIMES)  # the same bits as int32


@dataclass
class HashGridConfig:
    levels: int = 16  # resolution levels, base_res to max_res in a geometric series
    features: int = 2  # per level
    log2_table: int = 19  # hash table size per level = 2^log2_table
    base_res: int = 16  # grid resolution of the coarsest level
    max_res: int = 2048  # grid resolution of the finest level
    backend: GridBackend = "auto"  # see GridBackend; "auto" picks in steindreamer.backends
    # torch.compile the PyTorch encoding where points need no second derivative (everywhere but
    # normals). Applies only where the PyTorch path serves the encoding: backend=torch, or auto
    # where no fused kernel is available (no C compiler on CPU; neither tinycudann nor Triton on
    # CUDA). Beside a fused kernel it has no effect: make_hashgrid warns (auto) or refuses (a
    # fused backend named). Costs a one-off compile (~30 s on 2 CPU cores): pays on long runs only.
    compile: bool = False

    def check(self, key: str = "field.grid") -> None:
        require(self.levels >= 1 and self.features >= 1, f"{key}.levels/features", ">= 1")
        require(1 <= self.log2_table <= 24, f"{key}.log2_table", "in [1, 24]")
        require(1 <= self.base_res <= self.max_res, f"{key}.base_res/max_res", "1 <= base_res <= max_res")
        require_choice(self.backend, GRID_BACKENDS, f"{key}.backend")
        require(not (self.compile and self.backend in ("cpu", "tcnn", "triton")), f"{key}.compile",
                f"false with {key}.backend={self.backend} (it compiles the PyTorch encoding only: use backend=torch)")


def level_resolutions(cfg: HashGridConfig) -> list[int]:
    if cfg.levels == 1:
        return [cfg.base_res]
    growth = math.exp((math.log(cfg.max_res) - math.log(cfg.base_res)) / (cfg.levels - 1))
    return [int(math.floor(cfg.base_res * growth**level + 1e-6)) for level in range(cfg.levels)]  # 1e-6: exact powers stay exact


_KERNEL_DEVICE = {"cpu": "cpu", "triton": "cuda"}  # a fused kernel and the device its points live on


class HashGridEncoding(nn.Module):
    """Maps points in [-bound, bound]^3 to [N, levels * features] features.

    Coarse levels whose (res + 1)^3 vertices fit in the table are indexed densely (no collisions);
    finer levels use the spatial hash, where distinct vertices may share an entry by design.
    """

    def __init__(self, cfg: HashGridConfig, bound: float = 1.0, kernel: str = "torch"):
        super().__init__()
        self.cfg, self.bound = cfg, bound
        # A fused kernel for float32 points that need no gradient: "cpu" (hashgrid_cpu, C) on CPU
        # points, "triton" (hashgrid_triton) on CUDA points; "torch": the PyTorch path only.
        self.kernel = kernel
        self.out_dim = cfg.levels * cfg.features
        self.resolutions = level_resolutions(cfg)
        table = 2**cfg.log2_table
        sizes = [min(table, (r + 1) ** 3) for r in self.resolutions]
        # Per-level constants as [L, 1] columns, in the dtypes encode() computes in.
        column = lambda values, dtype: torch.tensor(values, dtype=dtype).view(-1, 1)  # noqa: E731
        self.register_buffer("res_f", column(self.resolutions, torch.float32), persistent=False)
        self.register_buffer("res_max", column([r - 1 for r in self.resolutions], torch.int32), persistent=False)
        self.register_buffer("res1", column([r + 1 for r in self.resolutions], torch.int32), persistent=False)
        self.register_buffer("offsets", column([sum(sizes[:i]) for i in range(len(sizes))], torch.int32), persistent=False)
        self.register_buffer("hashed", torch.tensor([(r + 1) ** 3 > table for r in self.resolutions]), persistent=False)
        self.table = nn.Parameter(torch.empty(sum(sizes), cfg.features).uniform_(-1e-4, 1e-4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape[:-1]
        # The C kernel and compiled graphs differentiate once, and only for the table; normals
        # differentiate through the points twice: they take the eager path.
        point_grad = torch.is_grad_enabled() and x.requires_grad
        if not point_grad and _KERNEL_DEVICE.get(self.kernel) == x.device.type and x.dtype == self.table.dtype == torch.float32:
            # The kernel's module is named after it: hashgrid_cpu, hashgrid_triton (imported on first use).
            module = importlib.import_module(f".hashgrid_{self.kernel}", __package__)
            return FusedEncode.apply(x.reshape(-1, 3), self.table, self, module).reshape(*shape, self.out_dim)
        eager = not self.cfg.compile or point_grad
        args = (x.reshape(-1, 3), self.table, self.res_f, self.res_max, self.res1, self.offsets, self.hashed)
        scalars = (self.bound, self.cfg.log2_table, self.cfg.features)
        out = encode(*args, *scalars) if eager else _compiled_encode(*scalars)(*args)
        return out.reshape(*shape, self.out_dim)


def encode(x, table, res_f, res_max, res1, offsets, hashed, bound: float, log2_table: int, features: int) -> torch.Tensor:
    """The encoding as a pure function of tensors (so torch.compile can take it): points [N, 3] ->
    features [N, L * F]. Per-level constants are [L, 1] columns; see HashGridEncoding."""
    # Sample-last layout ([axis or corner, level, N]): every broadcast below runs over outer
    # dimensions with N contiguous inside, which PyTorch's CPU kernels vectorise; with N first
    # and 2-wide inner dimensions the same ops ran ~50x slower (measured).
    # NaN -> 0, +-inf -> the clamp, as the fused kernels do: a NaN point (a diverged field's surface
    # point) must not become a negative index.
    u = ((x / bound) * 0.5 + 0.5).nan_to_num(0.0).clamp(0.0, 1.0).t()  # [3, N] in [0, 1]
    pos = u[:, None, :] * res_f.to(u.dtype)  # [3, L, N]
    # int32 indices: half the memory of int64. Products wrap modulo 2^32 exactly like Instant-NGP's
    # uint32 hash (the primes are stored as their int32 bit patterns), and the table sizes are powers of 2.
    base = pos.floor().to(torch.int32).clamp(max=res_max)
    frac = pos - base
    # Per axis, the two grid coordinates (base, base + 1) and their linear weights [2, L, N];
    # the 8 corners [2, 2, 2, L, N] are their outer combination.
    cx, cy, cz = (torch.stack([b, b + 1]) for b in base.unbind(0))
    wx, wy, wz = (torch.stack([1 - f, f]) for f in frac.unbind(0))
    # Dense levels have (res + 1)^3 <= table size < 2^31 rows, so their index never wraps.
    dense = cx[:, None, None] + (cy * res1)[None, :, None] + (cz * (res1 * res1))[None, None, :]
    h = (cx * _PRIMES32[0])[:, None, None] ^ (cy * _PRIMES32[1])[None, :, None] ^ (cz * _PRIMES32[2])[None, None, :]
    # Hashed levels are 2^log2_table rows (the low bits of the hash); a dense index is already in range.
    rows = torch.where(hashed.view(-1, 1), h & (2**log2_table - 1), dense) + offsets
    w = wx[:, None, None] * wy[None, :, None] * wz[None, None, :]  # [2, 2, 2, L, N]
    flat = rows.reshape(-1).long()
    feats = [(w * gather(table[:, f], flat).view_as(w)).sum((0, 1, 2)) for f in range(features)]
    return torch.stack(feats, -1).transpose(0, 1).reshape(x.shape[0], -1)  # [N, L, F] -> [N, L * F]


@functools.cache
def _compiled_encode(bound: float, log2_table: int, features: int):
    """`encode` under torch.compile, built once per process and configuration. The scalars are baked
    in as constants, and shapes go dynamic only once they change (N does every step): under
    dynamic=True the integers became symbols too, and Triton computed the hash mask 2**log2_table - 1
    as a float, a compile error on CUDA (seen on an H100)."""
    return torch.compile(lambda *tensors: encode(*tensors, bound, log2_table, features))


class FusedEncode(torch.autograd.Function):
    """features [N, L * F] from float32 points [N, 3] through a fused kernel: `kernel` is the module
    (hashgrid_cpu, hashgrid_triton) whose forward(x, table, out, enc) and backward(x, grad, dtable,
    enc) fill `out` and `dtable`. Gradient for the table only: sample points are held fixed."""

    @staticmethod
    def forward(ctx, x, table, enc, kernel):
        x, table = x.contiguous(), table.contiguous()
        out = x.new_empty(x.shape[0], enc.out_dim)
        if x.shape[0]:
            kernel.forward(x, table, out, enc)
        ctx.save_for_backward(x)
        ctx.enc, ctx.kernel = enc, kernel
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        dtable = torch.zeros_like(ctx.enc.table)
        if x.shape[0]:
            ctx.kernel.backward(x, grad.contiguous(), dtable, ctx.enc)
        return None, dtable, None, None


class _Gather(torch.autograd.Function):
    """values[index] for 1-D values; its backward is _Scatter and vice versa, so any order of
    derivative works (normals need two). A 1-D scatter_add is ~1.6x faster on CPU than the index_add
    behind index_select's backward, and ~30x faster than embedding's row-wise backward (measured)."""

    @staticmethod
    def forward(ctx, values, index):
        ctx.save_for_backward(index)
        ctx.size = values.shape[0]
        return values.index_select(0, index)

    @staticmethod
    def backward(ctx, grad):
        (index,) = ctx.saved_tensors
        return _Scatter.apply(grad, index, ctx.size), None


class _Scatter(torch.autograd.Function):
    """zeros(size).scatter_add(0, index, src): the adjoint of _Gather."""

    @staticmethod
    def forward(ctx, src, index, size):
        ctx.save_for_backward(index)
        return src.new_zeros(size).scatter_add_(0, index, src.contiguous())

    @staticmethod
    def backward(ctx, grad):
        (index,) = ctx.saved_tensors
        return _Gather.apply(grad, index), None, None


def gather(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Differentiable (to any order) values[index] for 1-D values and int64 index."""
    return _Gather.apply(values, index)


class TcnnHashGridEncoding(nn.Module):
    """tinycudann's fused HashGrid with the same config and interface (CUDA only)."""

    kernel = "tcnn"  # what serves the encoding, as HashGridEncoding.kernel says it

    def __init__(self, cfg: HashGridConfig, bound: float = 1.0):
        super().__init__()
        import tinycudann as tcnn  # optional dependency, only imported when chosen

        res = level_resolutions(cfg)
        growth = (res[-1] / res[0]) ** (1 / max(cfg.levels - 1, 1))
        self.encoding = tcnn.Encoding(
            3,
            {
                "otype": "HashGrid",
                "n_levels": cfg.levels,
                "n_features_per_level": cfg.features,
                "log2_hashmap_size": cfg.log2_table,
                "base_resolution": cfg.base_res,
                "per_level_scale": growth,
            },
        )
        self.bound, self.out_dim = bound, cfg.levels * cfg.features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape[:-1]
        u = ((x.reshape(-1, 3) / self.bound) * 0.5 + 0.5).clamp(0.0, 1.0)
        return self.encoding(u).float().reshape(*shape, self.out_dim)


def make_hashgrid(cfg: HashGridConfig, bound: float, device) -> nn.Module:
    backend = hashgrid_backend(device, cfg.backend, cpu_kernel=hashgrid_cpu.library)
    if cfg.compile and backend != "torch":
        log.warning("field.grid.compile=true has no effect: the fused '%s' kernel serves the hash grid here (field.grid.backend=torch to compile the PyTorch encoding)", backend)
    if backend == "tcnn":
        return TcnnHashGridEncoding(cfg, bound)
    return HashGridEncoding(cfg, bound, kernel=backend if backend in ("cpu", "triton") else "torch")
