"""f-distill's teacher samples (p): for each view prompt, `per_view` samples of the frozen model with
classifier-free guidance, drawn once per run by deterministic DDIM from a stream seeded by the run
and the prompt, in the model's own space (latents for a latent model), and cached beside the text
embeddings (<cache>/teacher_pool). A damaged cache entry is drawn again, never used.

A camera-conditioned model samples with its "no camera" input: the view is in the prompt's suffix.
"""
from __future__ import annotations

import hashlib

import torch

from ..progress import StepProgress
from .cache import read_entry, write_entry


def _generator(text: str, seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(hashlib.sha256(text.encode()).hexdigest()[:8], 16) ^ seed)


def sample_teacher(guidance, text: str, n: int, steps: int, scale: float, seed: int, on_step=None) -> torch.Tensor:
    """n samples [n, C, S, S] for `text` (DDIM over `steps` evenly spaced timesteps, CFG `scale`);
    `on_step()` is called after each step (progress)."""
    channels, size = int(guidance.unet.config.in_channels), guidance.sample_size
    x = torch.randn(n, channels, size, size, generator=_generator(text, seed)).to(guidance.device)
    cond = guidance.text_embeddings([text] * n)
    uncond = guidance.text_embeddings([""])
    T = guidance.schedule.num_train_timesteps
    times = torch.linspace(T - 1, 0, steps).round().long().tolist()
    for i, t in enumerate(times):
        t_batch = torch.full((n,), t, dtype=torch.long, device=guidance.schedule.device)
        eps = guidance.predict_eps_cfg(x, t_batch, cond, uncond, scale)
        x = guidance.schedule.ddim_step(x.float(), eps.float(), t, times[i + 1] if i + 1 < len(times) else -1)
        if on_step is not None:
            on_step()
    return x.float().cpu()


def _key(guidance, text: str, n: int, steps: int, scale: float, seed: int) -> str:
    return guidance.cache_key(f"teacher-pool\0{text}\0{n}\0{steps}\0{scale:g}\0{seed}")


def teacher_pool(guidance, texts: list[str], per_view: int, steps: int, scale: float, seed: int,
                 show_progress: bool = True) -> dict[str, torch.Tensor]:
    """{text: samples [per_view, C, S, S]} for each view prompt, from the cache where it holds them."""
    folder = guidance.cache_dir.parent / "teacher_pool"
    shape = (per_view, int(guidance.unet.config.in_channels), guidance.sample_size, guidance.sample_size)
    pool, missing = {}, []
    for text in texts:
        cached = read_entry(folder / f"{_key(guidance, text, per_view, steps, scale, seed)}.safetensors", "samples", text,
                            lambda x: tuple(x.shape) == shape)
        if cached is None:
            missing.append(text)
        else:
            pool[text] = cached
    if missing:
        with StepProgress(len(missing) * steps, enabled=show_progress, label="teacher pool") as bar:
            done = [0]

            def tick() -> None:
                done[0] += 1
                bar.update(done[0])

            for text in missing:
                pool[text] = sample_teacher(guidance, text, per_view, steps, scale, seed, tick)
                write_entry(folder / f"{_key(guidance, text, per_view, steps, scale, seed)}.safetensors", "samples", pool[text], text)
    return pool
