"""C kernels for CPU hot loops (the hash grid, the occupancy lookup), built on first use with the
system's C compiler (about a second each; plain C, no torch headers), cached under
~/.cache/steindreamer and called through ctypes. Where no compiler works, `load` returns None and
the caller's PyTorch path runs; `steindreamer.backends` decides which path is used.

Flags: -march=native as torch.compile's C++ builds do (so the cache key includes the CPU); ISO C
(-std=c99) keeps GCC from fusing multiply-adds, so results do not depend on the CPU. -fopenmp links
libgomp.so.1; torch's CPU wheel has already loaded its own libgomp.so.1, which the dynamic loader
reuses (same soname), so kernels run on torch's OpenMP threads and follow torch.set_num_threads (a
second thread pool would fight torch's spinning threads for the cores). Without OpenMP a kernel is
built serial.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

FLAGS = ["-O3", "-march=native", "-fPIC", "-shared", "-std=c99"]
OPENMP = ["-fopenmp"]


def cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "steindreamer"


def _cpu_id() -> str:
    """The CPU a -march=native build is for (a shared cache folder may serve several machines)."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags"))]
        return platform.machine() + "".join(sorted(set(lines)))
    except OSError:
        return platform.machine() + platform.processor()


def _build(name: str, source: str, compiler: str, flags: list[str]) -> Path:
    """Compile source to a cached shared library (atomically: a temp file renamed into place)."""
    key = hashlib.sha256("\0".join([source, compiler, *flags, _cpu_id()]).encode()).hexdigest()[:16]
    cache = cache_dir()
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError:
        cache = Path(tempfile.gettempdir()) / "steindreamer-cache"
        cache.mkdir(parents=True, exist_ok=True)
    lib = cache / f"{name}-{key}.so"
    if lib.exists():
        return lib
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        src, out = Path(tmp) / f"{name}.c", Path(tmp) / f"{name}.so"
        src.write_text(source)
        subprocess.run([compiler, *flags, str(src), "-o", str(out), "-lm"], check=True, capture_output=True, timeout=120)
        os.replace(out, lib)
    return lib


@functools.cache
def load(name: str, source: str) -> ctypes.CDLL | None:
    """The kernel library built from C `source` (with OpenMP, else serial), or None where no C
    compiler builds it. $CC names the compiler (default cc)."""
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        return None
    for flags in (FLAGS + OPENMP, FLAGS):
        try:
            return ctypes.CDLL(str(_build(name, source, compiler, flags)))
        except (OSError, subprocess.SubprocessError):
            continue
    return None
