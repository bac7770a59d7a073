"""The built-in models: their architectures, where they are shipped, how to load and run them.

Diffusion (`steindreamer/builtin/diffusion/`, Stable Diffusion folder layout, no vae/): a
pixel-space model. The UNet denoises RGB images directly at TOY_RESOLUTION × TOY_RESOLUTION,
scaled to [-1, 1] (x = 2 rgb - 1); there is no VAE, so `model_index.json` lists `vae` as null and
the stock pipeline loads with `vae=None`. The pipeline then believes in a VAE factor of 8: call it
with the default height/width (8 × 32) and `output_type="latent"`, and its "latents" are the
[-1, 1] images (`sample_images` does this). `steindreamer.json` in the folder records the space.

Depth (`steindreamer/builtin/depth/`): a tiny DPT (MiDaS-style relative inverse depth) that loads
with `AutoModelForDepthEstimation` / `AutoImageProcessor`; `predict_disparity` runs it on tensors.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from steindreamer.toy.vocab import ALIASES, MAX_LENGTH, VIEW_WORDS, WORDS
from steindreamer.toy.world import TOY_RESOLUTION

BUILTIN_DIR = Path(__file__).resolve().parent.parent / "builtin"
DIFFUSION_DIR = BUILTIN_DIR / "diffusion"
DEPTH_DIR = BUILTIN_DIR / "depth"
MODEL_CARD = {"space": "pixel", "resolution": TOY_RESOLUTION, "channels": 3, "scaling": "x = 2 * rgb - 1",
              "prediction_type": "epsilon", "vocabulary": list(WORDS), "view_words": list(VIEW_WORDS), "max_words": MAX_LENGTH - 2,
              "aliases": ALIASES, "ignored": [".", "!"]}


CAMERA_DIM = 16  # the camera condition: the flattened 4x4 camera-to-world pose (MVDream's form); zeros = none


def build_unet(camera: bool = False):
    """camera=True adds diffusers' "projection" class embedding: an MLP of the pose whose output is
    added to the timestep embedding (ProlificDreamer's camera MLP, MVDream's camera embedding)."""
    from diffusers import UNet2DConditionModel

    # Attention only at 8×8 (the last down block, the mid block, the first up block): self-attention
    # at 32×32 would cost ~10× more on a CPU.
    extra = {"class_embed_type": "projection", "projection_class_embeddings_input_dim": CAMERA_DIM} if camera else {}
    return UNet2DConditionModel(
        sample_size=TOY_RESOLUTION, in_channels=3, out_channels=3, layers_per_block=1,
        block_out_channels=(32, 64, 128), norm_num_groups=8, cross_attention_dim=64, attention_head_dim=4,
        down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"), **extra)


def load_weights(unet, text_encoder, folder: str | Path) -> None:
    """Fine-tuning start: a shipped model's UNet and text encoder weights. A camera embedding the
    folder lacks starts with its last layer at zero, so the model starts as exactly the shipped one."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    src = UNet2DConditionModel.from_pretrained(str(folder), subfolder="unet")
    missing, unexpected = unet.load_state_dict(src.state_dict(), strict=False)
    if unexpected or any(not k.startswith("class_embedding.") for k in missing):
        raise ValueError(f"{folder}: UNet weights do not fit (missing {missing}, unexpected {unexpected})")
    if missing:
        torch.nn.init.zeros_(unet.class_embedding.linear_2.weight)
        torch.nn.init.zeros_(unet.class_embedding.linear_2.bias)
    text_encoder.load_state_dict(CLIPTextModel.from_pretrained(str(folder), subfolder="text_encoder").state_dict())


def build_text_encoder(vocab_size: int):
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=MAX_LENGTH, projection_dim=64,
                         bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return CLIPTextModel(cfg)


def build_scheduler():
    from diffusers import DDIMScheduler

    # Cosine schedule (better than SD's scaled-linear at 32×32). "trailing" spacing starts sampling
    # at t = 999 (pure noise, as in training: a start with leftover signal tints flat backgrounds).
    # There the x0 estimate is noisy and must be held to [-1, 1]; the SD pipeline forces
    # clip_sample off, so use thresholding with sample_max_value 1, which is exactly that clamp.
    return DDIMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="epsilon",
                         clip_sample=False, thresholding=True, dynamic_thresholding_ratio=0.995, sample_max_value=1.0,
                         set_alpha_to_one=False, steps_offset=1, timestep_spacing="trailing")


def build_pipeline(unet, text_encoder, tokenizer, scheduler):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(vae=None, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   image_encoder=None, requires_safety_checker=False)


