"""`steindreamer generate` with the prior replaced by the truth: the 3D benchmark's ceiling.

Every training view's image-space gradient is G = 4 (x - x_true), where x_true is the built-in
world's exact render of the prompt's shape from the same camera (anti-aliased, 4x4 rays per pixel,
the world's light). Everything else is the toy preset's pipeline: cameras, field, occupancy, mesh
extraction, mesh stage, bake, export. What this run gets wrong, no prior can get right with these
cameras and this representation; scripts/bench_quality.py runs it as the engine `truth`.

Shading is forced to the world's (Lambertian under the fixed light from step 0), so the NeRF's
renders can equal the true ones.

    python scripts/truth_generate.py "a red cube" --out /tmp/truth_cube camera.elevation=[-45,80]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from steindreamer.config import load_config  # noqa: E402
from steindreamer.guidance.distill import Distiller  # noqa: E402
from steindreamer.pipeline import generate  # noqa: E402
from steindreamer.prompt import check_prompt  # noqa: E402
from steindreamer.runfolder import RunFolder  # noqa: E402
from steindreamer.toy.world import parse_caption, render_shape  # noqa: E402

WORLD_SHADING = ["shading.albedo_steps=0", "shading.lambertian_p=1.0", "shading.textureless_p=0.0",
                 "train.variance_every=0"]  # G has no noise to measure
SUPERSAMPLE = 4


def true_image_distiller(colour: str, shape: str):
    """A Distiller factory whose gradient pulls each render towards the world's true render."""

    class TrueImages(Distiller):
        def gradient(self, x, render, cameras, cond, uncond, t, noise, update=True, generator=None):
            h, w = render["rgb"].shape[1:3]
            truth = render_shape(shape, colour, cameras, h, w, supersample=SUPERSAMPLE)["rgb"].to(x.device)
            target = self.guidance.encode(truth.permute(0, 3, 1, 2))
            grad = 4.0 * (x.detach() - target).float()
            return grad, {"finite": bool(torch.isfinite(grad).all())}

    return TrueImages


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("prompt")
    ap.add_argument("--out", required=True)
    ap.add_argument("--preset", default="toy")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--overwrite", action="store_true", help="delete an existing run folder and start over")
    ap.add_argument("overrides", nargs="*", metavar="key=value")
    args = ap.parse_intermixed_args()
    prompt = check_prompt(args.prompt)
    colour, shape = parse_caption(prompt)
    cfg = load_config(args.preset, None, [*args.overrides, *WORLD_SHADING])
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    run = RunFolder(Path(args.out))
    run.prepare(False, args.overwrite)
    run.write_start(cfg, prompt)
    result = generate(prompt, cfg, run.root, show_progress=not args.quiet, make_distiller=true_image_distiller(colour, shape))
    print(f"done: {result['steps']} steps in {result['seconds']:.1f} s -> {run.root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
