"""Time the export path on a bumpy analytic surface: marching cubes (~200k faces at the default
resolution), clean-up, decimation, xatlas unwrap, texture bake, GLB write.

    python scripts/bench_export.py --out bench_export.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from steindreamer.export.bake import bake_texture, unwrap, vertex_normals  # noqa: E402
from steindreamer.export.extract import extract_mesh  # noqa: E402
from steindreamer.export.gltf import write_glb  # noqa: E402
from steindreamer.fsio import atomic_write  # noqa: E402


def bumpy_density(p: torch.Tensor) -> torch.Tensor:
    """A sphere of radius 0.6 with +-0.06 bumps, as a smooth step (NeRF-like, 0 outside, 50 inside)."""
    r = p.norm(dim=-1)
    bumps = 0.06 * torch.sin(9 * p[:, 0]) * torch.sin(9 * p[:, 1]) * torch.sin(9 * p[:, 2])
    return 50.0 * torch.sigmoid((0.6 + bumps - r) / 0.01)


def albedo(p: torch.Tensor) -> torch.Tensor:
    return (0.5 + 0.5 * torch.sin(6 * p)).clamp(0, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--resolution", type=int, default=160)
    ap.add_argument("--target-faces", type=int, default=30000)
    ap.add_argument("--texture-size", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None, help="write the timings as JSON here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    c0 = time.process_time()  # CPU seconds of this process (all threads): the machine may be shared
    t0 = time.perf_counter()
    v, f, info = extract_mesh(bumpy_density, 1.0, resolution=args.resolution, threshold=25.0, target_faces=args.target_faces)
    t_extract = time.perf_counter() - t0
    c_extract = time.process_time() - c0
    c = time.process_time()
    t = time.perf_counter()
    vmapping, faces_uv, uvs = unwrap(v, f, args.texture_size)
    t_unwrap = time.perf_counter() - t
    c_unwrap = time.process_time() - c
    c = time.process_time()
    t = time.perf_counter()
    texture, covered = bake_texture(albedo, v, f, uvs, faces_uv, size=args.texture_size)
    t_bake = time.perf_counter() - t
    c_bake = time.process_time() - c
    t = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        glb = write_glb(Path(tmp) / "mesh.glb", v[vmapping], faces_uv, uvs, texture, vertex_normals(v, f)[vmapping])
        glb_bytes = glb.stat().st_size
    t_write = time.perf_counter() - t
    total = time.perf_counter() - t0

    result = {
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
                    "torch": torch.__version__, "load_avg_1min": os.getloadavg()[0]},
        "params": {"resolution": args.resolution, "target_faces": args.target_faces, "texture_size": args.texture_size},
        "mesh": {"grid_shape": info["grid_shape"], "faces_marching_cubes": info["faces_marching_cubes"],
                 "faces_final": int(len(f)), "vertices_final": int(len(v)), "uv_vertices": int(len(vmapping)),
                 "watertight": info["watertight"], "texture_coverage": float(covered.mean()), "glb_bytes": glb_bytes},
        "seconds": {
            "extract_sampling": info["seconds"]["coarse"] + info["seconds"]["fine_sampling"],
            "marching_cubes": info["seconds"]["marching_cubes"],
            "cleanup": info["seconds"]["cleanup"],
            "decimation": info["seconds"]["decimation"],
            "extract_total": t_extract,
            "unwrap": t_unwrap,
            "bake": t_bake,
            "write_glb": t_write,
            "total": total,
        },
        "cpu_seconds": {"extract_total": c_extract, "unwrap": c_unwrap, "bake": c_bake, "total": time.process_time() - c0},
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out is not None:
        atomic_write(args.out, text + "\n")


if __name__ == "__main__":
    main()