def load_pipeline(folder: str | Path = DIFFUSION_DIR, device: str | torch.device = "cpu"):
    """The shipped text-to-image model through the stock diffusers pipeline."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(folder), vae=None, safety_checker=None, feature_extractor=None,
                                                   image_encoder=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def save_pipeline(pipe, folder: str | Path, camera: bool = False) -> None:
    folder = Path(folder)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    card = {**MODEL_CARD, "camera": "c2w_flat16" if camera else None}
    (folder / "steindreamer.json").write_text(json.dumps(card, indent=2) + "\n")


def view_cameras(prompts: list[str]):
    """A typical camera for each prompt's view suffix (front 0°, side 90°, back 180° at 15° elevation;
    overhead 70°; none: front), for sampling a camera-conditioned model from text alone."""
    from steindreamer.cameras import make_cameras

    az = {"front": 0.0, "side": 90.0, "back": 180.0, "overhead": 0.0}
    words = [p.split(",")[1].split()[0] if "," in p else "front" for p in prompts]
    n = len(prompts)
    return make_cameras(torch.tensor([70.0 if w == "overhead" else 15.0 for w in words]), torch.tensor([az[w] for w in words]),
                        torch.full((n,), 2.0), torch.full((n,), 45.0))


@torch.no_grad()
def sample_images(pipe, prompts: list[str], steps: int = 30, guidance: float = 1.5, seed: int = 0,
                  eta: float = 1.0, cameras=None) -> torch.Tensor:
    """RGB samples [B, H, W, 3] in [0, 1] for `prompts` (DDIM with classifier-free guidance).

    eta = 1 (each step re-noised, like DDPM) by default: with the shipped, briefly trained model,
    deterministic DDIM (eta = 0) leaves visible grain and a grey background (measured: colour right
    30 % vs 95 % at 25 steps), while the stochastic steps wash those errors out."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    if getattr(pipe.unet, "class_embedding", None) is None:
        x = pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, output_type="latent", generator=g, eta=eta).images
    else:  # the stock pipeline has no camera input: the same DDIM loop, with the poses passed
        x = _sample_with_camera(pipe, prompts, cameras if cameras is not None else view_cameras(prompts), steps, guidance, g, eta)
    return ((x.float().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).cpu()


def _sample_with_camera(pipe, prompts, cameras, steps, guidance, g, eta):
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config(pipe.scheduler.config)
    sched.set_timesteps(steps)
    tok = pipe.tokenizer
    ids = tok(prompts + [""], padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids
    emb = pipe.text_encoder(ids.to(pipe.device))[0]
    n = len(prompts)
    cond = torch.cat([emb[:n], emb[n:].expand(n, -1, -1)])
    pose = cameras.flat_pose().to(pipe.device)
    pose = torch.cat([pose, pose])  # the camera goes to both halves: CFG amplifies the text only
    x = torch.randn(n, 3, TOY_RESOLUTION, TOY_RESOLUTION, generator=g).to(pipe.device)
    for t in sched.timesteps:
        out = pipe.unet(torch.cat([x, x]), t, encoder_hidden_states=cond, class_labels=pose).sample
        eps = out[n:] + guidance * (out[:n] - out[n:])
        x = sched.step(eps, t, x, eta=eta, generator=g).prev_sample
    return x


# ------------------------------------------------------------------------------------ depth
def build_depth_model():
    from transformers import DPTConfig, DPTForDepthEstimation

    # 4 encoder layers because DPT reassembles 4 distinct stages. Patch 8 (4×4 tokens at 32×32) keeps
    # the convolutional decoder at ≤ 64×64: patch 4 made it 128×128 and 4× slower on a CPU.
    cfg = DPTConfig(image_size=TOY_RESOLUTION, patch_size=8, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                    intermediate_size=128, is_hybrid=False, backbone_out_indices=[0, 1, 2, 3],
                    neck_hidden_sizes=[16, 32, 64, 64], reassemble_factors=[4, 2, 1, 0.5], fusion_hidden_size=32,
                    head_in_index=-1)
    model = DPTForDepthEstimation(cfg)
    # The head ends in a ReLU: start its output at a typical disparity (~0.5) so it cannot begin dead
    # (a first run collapsed to all-zero outputs).
    torch.nn.init.zeros_(model.head.head[4].weight)
    torch.nn.init.constant_(model.head.head[4].bias, 0.5)
    return model


def build_depth_processor():
    from transformers import DPTImageProcessor

    return DPTImageProcessor(do_resize=True, size={"height": TOY_RESOLUTION, "width": TOY_RESOLUTION},
                             keep_aspect_ratio=False, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
                             image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5], do_pad=False)


def load_depth(folder: str | Path = DEPTH_DIR, device: str | torch.device = "cpu"):
    from transformers import AutoModelForDepthEstimation

    return AutoModelForDepthEstimation.from_pretrained(str(folder)).to(device).eval()


def predict_disparity(model, rgb: torch.Tensor) -> torch.Tensor:
    """Relative disparity [B, H, W] for rgb [B, H, W, 3] in [0, 1] (differentiable; the processor's
    normalisation, done on tensors)."""
    x = rgb.permute(0, 3, 1, 2) * 2 - 1
    pred = model(pixel_values=x).predicted_depth  # [B, 2H, 2W]
    return torch.nn.functional.interpolate(pred[:, None], size=rgb.shape[1:3], mode="bilinear",
                                           align_corners=False)[:, 0]
