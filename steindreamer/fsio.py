"""Atomic file writes and safe run-folder names.

Every file a run produces (checkpoints, configs, assets) goes through `atomic_write`: write to a
temporary file in the same folder, fsync, then rename over the target, so a crash at any moment
leaves either the old file or the new one, never half of one.
"""
from __future__ import annotations

import contextlib
import os
import re
import tempfile
import unicodedata
from pathlib import Path
from typing import Callable, Iterator


_UMASK = os.umask(0o022)
os.umask(_UMASK)  # read once: os.umask can only be read by setting it


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path next to `path`; on success it is fsynced and renamed onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        # mkstemp creates 0600 files; outputs get the permissions a plain open() would give them.
        if not tmp.is_symlink():
            os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as err:
        if err.errno is None or err.filename not in (None, tmp, str(tmp)):
            raise  # not about this file, or already named by an inner write
        # Name the file the user asked for (not our hidden temp file) in e.g. a disk-full message.
        raise OSError(err.errno, err.strerror, str(path)) from err
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write(path: str | os.PathLike, data: bytes | str) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(data.encode() if isinstance(data, str) else data)


def atomic_save(path: str | os.PathLike, writer: Callable[[Path], None]) -> None:
    """Run `writer(tmp_path)` (e.g. safetensors' save_file, trimesh export) and move the result into place."""
    with atomic_path(path) as tmp:
        writer(tmp)


def atomic_write_all(items: list[tuple[str | os.PathLike, bytes | str]]) -> None:
    """Several files, all or none: every temp file is written before any is renamed; the renames go
    in list order (put the file that refers to the others last)."""
    with contextlib.ExitStack() as stack:
        for path, data in reversed(items):
            stack.enter_context(_staged(path, data))


@contextlib.contextmanager
def _staged(path, data: bytes | str) -> Iterator[None]:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
        yield


def atomic_torch_save(path: str | os.PathLike, obj) -> None:
    """torch.save, atomically. Through a Python file object: on a full disk torch's own path writer
    raises an opaque RuntimeError, a file object raises OSError(ENOSPC)."""
    import torch

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            torch.save(obj, f)

    atomic_save(path, write)


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def slugify(text: str, max_len: int = 60) -> str:
    """A folder-safe name: ASCII letters, digits and '-', no separators or dots, bounded length."""
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    text = re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()
    text = text[:max_len].rstrip("-")
    return text or "prompt"
