"""The one place that picks accelerated libraries. Every part has a pure-PyTorch path that runs on
CPU and CUDA; the optional CUDA backends, used only when importable and on CUDA, are tinycudann or a
Triton kernel (hash grid), nerfacc (the volume renderer's weights from densities,
`render_weight_from_density`; the occupancy grid and the packing of samples are ours, in
`render/occupancy.py` and `render/volume.py`) and nvdiffrast (rasteriser). On CPU the hash grid and
the occupancy lookup have C kernels (`steindreamer.native`), used where a C compiler builds them.

A leaf module: it imports nothing from steindreamer. The modules holding a C kernel pass their
loader (`cpu_kernel`: returns the built library, or None where it does not build), so the rule is
here and the kernels stay with the code they serve.

`STEINDREAMER_BACKEND=torch` forces the pure-PyTorch path everywhere (parity tests, debugging).
"""
from __future__ import annotations

import functools
import importlib
import os
from typing import Callable

import torch


@functools.cache
def _importable(name: str) -> bool:
    # nerfacc JIT-builds CUDA code on first use and, on CPU, leaves a broken cache behind:
    # only ever try it when CUDA is present.
    if not torch.cuda.is_available():
        return False
    try:
        importlib.import_module(name)
        return True
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return False


def _forced_torch() -> bool:
    return os.environ.get("STEINDREAMER_BACKEND", "").lower() == "torch"


def _pick(device: torch.device | str, library: str, requested: str = "auto") -> str:
    device = torch.device(device)
    if requested == "torch" or _forced_torch():
        return "torch"
    available = device.type == "cuda" and _importable(library)
    if requested == library and not available:
        raise RuntimeError(f"backend '{library}' requested but not importable with CUDA on this machine")
    return library if available else "torch"


CpuKernel = Callable[[], object]  # loads a C kernel: the library, or None where it does not build


def _native(device, cpu_kernel: CpuKernel) -> bool:
    """Whether a C kernel (steindreamer.native) serves this device: CPU, not forced to PyTorch, and
    `cpu_kernel()` built (only called on CPU: no build is attempted for CUDA points)."""
    return torch.device(device).type == "cpu" and not _forced_torch() and cpu_kernel() is not None


def hashgrid_backend(device, requested: str = "auto", *, cpu_kernel: CpuKernel) -> str:
    """'tcnn' or 'triton' (CUDA), 'cpu' (the fused C kernel, CPU) or 'torch'. On CUDA, 'auto' takes
    tinycudann where it imports, else the Triton kernel (hashgrid_triton) where Triton imports.
    cpu_kernel: the fused kernel's loader (`field.hashgrid_cpu.library`)."""
    if torch.device(device).type == "cpu" and requested in ("auto", "cpu"):
        if _native(device, cpu_kernel):
            return "cpu"
        if requested == "cpu" and not _forced_torch():
            raise RuntimeError("backend 'cpu' requested but the hash grid's C kernel does not build here (no working C compiler)")
        return "torch"
    if requested == "cpu":
        requested = "auto"  # a CPU kernel asked for on CUDA: the usual choice there
    if requested in ("auto", "tcnn") and _pick(device, "tinycudann", "tinycudann" if requested == "tcnn" else "auto") == "tinycudann":
        return "tcnn"
    if requested in ("auto", "triton") and _pick(device, "triton", requested) == "triton":
        return "triton"
    return "torch"


def occupancy_backend(device, *, cpu_kernel: CpuKernel) -> str:
    """'cpu' (the occupancy lookup's C loop, where a compiler builds it) or 'torch'. cpu_kernel: its
    loader (`render.occupancy.library`)."""
    return "cpu" if _native(device, cpu_kernel) else "torch"


def volume_backend(device, requested: str = "auto") -> str:
    """'nerfacc' (its render_weight_from_density computes the ray weights) or 'torch'."""
    return _pick(device, "nerfacc", requested)


def raster_backend(device, requested: str = "auto") -> str:
    """'nvdiffrast' or 'torch'."""
    return _pick(device, "nvdiffrast", requested)
