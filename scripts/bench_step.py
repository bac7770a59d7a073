#!/usr/bin/env python
"""Step-time benchmark of the distillation engines (JSON out), per engine and stage, in one process.

    python scripts/bench_step.py --model builtin --out benchmarks/step_cpu.json          # CPU, built-in model
    python scripts/bench_step.py --model sd-shaped --out benchmarks/step_gpu.json        # GPU, SD-2.1-base shapes

`sd-shaped` builds a UNet, VAE and text encoder with Stable Diffusion 2.1-base's configs and random
weights (no download): 64x64 latents from a 512x512 render. For each engine the JSON holds the
median step time, the median UNet CFG forward (the floor a step cannot go under), their ratio and a
breakdown: render forward, encode (VAE), the whole guidance call, its parts measured alone (UNet
CFG, decode + depth forward/backward for SSD, LoRA step for VSD), 3D backward and optimizer step.
Per engine the top-level numbers are the NeRF stage's; `mesh_stage` holds the same for the mesh
stage (surface extracted from the NeRF, rasterised at mesh.resolution), unless --stages nerf.
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from steindreamer.backends import volume_backend  # noqa: E402
from steindreamer.config import load_config  # noqa: E402
from steindreamer.fsio import atomic_write  # noqa: E402
from steindreamer.guidance.diffusion import DiffusionGuidance  # noqa: E402
from steindreamer.guidance.engines import injected_loss  # noqa: E402
from steindreamer.stages import Context, MeshStage, NeRFStage, Stage  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


class Clock:
    def __init__(self, device):
        self.device, self.times = device, {}

    def __call__(self, key):
        clock = self

        class _T:
            def __enter__(self):
                sync(clock.device)
                self.t = time.perf_counter()

            def __exit__(self, *exc):
                sync(clock.device)
                clock.times.setdefault(key, []).append(time.perf_counter() - self.t)

        return _T()

    def medians(self, skip: int) -> dict:
        return {k: statistics.median(v[skip:] or v) for k, v in self.times.items()}


def fresh_clock(device) -> Clock:
    """A Clock, with CUDA's peak-memory counter reset so `peak_mib` covers what follows."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    return Clock(device)


def peak_mib(device) -> float:
    """Peak memory: CUDA's allocator peak, or on CPU the process's max resident set."""
    return torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timings(clock: Clock, warmup: int) -> dict:
    """Median step, median UNet CFG forward, their ratio and the other parts' medians; also the
    median of each step's own ratio to the UNet CFG forward timed right after it (the machine's
    speed drifts over a run: a pair measured back to back shares its state)."""
    med = clock.medians(warmup)
    pairs = [s / u for s, u in zip(clock.times["step"][warmup:], clock.times["unet_cfg"][warmup:])]
    return {"step_seconds": med["step"], "unet_cfg_seconds": med["unet_cfg"], "step_over_unet": med["step"] / med["unet_cfg"],
            "step_over_unet_paired": statistics.median(pairs) if pairs else None,
            "breakdown": {k: v for k, v in med.items() if k != "step"}}


def step_time_ratios(e: dict) -> dict:
    """SSD's step time over SDS's and VSD's (the engines present), per engine's `timings`."""
    out = {}
    for other in ("sds", "vsd"):
        if "ssd" in e and other in e:
            out[f"step_time_ratio_ssd_{other}"] = e["ssd"]["step_seconds"] / e[other]["step_seconds"]
            # The same ratio with each engine's steps measured in its own UNet calls (paired medians):
            # the engines run one after another and the machine's speed drifts between them.
            out[f"step_time_ratio_ssd_{other}_paired"] = e["ssd"]["step_over_unet_paired"] / e[other]["step_over_unet_paired"]
    return out


