"""Score the shipped built-in models against the toy world's ground truth; JSON to --out.

Diffusion: for every caption (the 32 training pairs and the 4 held-out pairs) sample N images
through the stock diffusers pipeline (DDIM with eta 1, CFG), each with a view suffix cycling front/side/back,
and check the foreground colour (palette vote) and the shape (classifier trained on exact renders).
Depth: AbsRel and Pearson r of the depth estimator on fresh renders (a seed the training never
used), after least-squares scale-shift alignment on the object.

    PYTHONPATH=. python scripts/eval_builtin.py --n 8 --out /tmp/eval_builtin.json
"""
from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict

import torch

from steindreamer.toy import checker
from steindreamer.toy import model as M
from steindreamer.toy.world import COLOURS, HELD_OUT, SHAPES, TOY_RESOLUTION, TRAIN_PAIRS, caption, render_batch, sample_views


def eval_diffusion(args) -> dict:
    pipe = M.load_pipeline(args.diffusion)
    net = checker.load_shape_classifier()
    views = ["front view", "side view", "back view"]
    per_pair, totals = {}, defaultdict(lambda: defaultdict(float))
    for split, pairs in (("train", TRAIN_PAIRS), ("held_out", HELD_OUT)):
        for c, s in pairs:
            prompts = [f"{caption(c, s)}, {views[k % len(views)]}" for k in range(args.n)]
            rgb = M.sample_images(pipe, prompts, steps=args.steps, guidance=args.cfg, seed=args.seed, eta=args.eta)
            stats = [checker.image_stats(im) for im in rgb]
            shapes = checker.classify_shapes(net, rgb)
            colour_ok = sum(st["colour"] == c for st in stats) / args.n
            shape_ok = sum(p == s for p in shapes) / args.n
            per_pair[caption(c, s)] = {"split": split, "colour_right": colour_ok, "shape_right": shape_ok,
                                       "shapes_seen": shapes, "colours_seen": [st["colour"] for st in stats]}
            t = totals[split]
            t["colour"] += colour_ok / len(pairs)
            t["shape"] += shape_ok / len(pairs)
            bg = [st["bg_whiteness_error"] for st in stats if st["bg_whiteness_error"] == st["bg_whiteness_error"]]
            t["bg_err"] += (sum(bg) / len(bg) if bg else 1.0) / len(pairs)  # no background at all counts as 1
            t["fg"] += sum(st["fg_fraction"] for st in stats) / args.n / len(pairs)
            print(f"{split:8s} {caption(c, s):20s} colour {colour_ok:.2f} shape {shape_ok:.2f} {shapes}", flush=True)
    summary = {split: {"colour_right_pct": round(100 * t["colour"], 1), "shape_right_pct": round(100 * t["shape"], 1),
                       "background_mean_distance_from_white": round(t["bg_err"], 4),
                       "foreground_fraction": round(t["fg"], 3)} for split, t in totals.items()}
    return {"summary": summary, "per_caption": per_pair}


@torch.no_grad()
def eval_depth(args) -> dict:
    model = M.load_depth(args.depth)
    g = torch.Generator().manual_seed(args.seed + 777)
    preds, truths, masks = [], [], []
    for _ in range(args.depth_batches):
        idx = torch.randint(len(COLOURS) * len(SHAPES), (32,), generator=g)
        pairs = [(COLOURS[i % len(COLOURS)], SHAPES[i // len(COLOURS)]) for i in idx.tolist()]
        r = render_batch(pairs, sample_views(32, g), TOY_RESOLUTION, TOY_RESOLUTION, supersample=2)
        preds.append(M.predict_disparity(model, r["rgb"]))
        truths.append(r["disparity"][..., 0])
        masks.append(r["mask"][..., 0])
    pred, true, mask = torch.cat(preds), torch.cat(truths), torch.cat(masks)
    out = checker.depth_metrics(pred, true, mask)
    # Baseline: a constant prediction (after alignment: the mean disparity) says how much the
    # estimator adds beyond "the object is at about this distance".
    out["absrel_constant_baseline"] = checker.depth_metrics(torch.rand_like(pred) * 1e-6 + 1, true, mask)["absrel"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--diffusion", default=str(M.DIFFUSION_DIR))
    ap.add_argument("--depth", default=str(M.DEPTH_DIR))
    ap.add_argument("--n", type=int, default=8, help="samples per caption")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--cfg", type=float, default=1.5)
    ap.add_argument("--eta", type=float, default=1.0, help="DDIM eta (1: stochastic, DDPM-like; 0 leaves grain)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--depth-batches", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--skip", choices=["diffusion", "depth"], default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()
    res = {"settings": {k: v for k, v in vars(args).items() if k not in ("out",)}}
    if args.skip != "depth":
        res["depth"] = eval_depth(args)
        print("depth", res["depth"], flush=True)
    if args.skip != "diffusion":
        res["diffusion"] = eval_diffusion(args)
        print(json.dumps(res["diffusion"]["summary"], indent=2))
    res["checker_shape_accuracy_on_renders"] = checker.shape_accuracy(checker.load_shape_classifier())
    res["seconds"] = round(time.time() - t0, 1)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=2)
    print(json.dumps({k: v for k, v in res.items() if k != "diffusion"}, indent=2))


if __name__ == "__main__":
    main()
