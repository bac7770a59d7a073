"""The 3D quality benchmark of the built-in world: `generate` for every prompt, each exported GLB checked
against the true primitive (steindreamer.toy.shape3d), a gallery of every asset.

Per engine and prompt it runs `steindreamer generate PROMPT --preset toy` in its own process (as a user
would; wall seconds include loading), then checks `model.glb`: volumetric IoU, Chamfer distance,
normal consistency, colour, the shape classification, the cube's face directions, the torus' hole,
and (if node and tests/node_modules are there) the Khronos validator. Writes the JSON and a gallery
(one strip per prompt: five views around at 15 degrees and one from below).

    python scripts/bench_quality.py --out benchmarks/quality_builtin.json        # all 36 prompts, SDS
    python scripts/bench_quality.py --quick --engines sds,ssd,vsd --out q.json   # 6 prompts per engine
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from steindreamer.fsio import atomic_write  # noqa: E402
from steindreamer.toy import shape3d  # noqa: E402
from steindreamer.toy.world import parse_caption  # noqa: E402

QUICK = ("a red cube", "a orange pyramid", "a green sphere", "a blue cone", "a yellow torus", "a purple cylinder")
# Each engine's toy settings. VSD's step costs ~3x SDS's: half the steps with a 10x faster LoRA
# (quick benchmark: 6/6 right, IoU 0.761, 69 s per asset; benchmarks/quality_builtin_quick_vsd.json).
ENGINE_SETTINGS = {"sds": [], "ssd": ["guidance.engine=ssd"],
                   "vsd": ["guidance.engine=vsd", "steps=300", "guidance.vsd.lora_lr=0.001"],
                   # not a prior: the world's true renders (scripts/truth_generate.py), the ceiling of
                   # these cameras, this representation and this export
                   "truth": []}


def world_prompts(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]


def khronos(glb: Path) -> dict | None:
    node, script = shutil.which("node"), ROOT / "tests" / "gltf_validate.js"
    if node is None or not (ROOT / "tests" / "node_modules" / "gltf-validator").is_dir():
        return None
    proc = subprocess.run([node, str(script), str(glb)], capture_output=True, text=True, timeout=120)
    return json.loads(proc.stdout.strip().splitlines()[-1]) if proc.stdout.strip() else {"numErrors": -1, "errors": [proc.stderr[-200:]]}


def run_one(prompt: str, engine: str, work: Path, preset: str, overrides: list[str], seed: int) -> dict:
    run_dir = work / engine / prompt.replace(" ", "_")
    program = [str(ROOT / "scripts" / "truth_generate.py")] if engine == "truth" else ["-m", "steindreamer", "generate"]
    cmd = [sys.executable, *program, prompt, "--preset", preset, "--out", str(run_dir), "--overwrite",
           "--quiet", f"seed={seed}", *ENGINE_SETTINGS[engine], *overrides]
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    seconds = time.time() - t0
    entry = {"prompt": prompt, "engine": engine, "seconds": round(seconds, 1), "run": str(run_dir)}
    glb = run_dir / "model.glb"
    if proc.returncode != 0 or not glb.exists():
        tail = (proc.stderr or proc.stdout).strip().splitlines()
        return {**entry, "failed": tail[-1] if tail else f"exit {proc.returncode}", "right": False}
    result = shape3d.check_glb(glb, prompt, seed=seed)
    result.pop("glb"), result.pop("prompt")
    entry.update(result)
    entry["khronos"] = khronos(glb)
    return entry


def gallery_strip(glb: Path, size: int = 96) -> np.ndarray:
    """Five views around at 15 degrees elevation and one from below (-45 degrees) of the GLB as loaded."""
    import torch
    from scipy.spatial import cKDTree

    from steindreamer.export.pipeline import turntable_frames

    mesh = shape3d.load_glb(glb)
    colours = np.asarray(mesh.visual.to_color().vertex_colors)[:, :3] / 255.0
    tree = cKDTree(np.asarray(mesh.vertices))

    def colour_fn(p: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(colours[tree.query(p.detach().cpu().numpy())[1]]).float()

    light = torch.tensor([0.35, 0.85, 0.40])
    kw = dict(size=size, distance=2.0, fov=45.0, light_direction=light / light.norm())
    frames = turntable_frames(mesh.vertices, mesh.faces, colour_fn, n_frames=5, elevation=15.0, **kw)
    frames += turntable_frames(mesh.vertices, mesh.faces, colour_fn, n_frames=1, elevation=-45.0, **kw)
    return np.concatenate(frames, axis=1)


def render_strips(results: list[dict], size: int = 128) -> list[np.ndarray]:
    """Each asset's gallery strip, rendered once for both pictures (blank where the run failed)."""
    return [gallery_strip(Path(r["run"]) / "model.glb", size) if "failed" not in r else np.full((size, 6 * size, 3), 255, np.uint8)
            for r in results]


