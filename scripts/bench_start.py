"""Does the NeRF stage keep the right shape once it has it? Start the field either at the true
primitive (density and albedo fitted to the world's SDF by regression: a diagnosis, never a feature)
or at the preset's blob, run the preset's distillation steps, and check the extracted surface in 3D
(toy/shape3d) every --every steps. If the true start stays right and the blob start goes wrong, the
prior can hold the shape and the failure is in reaching it (e.g. breaking the yaw symmetry of the blob).

    python scripts/bench_start.py "a red cube" --steps 600 --out benchmarks/start_red_cube.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from steindreamer.config import load_config  # noqa: E402
from steindreamer.export.extract import extract_field_surface  # noqa: E402
from steindreamer.fsio import atomic_write  # noqa: E402
from steindreamer.pipeline import build_stages  # noqa: E402
from steindreamer.toy import shape3d  # noqa: E402
from steindreamer.toy.world import PALETTE, SDFS, parse_caption  # noqa: E402


def fit_to_truth(field, shape: str, colour: str, iters: int = 400, seed: int = 0) -> None:
    """Regress log1p(density) to a solid of density 60 inside the true SDF and the albedo to the palette colour."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(field.parameters(), lr=1e-2)
    rgb_true, level = torch.tensor(PALETTE[colour]), torch.log1p(torch.tensor(60.0))
    for _ in range(iters):
        x = (torch.rand(8192, 3, generator=g) * 2 - 1) * 0.75
        sigma, rgb = field(x)
        inside = (SDFS[shape](x) < 0).float()
        loss = ((torch.log1p(sigma) - inside * level) ** 2).mean() + (inside[:, None] * (rgb - rgb_true) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    if field.occupancy is not None:
        for _ in range(3):
            field.occupancy.update(field.density, g)


def surface_check(field, cfg, colour: str, shape: str) -> dict:
    import trimesh

    v, f, _ = extract_field_surface(field, cfg.mesh)
    r = shape3d.check_mesh(trimesh.Trimesh(v, f), colour, shape)
    return {"shape": r["shape"], "volumetric_iou": round(r["volumetric_iou"], 4),
            "fit": {k: round(x, 4) for k, x in r["shape_fit"].items()},
            "axis_facing_share": r["features"]["axis_facing_share"], "hole_open": r["features"]["hole_open"]}


def run(prompt: str, start: str, steps: int, every: int, preset: str, overrides: list[str]) -> dict:
    cfg = load_config(preset, overrides=[f"train.steps={steps}", *overrides])
    _, nerf = build_stages(prompt, cfg)
    colour, shape = parse_caption(prompt)
    if start == "truth":
        fit_to_truth(nerf.field, shape, colour, seed=cfg.train.seed)
    trace = [{"step": 0, **surface_check(nerf.field, cfg, colour, shape)}]
    t0 = time.perf_counter()
    for s in range(1, steps + 1):
        nerf.step()
        if s % every == 0 or s == steps:
            trace.append({"step": s, **surface_check(nerf.field, cfg, colour, shape)})
            print(f"{start:5s} step {s:4d}: {trace[-1]['shape']}, IoU {trace[-1]['volumetric_iou']:.3f}", flush=True)
    return {"start": start, "seconds": round(time.perf_counter() - t0, 1), "trace": trace,
            "right_at_end": trace[-1]["shape"] == shape}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("prompt")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--every", type=int, default=150)
    ap.add_argument("--starts", default="truth,blob")
    ap.add_argument("--preset", default="toy")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="key=value")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    res = {"prompt": args.prompt, "preset": args.preset, "overrides": args.overrides, "steps": args.steps,
           "runs": [run(args.prompt, s, args.steps, args.every, args.preset, args.overrides) for s in args.starts.split(",")]}
    text = json.dumps(res, indent=2)
    if args.out:
        atomic_write(Path(args.out), text)
    print(text if not args.out else f"wrote {args.out}")


if __name__ == "__main__":
    main()