def sd_shaped_guidance(device, dtype):
    """Stable Diffusion 2.1-base shapes with random weights (configs only; nothing downloaded)."""
    import string

    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    unet = UNet2DConditionModel(sample_size=64, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280),
                                layers_per_block=2, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True,
                                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",), up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=2, sample_size=512)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in string.ascii_lowercase + ",":
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_attention_heads=16,
                                        num_hidden_layers=23, max_position_embeddings=77, hidden_act="gelu", projection_dim=512,
                                        bos_token_id=0, eos_token_id=1, pad_token_id=1))
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000, clip_sample=False)
    return DiffusionGuidance.from_components(unet, text, tokenizer, scheduler, vae, device, dtype, name="sd-shaped")


def timed_step(stage: Stage, clock: Clock) -> tuple:
    """One step of `stage` as Stage.step takes it, loss terms included, each part timed on `clock`."""
    ctx = stage.ctx
    with clock("step"):
        with clock("render"):
            out, cams = stage.render_train()
        with clock("encode"):
            x = ctx.guidance.encode(out["rgb"].permute(0, 3, 1, 2))
        cond = ctx.text_for(cams)
        t, noise = ctx.draw_noise(x, *stage.t_range())
        with clock("guidance"):
            grad, _ = ctx.distiller.gradient(x, out, cams, cond, ctx.uncond, t, noise, generator=ctx.generator)
        with clock("backward"):
            (injected_loss(x.float(), grad) + stage.regularizers(out, cams)).backward()
        with clock("optimizer"):
            stage.optimizer.step()
            stage.optimizer.zero_grad(set_to_none=True)
        with clock("after_update"):  # the NeRF's occupancy grid, every update_every steps
            stage.after_update()
        stage.step_index += 1
    return out, cams, x, cond, t, noise