def write_gallery(results: list[dict], strips: list[np.ndarray], path: Path, size: int = 96) -> None:
    from PIL import Image, ImageDraw

    rows = []
    for r, strip in zip(results, strips):
        if strip.shape[0] != size:
            strip = np.asarray(Image.fromarray(strip).resize((6 * size, size), Image.LANCZOS))
        label = Image.new("RGB", (170, size), "white")
        draw = ImageDraw.Draw(label)
        draw.text((4, 4), f"{r['engine']}: {r['prompt'][2:]}", fill="black")
        if "failed" in r:
            draw.text((4, 20), "failed", fill="red")
        else:
            draw.text((4, 20), f"seen as {r['colour']} {r['shape']}", fill="darkgreen" if r["right"] else "red")
            draw.text((4, 36), f"IoU {r['volumetric_iou']:.2f}  {r['seconds']:.0f} s", fill="black")
        rows.append(np.concatenate([np.asarray(label), strip], axis=1))
    Image.fromarray(np.concatenate(rows, axis=0)).save(path)


def write_grid(results: list[dict], strips: list[np.ndarray], path: Path, columns: int = 6) -> None:
    """The compact picture (README's): one view of each asset (its strip's second) in prompt order,
    `columns` to a row, framed green where the check found the right shape and colour, red where not,
    grey where the run failed."""
    from PIL import Image

    size = strips[0].shape[0]
    cells = []
    for r, strip in zip(results, strips):
        cell = strip[:, size:2 * size].copy()
        frame = (200, 200, 200) if "failed" in r else (40, 160, 60) if r["right"] else (220, 40, 40)
        cell[:2], cell[-2:], cell[:, :2], cell[:, -2:] = frame, frame, frame, frame
        cells.append(cell)
    cells += [np.full((size, size, 3), 255, np.uint8)] * (-len(cells) % columns)
    rows = [np.concatenate(cells[i:i + columns], axis=1) for i in range(0, len(cells), columns)]
    Image.fromarray(np.concatenate(rows, axis=0)).save(path)


