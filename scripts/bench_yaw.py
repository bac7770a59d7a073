"""Can the built-in prior tell which way a shape is turned? The diagnosis behind the cube that came out
a rounded cylinder.

For a camera at azimuth a (and a fixed elevation) it renders the true shape as that camera sees it
(x_right) and the same shape turned by 45 degrees about +Y, seen from the same camera (x_turned; for a
cube or a pyramid that is a corner-on view where a face-on one is due). It then measures the
prior's denoising loss E_{t, eps} ||eps_hat(x_t, text, camera) - eps||^2 on both, with the same
(t, eps) draws. A prior that identifies yaw gives x_right a lower loss (a negative "right - turned"
gap); one that does not gives both the same loss, and score distillation pulls each view towards an
average over yaw: a 4-fold shape turns into its solid of revolution. A model with a camera critic
(classifier guidance, steindreamer/guidance/camera_critic.py) adds log p(camera | x_t, text) to its
log-density: the same draws give the critic's paired gap, log p on x_right minus on x_turned (> 0: it
identifies yaw).

    python scripts/bench_yaw.py --out benchmarks/yaw_builtin.json
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from steindreamer.cameras import make_cameras, view_prompt, view_suffixes
from steindreamer.fsio import atomic_write
from steindreamer.guidance.diffusion import DiffusionGuidance
from steindreamer.toy.world import TOY_CAMERA, TOY_RESOLUTION, caption, render_shape


@torch.no_grad()
def denoising_gap(guide: DiffusionGuidance, colour: str, shape: str, azimuths, elevation: float, draws: int,
                  seed: int) -> dict:
    n = len(azimuths)
    cams = make_cameras(torch.full((n,), elevation), torch.tensor(azimuths, dtype=torch.float32), torch.full((n,), 2.0),
                        torch.full((n,), 45.0))
    right = render_shape(shape, colour, cams, TOY_RESOLUTION, TOY_RESOLUTION, supersample=2)["rgb"]
    wrong = render_shape(shape, colour, cams, TOY_RESOLUTION, TOY_RESOLUTION, supersample=2, yaw=45.0)["rgb"]
    texts = [view_prompt(caption(colour, shape), v) for v in view_suffixes(cams, TOY_CAMERA)]
    emb = guide.text_embeddings(texts)
    camera = guide.camera_condition(cams)
    g = torch.Generator().manual_seed(seed)
    losses = {"right": [], "turned": []}
    critic = {"right": [], "turned": []}
    for _ in range(draws):
        t = guide.schedule.sample_t(n, 0.02, 0.98, g)
        noise = torch.randn(n, 3, TOY_RESOLUTION, TOY_RESOLUTION, generator=g)
        for name, img in (("right", right), ("turned", wrong)):
            x_t = guide.schedule.add_noise(guide.encode(img.permute(0, 3, 1, 2)), noise, t)
            eps = guide.unet_eps(x_t, t, emb, camera=camera)
            losses[name].append(((eps - noise) ** 2).mean(dim=(1, 2, 3)))
            if guide.camera_critic is not None:
                critic[name].append(guide.camera_critic.log_prob(x_t, t, emb, cams.azimuth))
    r, w = torch.stack(losses["right"]), torch.stack(losses["turned"])  # [draws, n]
    gap = (r - w).mean(1)  # paired over the same (t, eps) draws: one number per draw
    out = {"loss_right": float(r.mean()), "loss_turned": float(w.mean()), "gap": float(gap.mean()),
           "gap_se": float(gap.std() / np.sqrt(draws)), "relative_gap": float((r.mean() - w.mean()) / w.mean())}
    if critic["right"]:
        cgap = (torch.stack(critic["right"]) - torch.stack(critic["turned"])).mean(1)
        out.update(critic_logp_gap=float(cgap.mean()), critic_logp_gap_se=float(cgap.std() / np.sqrt(draws)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="builtin")
    ap.add_argument("--shapes", default="cube,pyramid,cylinder")
    ap.add_argument("--colour", default="red")
    ap.add_argument("--draws", type=int, default=64)
    ap.add_argument("--elevation", type=float, default=15.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/yaw_builtin.json")
    args = ap.parse_args()
    t0 = time.time()
    guide = DiffusionGuidance(args.model, torch.device("cpu"))
    azimuths = [float(a) for a in range(-180, 180, 15) if a % 90 != 45]  # 45-degree views are symmetric
    result = {"model": args.model, "camera_conditioned": guide.camera_kind is not None,
              "camera_critic": guide.camera_critic is not None, "elevation": args.elevation,
              "draws": args.draws, "azimuths": azimuths, "shapes": {}}
    for shape in args.shapes.split(","):
        result["shapes"][shape] = denoising_gap(guide, args.colour, shape, azimuths, args.elevation, args.draws, args.seed)
        s = result["shapes"][shape]
        print(f"{shape:9s} loss right {s['loss_right']:.5f} turned {s['loss_turned']:.5f} "
              f"gap {s['gap']:+.5f} +- {s['gap_se']:.5f} ({100 * s['relative_gap']:+.1f} %)"
              + (f"; critic log p gap {s['critic_logp_gap']:+.3f} +- {s['critic_logp_gap_se']:.3f}" if "critic_logp_gap" in s else ""),
              flush=True)
    result["seconds"] = round(time.time() - t0, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out, json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out} ({result['seconds']} s)")


if __name__ == "__main__":
    main()
