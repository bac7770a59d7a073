"""Tiny random Stable Diffusion pipelines built from configs, saved with save_pretrained, for tests
(no downloads). One latent-space (tiny VAE, factor 2) and one pixel-space (no vae/)."""
from __future__ import annotations

import string
from pathlib import Path

import torch


def tiny_tokenizer(max_length: int = 32):
    from transformers import CLIPTokenizer

    # Character-level BPE vocabulary (no merges): every ASCII prompt tokenizes, offline.
    # transformers 5 silently ignores vocab_file=/merges_file= here (a 3-token vocabulary, every
    # prompt maps to end-of-text); vocab=/merges= work.
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in string.ascii_lowercase + string.digits + ",.-'":
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    tok = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)
    return tok, len(vocab)


def build_tiny_pipeline(folder: Path, latent: bool = True, prediction_type: str = "epsilon", seed: int = 0, camera: bool = False) -> Path:
    """camera=True: the UNet takes the flattened 4x4 pose as class labels (a random, non-zero camera
    MLP) and the folder's steindreamer.json says so, as the built-in camera-conditioned model's does."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    tokenizer, vocab_size = tiny_tokenizer()
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=37, num_attention_heads=4,
                                                num_hidden_layers=2, max_position_embeddings=32, bos_token_id=0, eos_token_id=1, pad_token_id=1))
    channels = 4 if latent else 3
    unet = UNet2DConditionModel(sample_size=16, in_channels=channels, out_channels=channels, block_out_channels=(32, 64), layers_per_block=1,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                                cross_attention_dim=32, norm_num_groups=8, attention_head_dim=8,
                                **({"class_embed_type": "projection", "projection_class_embeddings_input_dim": 16} if camera else {}))
    vae = None
    if latent:
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32), norm_num_groups=8,
                            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, sample_size=32)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              steps_offset=1, clip_sample=False, prediction_type=prediction_type)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder)
    if camera:
        import json

        (Path(folder) / "steindreamer.json").write_text(json.dumps({"camera": "c2w_flat16"}))
    return Path(folder)


def build_tiny_depth(folder: Path, seed: int = 0) -> Path:
    """A tiny random DPT depth estimator (DPT needs 4 distinct backbone_out_indices, hence 4 layers)."""
    from transformers import DPTConfig, DPTForDepthEstimation, DPTImageProcessor

    torch.manual_seed(seed)
    config = DPTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=37,
                       neck_hidden_sizes=[16, 32, 32, 64], reassemble_factors=[4, 2, 1, 0.5], fusion_hidden_size=32,
                       backbone_out_indices=[0, 1, 2, 3], is_hybrid=False, head_in_index=-1)
    DPTForDepthEstimation(config).save_pretrained(folder)
    DPTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(folder)
    return Path(folder)