def summarise(results: list[dict]) -> dict:
    ok = [r for r in results if "failed" not in r]
    cubes = [r for r in ok if parse_caption(r["prompt"])[1] == "cube"]
    tori = [r for r in ok if parse_caption(r["prompt"])[1] == "torus"]
    valid = [r["khronos"] for r in ok if r.get("khronos") is not None]
    return {
        "assets": len(results), "failed": len(results) - len(ok),
        "right": sum(r["right"] for r in results), "shape_right": sum(r.get("shape_right", False) for r in results),
        "colour_right": sum(r.get("colour_right", False) for r in results),
        "mean_volumetric_iou": float(np.mean([r["volumetric_iou"] for r in ok])) if ok else float("nan"),
        "mean_chamfer": float(np.mean([r["chamfer"] for r in ok])) if ok else float("nan"),
        "mean_normal_consistency": float(np.mean([r["normal_consistency"] for r in ok])) if ok else float("nan"),
        "cube_faces_clustered": sum(r["features"]["axis_facing_share"] >= shape3d.CUBE_FACES_SHARE for r in cubes),
        "cubes": len(cubes), "torus_hole_open": sum(r["features"]["hole_open"] for r in tori), "tori": len(tori),
        "glb_validated": len(valid), "glb_with_errors": sum(v["numErrors"] != 0 for v in valid),
        "seconds_per_asset_mean": float(np.mean([r["seconds"] for r in results])),
        "seconds_per_asset_max": float(np.max([r["seconds"] for r in results])),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engines", default="sds", help="comma-separated: sds, ssd, vsd, truth (the true renders' ceiling)")
    ap.add_argument("--quick", action="store_true", help=f"the 6 prompts {', '.join(QUICK)}")
    ap.add_argument("--prompts", default=str(ROOT / "assets" / "prompts" / "builtin_world.txt"))
    ap.add_argument("--limit", type=int, default=0, help="only the first N prompts (0: all)")
    ap.add_argument("--preset", default="toy")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="key=value",
                    help="config override for every run (repeatable)")
    ap.add_argument("--work", default="/tmp/steindreamer_bench_quality", help="run folders go here")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "quality_builtin.json"))
    ap.add_argument("--gallery", default="", help="gallery PNG (default: next to --out)")
    args = ap.parse_args()
    prompts = list(QUICK) if args.quick else world_prompts(Path(args.prompts))
    if args.limit:
        prompts = prompts[: args.limit]
    engines = args.engines.split(",")
    bad = [e for e in engines if e not in ENGINE_SETTINGS]
    if bad:
        sys.exit(f"unknown engine {bad[0]!r}; engines: {', '.join(ENGINE_SETTINGS)}")
    work = Path(args.work)
    results, t0 = [], time.time()
    total = len(prompts) * len(engines)
    for engine in engines:
        for prompt in prompts:
            r = run_one(prompt, engine, work, args.preset, args.overrides, args.seed)
            results.append(r)
            done = len(results)
            eta = (time.time() - t0) / done * (total - done)
            what = r.get("failed") or (f"seen as {r['colour']} {r['shape']}, IoU {r['volumetric_iou']:.2f}, "
                                      f"chamfer {r['chamfer']:.3f}, {'right' if r['right'] else 'WRONG'}")
            print(f"[{done}/{total}] {engine} {prompt!r}: {what} ({r['seconds']:.0f} s, ETA {eta / 60:.1f} min)", flush=True)
    by_engine = {e: summarise([r for r in results if r["engine"] == e]) for e in engines}
    out = {"command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "preset": args.preset, "seed": args.seed,
           "overrides": args.overrides, "prompts": prompts, "threads": os.cpu_count(), "by_engine": by_engine,
           "wall_seconds": round(time.time() - t0, 1), "results": results}
    out_path = Path(args.out)
    gallery = Path(args.gallery) if args.gallery else out_path.with_suffix(".png")
    strips = render_strips(results)
    write_gallery(results, strips, gallery)
    grid = gallery.with_name(gallery.stem + "_grid.png")
    write_grid(results, strips, grid)
    out["gallery"], out["grid"] = str(gallery), str(grid)
    atomic_write(out_path, json.dumps(out, indent=2) + "\n")
    for e, s in by_engine.items():
        print(f"{e}: {s['right']}/{s['assets']} right (shape {s['shape_right']}, colour {s['colour_right']}), "
              f"mean IoU {s['mean_volumetric_iou']:.3f}, chamfer {s['mean_chamfer']:.3f}, "
              f"{s['seconds_per_asset_mean']:.0f} s per asset (max {s['seconds_per_asset_max']:.0f})")
    print(f"wrote {out_path}, {gallery} and {grid}")


if __name__ == "__main__":
    main()
