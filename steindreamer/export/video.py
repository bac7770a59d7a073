"""Turntable videos and contact sheets."""
from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np

from steindreamer.fsio import atomic_path

log = logging.getLogger(__name__)


def _check(frames) -> list[np.ndarray]:
    frames = [np.asarray(f) for f in frames]
    if not frames:
        raise ValueError("no frames")
    shape = frames[0].shape
    for f in frames:
        if f.dtype != np.uint8 or f.ndim != 3 or f.shape[2] != 3 or f.shape != shape:
            raise ValueError(f"frames must be uint8 [H, W, 3] of one size, got {f.dtype} {f.shape} (first {shape})")
    return frames


def _even(frame: np.ndarray) -> np.ndarray:
    """H.264 in yuv420p needs even sizes: pad by one edge row/column rather than resample."""
    h, w = frame.shape[:2]
    return np.pad(frame, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")


def _write_mp4(frames: list[np.ndarray], path: Path, fps: float) -> None:
    import imageio_ffmpeg  # noqa: PLC0415 - bundles its own ffmpeg binary

    frames = [_even(f) for f in frames]
    h, w = frames[0].shape[:2]
    with atomic_path(path) as tmp:
        # The temporary name ends in .tmp, so name the container explicitly (-f mp4).
        writer = imageio_ffmpeg.write_frames(
            str(tmp), (w, h), fps=fps, codec="libx264", quality=8, pix_fmt_out="yuv420p",
            macro_block_size=1, output_params=["-f", "mp4"],
        )
        writer.send(None)  # start the generator (spawns ffmpeg)
        try:
            for f in frames:
                writer.send(np.ascontiguousarray(f))
        finally:
            writer.close()


def _write_gif(frames: list[np.ndarray], path: Path, fps: float) -> None:
    import imageio.v3 as iio  # noqa: PLC0415

    with atomic_path(path) as tmp:
        iio.imwrite(tmp, np.stack(frames), extension=".gif", duration=1000.0 / fps, loop=0)


def write_turntable(frames, path, fps: float = 24) -> Path:
    """Write frames (uint8 [H, W, 3] each) as an H.264 mp4 at `path`; if ffmpeg fails, as a GIF
    with the same stem. Returns the path actually written."""
    frames = _check(frames)
    path = Path(path)
    try:
        _write_mp4(frames, path.with_suffix(".mp4"), fps)
        return path.with_suffix(".mp4")
    except Exception as err:  # noqa: BLE001 - any ffmpeg problem: fall back to GIF
        log.warning("mp4 writing failed (%s); writing a GIF instead", err)
    gif = path.with_suffix(".gif")
    _write_gif(frames, gif, fps)
    return gif


def contact_sheet(frames, cols: int | None = None, pad: int = 2, pad_value: int = 255) -> np.ndarray:
    """Frames tiled in a grid (row-major, `cols` per row, default ~square) with `pad` pixels between
    them; uint8 [rows*(H+pad)-pad, cols*(W+pad)-pad, 3]."""
    frames = _check(frames)
    n = len(frames)
    cols = int(cols) if cols else math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    h, w = frames[0].shape[:2]
    sheet = np.full((rows * (h + pad) - pad, cols * (w + pad) - pad, 3), pad_value, dtype=np.uint8)
    for k, f in enumerate(frames):
        r, c = divmod(k, cols)
        sheet[r * (h + pad) : r * (h + pad) + h, c * (w + pad) : c * (w + pad) + w] = f
    return sheet


def save_contact_sheet(frames, path, cols: int | None = None) -> Path:
    """contact_sheet(...) written as a PNG (atomically)."""
    from steindreamer.export.gltf import save_png  # noqa: PLC0415

    return save_png(path, contact_sheet(frames, cols))
