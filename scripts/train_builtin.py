"""Train the built-in toy models on renders of the toy world and ship them into steindreamer/builtin/.

Stages (all by default, each resumable from --work-dir):
  data   render a fixed pool of training views (32 colour-shape pairs, held-out pairs never rendered)
  unet   pixel-space text-to-image diffusion (UNet + tiny CLIP text encoder), EMA weights kept
  depth  tiny DPT depth estimator, scale-and-shift-invariant loss on disparity (MiDaS-style)
  checker train the evaluation's shape classifier on exact renders (steindreamer/builtin/checker/)
  export write the EMA UNet pipeline and the depth model into steindreamer/builtin/ (safetensors)
  critic  train the diffusion model's camera critic (classifier guidance on the azimuth) on the pool, with
          the exported model's text encoder, and name it in its card (after export: it reads that encoder)

The UNet objective is ε-MSE (--objective dsm, denoising score matching) or --objective lcss: score matching with
the Jacobian trace by Stein's identity over a Gaussian neighbourhood (LCSS, Osada et al. 2024; logs DSM's value - 1).

The shipped UNet was trained on one H100 (torch 2.11): a pool of 40,000 views rendered on the GPU in
14 s, then 5,854 steps at batch 256 in 6.0 min (16 steps/s: the small UNet is launch-bound), lr 6e-4 with
cosine decay to 5 %, EMA 0.999:

    PYTHONPATH=. python scripts/train_builtin.py --stages data,unet,export --device cuda --threads 8 \
        --pool 40000 --batch 256 --lr 6e-4 --ema 0.999 --unet-steps 100000 --max-minutes 6

Its samples follow the caption at CFG 1.5 (EVAL.json: shape right 99.6 % on training pairs, 100 % on
held-out pairs); at CFG >= 2.5 they lose the shape. The depth model and the shape checker come from
an earlier CPU run (2 cores, shared: depth 12,000 steps at batch 16, ~35 min; checker 5.5 min); a
UNet-only run (--stages data,unet,export) keeps them. On a CPU the UNet trains at ~0.7 s/step at
batch 16 (one quiet core); the previous CPU-trained UNet (3,056 steps, 70 min) reached 68 % shape.

    PYTHONPATH=. python scripts/train_builtin.py --work-dir /tmp/builtin_work
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # this folder's modules, however the script is loaded

from builtin_losses import lcss_eps_loss, lcss_loss, ssi_loss  # noqa: E402,F401 - lcss_loss: the tests' entry
from steindreamer.fsio import atomic_torch_save, atomic_write  # noqa: E402
from steindreamer.toy import model as M  # noqa: E402
from steindreamer.toy.vocab import build_tokenizer  # noqa: E402
from steindreamer.toy.world import HELD_OUT, TOY_CAMERA, TOY_RESOLUTION, TRAIN_PAIRS, caption, render_batch, sample_views, view_captions  # noqa: E402


def log(work: Path, msg: str) -> None:
    line = f"[{time.strftime('%H:%M:%S')}] {msg}"
    print(line, flush=True)
    with open(work / "train_log.txt", "a") as f:
        f.write(line + "\n")


# --------------------------------------------------------------------------------- data
def make_pool(work: Path, n: int, seed: int, device: str = "cpu", elevation: tuple[float, float] = TOY_CAMERA.elevation) -> dict:
    path = work / "pool.pt"
    if path.exists():
        return torch.load(path)
    g = torch.Generator().manual_seed(seed)
    rgb, disp, mask, pair_idx, captions, poses = [], [], [], [], [], []
    t0 = time.time()
    chunk = 1024 if str(device).startswith("cuda") else 64  # a GPU traces many views at once
    for start in range(0, n, chunk):
        b = min(chunk, n - start)
        idx = torch.randint(len(TRAIN_PAIRS), (b,), generator=g)
        pairs = [TRAIN_PAIRS[i] for i in idx.tolist()]
        cams = sample_views(b, g, overhead_fraction=0.15, elevation=elevation)  # the only "overhead view" captions
        r = render_batch(pairs, cams.to(device), TOY_RESOLUTION, TOY_RESOLUTION, supersample=2)
        rgb.append(r["rgb"].half().cpu())
        disp.append(r["disparity"][..., 0].half().cpu())
        mask.append(r["mask"][..., 0].cpu())
        pair_idx.append(idx)
        poses.append(cams.flat_pose().cpu())
        captions += view_captions(pairs, cams)
    pool = {"rgb": torch.cat(rgb), "disparity": torch.cat(disp), "mask": torch.cat(mask),
            "pair": torch.cat(pair_idx), "caption": captions, "pose": torch.cat(poses)}
    atomic_torch_save(path, pool)
    log(work, f"rendered a pool of {n} views in {time.time() - t0:.0f} s")
    return pool


def lr_factor(progress: float, warmup: float) -> float:
    """Linear warm-up, then cosine decay to 5 %."""
    if progress < warmup:
        return progress / warmup
    p = min(1.0, (progress - warmup) / (1 - warmup))
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * p))


# --------------------------------------------------------------------------------- UNet
def train_unet(args, work: Path, pool: dict) -> None:
    dev = torch.device(args.device)
    tok = build_tokenizer()
    unet, te = M.build_unet(camera=args.camera).to(dev), M.build_text_encoder(len(tok)).to(dev)
    if args.init_from:  # fine-tune: start from a shipped model (a new camera embedding starts at zero)
        M.load_weights(unet, te, args.init_from)
    sched = M.build_scheduler()
    ab = sched.alphas_cumprod.to(dev)
    params = list(unet.parameters()) + list(te.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    ema_unet, ema_te = copy.deepcopy(unet).eval(), copy.deepcopy(te).eval()
    step, elapsed = 0, 0.0
    ck = work / "unet_ckpt.pt"
    if ck.exists():
        s = torch.load(ck, map_location=dev)
        unet.load_state_dict(s["unet"]), te.load_state_dict(s["te"]), opt.load_state_dict(s["opt"])
        ema_unet.load_state_dict(s["ema_unet"]), ema_te.load_state_dict(s["ema_te"])
        step, elapsed = s["step"], s["elapsed"]
        if s.get("objective", "dsm") != args.objective:
            raise SystemExit(f"{ck} was trained with --objective {s.get('objective', 'dsm')}, not {args.objective}")
        torch.set_rng_state(s["rng"])
        log(work, f"unet: resumed at step {step}")
    gen = torch.Generator().manual_seed(args.seed + step)  # resumed runs stay seeded
    n = len(pool["caption"])
    captions = pool["caption"]
    images = pool["rgb"].to(dev)  # a few hundred MB at most: keep it next to the model
    if args.camera and "pose" not in pool:
        raise SystemExit("the pool has no camera poses: render it again (delete pool.pt)")
    poses = pool["pose"].to(dev) if args.camera else None
    # Tokenised once: with the text drawn per sample in Python, a GPU step waited on the CPU.
    tokenize = lambda texts: tok(texts, padding="max_length", max_length=tok.model_max_length, truncation=True,  # noqa: E731
                                 return_tensors="pt").input_ids.to(dev)
    ids_full, ids_bare, ids_empty = tokenize(captions), tokenize([c.split(",")[0] for c in captions]), tokenize([""])
    t_start, last_ck, saved_step = time.time() - elapsed, time.time(), step

    def save() -> int:
        atomic_torch_save(ck, {"unet": unet.state_dict(), "te": te.state_dict(), "opt": opt.state_dict(),
                               "ema_unet": ema_unet.state_dict(), "ema_te": ema_te.state_dict(), "step": step,
                               "elapsed": time.time() - t_start, "rng": torch.get_rng_state(), "objective": args.objective,
                               "lcss_sigma": args.lcss_sigma if args.objective == "lcss" else None})
        return step

    while step < args.unet_steps:
        elapsed = time.time() - t_start
        # Progress is by steps, or by wall-clock when --max-minutes would cut the run short, so the
        # learning rate has always decayed by the end.
        progress = step / args.unet_steps
        if args.max_minutes:
            progress = max(progress, elapsed / (60 * args.max_minutes))
            if progress >= 1:
                break
        for grp in opt.param_groups:
            grp["lr"] = args.lr * lr_factor(progress, args.warmup)
        idx = torch.randint(n, (args.batch,), generator=gen)
        x0 = images[idx.to(dev)].float().permute(0, 3, 1, 2) * 2 - 1
        # 10 % unconditional (for CFG), 20 % the bare caption, the rest with the view suffix.
        u = torch.rand(args.batch, generator=gen).to(dev)
        pick = idx.to(dev)
        ids = torch.where((u < 0.1)[:, None], ids_empty, torch.where((u < 0.3)[:, None], ids_bare[pick], ids_full[pick]))
        t = torch.randint(0, 1000, (args.batch,), generator=gen).to(dev)
        noise = torch.randn(x0.shape, generator=gen).to(dev)
        a = ab[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        kw = {}
        if poses is not None:  # the camera, dropped (zeros: "no camera") 10 % of the time, apart from the text
            keep = (torch.rand(args.batch, generator=gen) >= 0.1).to(dev, torch.float32)
            kw["class_labels"] = poses[pick] * keep[:, None]
        # Plain ε-MSE by default. Min-SNR-5 (weight min(SNR, 5)/SNR) was tried first: it starves the low
        # noise levels, and after 500 steps DDIM samples kept visible grain that DDPM sampling did not.
        snr = (a / (1 - a)).view(-1)
        w = torch.clamp(snr, max=5.0) / snr if args.loss_weighting == "minsnr" else torch.ones_like(snr)
        if args.objective == "dsm":
            pred = unet(xt, t, encoder_hidden_states=te(ids).last_hidden_state, **kw).sample
            loss = (w * ((pred - noise) ** 2).mean(dim=(1, 2, 3))).mean()
        else:  # LCSS on p_t, the distribution of xt; one UNet call on [xt; xt + σu]
            v = torch.randn(x0.shape, generator=gen).to(dev)  # drawn after every DSM draw
            hs, kw2 = te(ids).last_hidden_state, {k: torch.cat([c, c]) for k, c in kw.items()}
            t2, hs2 = torch.cat([t, t]), torch.cat([hs, hs])
            eps = lambda y: unet(y, t2, encoder_hidden_states=hs2, **kw2).sample  # noqa: E731
            loss = (w * lcss_eps_loss(eps, xt, v, (1 - a).sqrt(), args.lcss_sigma)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(list(ema_unet.parameters()) + list(ema_te.parameters()), params, 1 - decay)
        if step % 25 == 0 or step == 1:
            log(work, f"unet step {step} loss {loss.item():.4f} lr {opt.param_groups[0]['lr']:.2e} "
                      f"{(time.time() - t_start) / 60:.1f} min")
        final = step >= args.unet_steps
        if final or time.time() - last_ck > 60 * args.ckpt_minutes:
            saved_step, last_ck = save(), time.time()
        if step % args.sample_every == 0 or final:
            sample_grid(ema_unet, ema_te, tok, work / f"samples_{step:05d}.png")
    if saved_step != step:  # stopped by --max-minutes between checkpoints
        save()
    log(work, f"unet: done, {step} steps, {(time.time() - t_start) / 60:.1f} min")


GRID_PAIRS = [("red", "cube"), ("blue", "sphere"), ("orange", "cylinder"), ("purple", "torus"), ("green", "pyramid"),
              ("yellow", "cone"), *HELD_OUT]


@torch.no_grad()
def sample_grid(unet, te, tok, path: Path, per: int = 2) -> None:
    import imageio.v3 as iio

    pipe = M.build_pipeline(copy.deepcopy(unet).cpu(), copy.deepcopy(te).cpu(), tok, M.build_scheduler())
    pipe.set_progress_bar_config(disable=True)
    views = ["front view", "back view"]
    prompts = [f"{caption(c, s)}, {views[k]}" for c, s in GRID_PAIRS for k in range(per)]
    img = M.sample_images(pipe, prompts, steps=25, guidance=1.5, seed=0, cameras=M.view_cameras(prompts))
    h = img.shape[1]
    grid = img.reshape(len(GRID_PAIRS), per, h, h, 3).permute(0, 2, 1, 3, 4).reshape(len(GRID_PAIRS) * h, per * h, 3)
    iio.imwrite(path, (grid.numpy() * 255).round().astype(np.uint8))


# --------------------------------------------------------------------------------- depth
def train_depth(args, work: Path, pool: dict) -> None:
    dev = torch.device(args.device)
    model = M.build_depth_model().to(dev).train()
    # Train without the head's final ReLU (two ReLU-headed runs died: every output 0, no gradient). The
    # shipped model has it back; it only clips negatives, where the true disparity (≥ 0) cannot be.
    final_relu = model.head.head[5]
    model.head.head[5] = torch.nn.Identity()
    opt = torch.optim.AdamW(model.parameters(), lr=args.depth_lr, weight_decay=0.01)
    step, ck = 0, work / "depth_ckpt.pt"
    if ck.exists():
        s = torch.load(ck, map_location=dev)
        model.load_state_dict(s["model"]), opt.load_state_dict(s["opt"])
        step = s["step"]
        log(work, f"depth: resumed at step {step}")
    gen = torch.Generator().manual_seed(args.seed + 1000 + step)
    n, t0, last = len(pool["caption"]), time.time(), time.time()
    while step < args.depth_steps:
        for grp in opt.param_groups:
            grp["lr"] = args.depth_lr * lr_factor(step / args.depth_steps, 0.05)
        idx = torch.randint(n, (args.batch,), generator=gen)
        rgb = pool["rgb"][idx].float().to(dev)
        disp = pool["disparity"][idx].float().to(dev)
        fg = pool["mask"][idx].float().to(dev)
        pred = M.predict_disparity(model, rgb)
        everywhere = torch.ones_like(fg)
        # SSI over the whole image (object vs empty background, disparity 0) plus SSI on the object alone
        # (its relief), plus an absolute term so raw outputs stay in disparity units (and alive).
        loss = ssi_loss(pred, disp, everywhere) + ssi_loss(pred, disp, fg) + 0.5 * (pred - disp).abs().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 50 == 0:
            log(work, f"depth step {step} loss {loss.item():.4f} pred object/background "
                      f"{pred[fg > 0].mean().item():.3f}/{pred[fg == 0].mean().item():.3f} {(time.time() - t0) / 60:.1f} min")
        if step == args.depth_steps or time.time() - last > 60 * args.ckpt_minutes:
            atomic_torch_save(ck, {"model": model.state_dict(), "opt": opt.state_dict(), "step": step})
            last = time.time()
    model.head.head[5] = final_relu
    log(work, f"depth: done, {step} steps, {(time.time() - t0) / 60:.1f} min this run")


# --------------------------------------------------------------------------------- camera critic
def train_critic(args, work: Path, pool: dict) -> None:
    """steindreamer/guidance/camera_critic.py's critic on the pool's views (30 % as flat-colour renders,
    what the NeRF's albedo steps look like), each with its caption's text embedding (a quarter without
    the view words), azimuths from the poses."""
    from transformers import CLIPTextModel

    from steindreamer.guidance.camera_critic import CameraCritic, CameraCriticConfig, train_camera_critic
    from steindreamer.toy.world import PALETTE

    folder = Path(args.out_dir) / "diffusion"
    tok = build_tokenizer()
    te = CLIPTextModel.from_pretrained(str(folder), subfolder="text_encoder").eval()
    captions = pool["caption"]
    texts = sorted(set(captions) | {c.split(",")[0] for c in captions})
    with torch.no_grad():
        emb = te(tok(texts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                     return_tensors="pt").input_ids).last_hidden_state
    where = {c: i for i, c in enumerate(texts)}
    full = torch.tensor([where[c] for c in captions])
    bare = torch.tensor([where[c.split(",")[0]] for c in captions])
    position = pool["pose"][:, [3, 7, 11]]  # c2w[:3, 3], row-major
    azimuth = torch.rad2deg(torch.atan2(position[:, 0], position[:, 2]))  # steindreamer.cameras' convention
    albedo = torch.tensor([PALETTE[TRAIN_PAIRS[i][0]] for i in pool["pair"].tolist()])

    def batches(gen: torch.Generator):
        idx = torch.randint(len(captions), (args.critic_batch,), generator=gen)
        m = pool["mask"][idx].float()[..., None]
        flat = (torch.rand(len(idx), generator=gen) < 0.3)[:, None, None, None]
        img = torch.where(flat, m * albedo[idx][:, None, None] + (1 - m), pool["rgb"][idx].float())
        text = emb[torch.where(torch.rand(len(idx), generator=gen) < 0.25, bare[idx], full[idx])]
        return img.permute(0, 3, 1, 2) * 2 - 1, azimuth[idx], text

    t0 = time.time()
    critic = CameraCritic(CameraCriticConfig(in_channels=3, text_dim=emb.shape[-1]))
    losses = train_camera_critic(critic, batches, M.build_scheduler().alphas_cumprod, args.critic_steps, seed=args.seed,
                                 log=lambda m: log(work, m))
    critic.eval().save_pretrained(folder / "camera_critic")
    card_path = folder / "steindreamer.json"
    card = json.loads(card_path.read_text())
    card["camera_critic"] = "camera_critic"
    atomic_write(card_path, json.dumps(card, indent=2) + "\n")
    info_path = folder / "training.json"  # how the critic was made, beside how the UNet was
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    final_loss, minutes = float(np.mean(losses[-200:])), (time.time() - t0) / 60
    info["camera_critic"] = {"steps": args.critic_steps, "batch": args.critic_batch, "pool_views": len(captions),
                             "elevation": list(args.elevation), "final_loss": round(final_loss, 4),
                             "minutes": round(minutes, 1), "command": " ".join(sys.argv)}
    atomic_write(info_path, json.dumps(info, indent=2) + "\n")
    log(work, f"camera critic: {args.critic_steps} steps, final loss {final_loss:.3f}, {minutes:.1f} min -> {folder / 'camera_critic'}")


# --------------------------------------------------------------------------------- export
def export(args, work: Path) -> None:
    tok = build_tokenizer()
    s = torch.load(work / "unet_ckpt.pt", map_location="cpu")
    unet, te = M.build_unet(camera=args.camera), M.build_text_encoder(len(tok))
    unet.load_state_dict(s["ema_unet"]), te.load_state_dict(s["ema_te"])  # ship the EMA weights
    out = Path(args.out_dir)
    M.save_pipeline(M.build_pipeline(unet.eval(), te.eval(), tok, M.build_scheduler()), out / "diffusion", camera=args.camera)
    if (work / "depth_ckpt.pt").exists():  # a UNet-only run (--stages data,unet,export) keeps the shipped depth model
        d = M.build_depth_model()
        d.load_state_dict(torch.load(work / "depth_ckpt.pt", map_location="cpu")["model"])
        d.eval().save_pretrained(str(out / "depth"), safe_serialization=True)
        M.build_depth_processor().save_pretrained(str(out / "depth"))
    info = {"unet_steps": s["step"], "unet_minutes": round(s["elapsed"] / 60, 1), "objective": s.get("objective", "dsm"),
            "lcss_sigma": s.get("lcss_sigma"), "camera": args.camera,
            "init_from": args.init_from or None, "elevation": list(args.elevation), "command": " ".join(sys.argv),
            "train_pairs": len(TRAIN_PAIRS), "held_out": [list(p) for p in HELD_OUT]}
    (out / "diffusion" / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 2**20
    log(work, f"exported to {out} ({size:.1f} MB): {info}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work-dir", default="/tmp/steindreamer_builtin")
    ap.add_argument("--out-dir", default=str(M.BUILTIN_DIR))
    ap.add_argument("--stages", default="data,unet,depth,checker,export,critic")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="1 is fastest while other jobs share 2 cores")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pool", type=int, default=8000, help="number of pre-rendered training views")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--unet-steps", type=int, default=4800)
    ap.add_argument("--max-minutes", type=float, default=0.0, help="wall-clock budget of the UNet stage (0: none)")
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--warmup", type=float, default=0.05, help="fraction of the run")
    ap.add_argument("--ema", type=float, default=0.995)
    ap.add_argument("--camera", action="store_true",
                    help="condition the UNet on the camera (flattened 4x4 pose, added to the timestep embedding)")
    ap.add_argument("--init-from", default="", help="start the UNet and text encoder from this model folder")
    ap.add_argument("--elevation", type=lambda v: tuple(float(x) for x in v.split(",")), default=TOY_CAMERA.elevation,
                    help="elevation range of the pool's views, degrees, 'lo,hi' (plus 15 %% overhead views)")
    ap.add_argument("--loss-weighting", choices=["uniform", "minsnr"], default="uniform")
    ap.add_argument("--objective", choices=["dsm", "lcss"], default="dsm",
                    help="UNet objective: dsm (ε-MSE) or lcss (score matching, Jacobian trace by Stein's identity)")
    ap.add_argument("--lcss-sigma", type=float, default=0.1, help="LCSS neighbourhood radius, a fraction of the noise level σ_t")
    ap.add_argument("--critic-steps", type=int, default=8000)
    ap.add_argument("--critic-batch", type=int, default=64)
    ap.add_argument("--depth-steps", type=int, default=5000)
    ap.add_argument("--depth-lr", type=float, default=1e-3)
    ap.add_argument("--ckpt-minutes", type=float, default=3.0)
    ap.add_argument("--sample-every", type=int, default=500)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(args.seed), random.seed(args.seed), np.random.seed(args.seed)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    stages = args.stages.split(",")
    log(work, f"stages {stages} args {vars(args)}")
    pool = make_pool(work, args.pool, args.seed, args.device, args.elevation) if {"data", "unet", "depth", "critic"} & set(stages) else None
    if "unet" in stages:
        train_unet(args, work, pool)
    if "depth" in stages:
        train_depth(args, work, pool)
    if "checker" in stages:
        from steindreamer.toy import checker

        t0 = time.time()
        net = checker.train_shape_classifier(seed=args.seed, log=lambda m: log(work, m))
        checker.save_shape_classifier(net, Path(args.out_dir) / "checker" / "shape_classifier.safetensors")
        log(work, f"shape classifier: accuracy on fresh renders {checker.shape_accuracy(net):.3f}, "
                  f"{(time.time() - t0) / 60:.1f} min")
    if "export" in stages:
        export(args, work)
    if "critic" in stages:
        train_critic(args, work, pool)


if __name__ == "__main__":
    main()