def profile_steps(stage: NeRFStage, path: str, steps: int = 4) -> None:
    """torch.profiler's operator and kernel table over a few more steps (slowest first), to PATH."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if stage.device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            timed_step(stage, Clock(stage.device))
        sync(stage.device)
    key = "self_cuda_time_total" if stage.device.type == "cuda" else "self_cpu_time_total"
    atomic_write(path, f"{steps} NeRF-stage steps\n" + prof.key_averages().table(sort_by=key, row_limit=40, max_name_column_width=70))


def bench_engine(engine: str, args, device) -> dict:
    overrides = [f"engine={engine}", f"train.device={device}", "train.variance_every=0", "train.batch_size=1", *args.override]
    if args.model != "sd-shaped":  # the built-in model or any diffusers folder, with the toy preset's settings
        cfg = load_config("toy", None, overrides + [f"model={args.model}", f"depth_model={args.depth_model}"])
        guidance = DiffusionGuidance(args.model, device, True)
    else:
        cfg = load_config("steindreamer", None, [f"resolution={args.resolution}", "guidance.ssd.baseline=constant" if args.no_depth else "guidance.ssd.baseline=depth"] + overrides)
        guidance = sd_shaped_guidance(device, torch.float16 if device.type == "cuda" else torch.float32)
    if args.model == "sd-shaped" and engine == "ssd" and not args.no_depth:
        cfg.guidance.ssd.depth_model = args.depth_model
    stage = NeRFStage(Context(args.prompt, cfg, guidance))
    ctx = stage.ctx
    # Time steps past the albedo-only warm-up, so shaded steps (normals) come in the training mix, and
    # with the occupancy grid in the state a run has there (refreshed every update_every steps).
    stage.step_index = cfg.shading.albedo_steps
    if stage.field.occupancy is not None:
        stage.field.occupancy.update(stage.field.density, ctx.generator)
    modes = []
    clock = fresh_clock(device)
    for i in range(args.warmup + args.steps):
        out, cams, x, cond, t, noise = timed_step(stage, clock)
        modes.append("normal" in out)
        # The parts of the guidance call, each measured alone on the same inputs.
        with torch.no_grad():
            x_t = guidance.schedule.add_noise(x.detach().float(), noise, t)
            with clock("unet_cfg"):
                guidance.predict_eps_cfg(x_t, t, cond, ctx.uncond, cfg.guidance.guidance_scale)
        if engine == "ssd" and ctx.distiller.estimate is not None:
            with clock("decode_depth_fwd_bwd"):
                ctx.distiller._control_variate(x_t, noise, t, out, cams)
        if engine == "vsd":
            with clock("lora_step"):
                ctx.distiller.lora.train_step(x.detach(), cond, cams.flat_pose().to(device, guidance.dtype), guidance.schedule, ctx.generator)
    shaded = modes[args.warmup:]  # whether each timed step rendered normals (a shaded step)
    by_mode = {}
    for name, flag in (("shaded", True), ("albedo", False)):
        times = [t for t, m in zip(clock.times["step"][args.warmup:], shaded) if m == flag]
        if times:
            by_mode[name] = {"steps": len(times), "step_seconds": statistics.median(times)}
    enc = stage.field.encoding
    backends = {"hashgrid": "torch.compile" if enc.kernel == "torch" and cfg.field.grid.compile else enc.kernel,
                "volume": volume_backend(device, cfg.render.backend),
                "occupancy": "off" if stage.field.occupancy is None else ("cpu" if stage.field.occupancy.native and device.type == "cpu" else "torch")}
    result = {"stage": "nerf", **timings(clock, args.warmup), "by_shading": by_mode, "peak_memory_mib": peak_mib(device), "backends": backends,
              "render": f"{cfg.render.resolution}x{cfg.render.resolution}x{cfg.render.samples} samples", "model_resolution": guidance.image_size}
    if args.profile:
        profile_steps(stage, f"{args.profile}.{engine}.txt")
    if "mesh" in args.stages.split(","):
        result["mesh_stage"] = bench_mesh(stage, args, device)
    return result


def bench_mesh(nerf: NeRFStage, args, device) -> dict:
    """The mesh stage's step, timed in the same parts as MeshStage.step (from the NeRF as it is)."""
    stage = MeshStage(nerf.ctx, nerf.field)
    cfg, guidance = nerf.cfg, nerf.ctx.guidance
    clock = fresh_clock(device)
    for i in range(args.warmup + args.steps):
        out, cams, x, cond, t, noise = timed_step(stage, clock)
        with torch.no_grad():
            x_t = guidance.schedule.add_noise(x.detach().float(), noise, t)
            with clock("unet_cfg"):
                guidance.predict_eps_cfg(x_t, t, cond, nerf.ctx.uncond, cfg.guidance.guidance_scale)
    return {"stage": "mesh", **timings(clock, args.warmup), "peak_memory_mib": peak_mib(device), "faces": int(stage.mesh.faces.shape[0]),
            "render": f"{cfg.mesh.resolution}x{cfg.mesh.resolution} raster"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin", help="builtin, sd-shaped, or a diffusers folder")
    parser.add_argument("--engines", default="sds,ssd,vsd")
    parser.add_argument("--stages", default="nerf,mesh", help="nerf, or nerf,mesh (the mesh stage starts from the NeRF stage's field)")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--resolution", type=int, default=512, help="render size for sd-shaped")
    parser.add_argument("--depth-model", default="builtin", help="depth model for sd-shaped SSD (a folder; builtin by default)")
    parser.add_argument("--no-depth", action="store_true", help="SSD with the constant baseline (no depth network)")
    parser.add_argument("--prompt", default="a red cube")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--out")
    parser.add_argument("--profile", metavar="PREFIX", help="also write torch.profiler's table of a few more steps to PREFIX.<engine>.txt")
    parser.add_argument("override", nargs="*", help="config overrides, key=value (e.g. resolution=64 render.samples=64)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if (args.device == "auto" and torch.cuda.is_available()) else ("cpu" if args.device == "auto" else args.device))
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
              "model": args.model, "torch": torch.__version__, "engines": {}}
    for engine in args.engines.split(","):
        result["engines"][engine] = bench_engine(engine, args, device)
        print(engine, json.dumps(result["engines"][engine]), flush=True)
    result.update(step_time_ratios(result["engines"]))
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        atomic_write(args.out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
