"""Tensors cached on disk per prompt (text embeddings, f-distill's teacher pools): one safetensors
file an entry, its prompt in the metadata. An entry that cannot be trusted (unreadable, another
prompt's, failing the caller's check, not finite, not float32) reads as missing, so it is computed
again and overwritten; writes are atomic, and a cache that cannot be written is not an error."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from ..fsio import atomic_save


def read_entry(path: Path, key: str, prompt: str, check: Callable[[torch.Tensor], bool] = lambda x: True) -> torch.Tensor | None:
    from safetensors import safe_open

    if not path.exists():
        return None
    try:
        with safe_open(str(path), framework="pt") as entry:
            if (entry.metadata() or {}).get("prompt") != prompt:
                return None
            x = entry.get_tensor(key)
    except Exception:  # noqa: BLE001 - truncated, garbage, missing key: compute it again
        return None
    return x if x.dtype == torch.float32 and check(x) and bool(torch.isfinite(x).all()) else None


def write_entry(path: Path, key: str, x: torch.Tensor, prompt: str) -> None:
    from safetensors.torch import save_file

    try:
        atomic_save(path, lambda tmp: save_file({key: x.contiguous()}, str(tmp), metadata={"prompt": prompt}))
    except OSError:
        pass  # the cache is an optimisation
