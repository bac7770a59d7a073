"""Loads any Stable-Diffusion-family text-to-image model (diffusers folder layout: unet, text_encoder,
tokenizer, scheduler, optional vae) from a local folder, a hub id or the built-in model, and exposes
what distillation needs: cached text embeddings, image <-> model space, noising and one CFG call.

Where the files are is `locate.py`'s to find (offline first). A folder without `vae/` is a
pixel-space model: the UNet sees the image itself in [-1, 1].
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import UserError
from .cache import read_entry, write_entry
from .engines import cfg_combine
from .locate import locate_model, project_cache
from .schedule import NoiseSchedule


def quiet_hf_logging() -> None:
    """Library progress bars and advisory warnings would bury our own progress and one-line errors."""
    import diffusers
    import transformers

    for lib in (diffusers, transformers):
        lib.utils.logging.disable_progress_bar()
        lib.utils.logging.set_verbosity_error()


def pick_device(requested: str = "auto") -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"train.device={requested} but CUDA is not available")
    return torch.device(requested)


class DiffusionGuidance:
    """A frozen text-to-image diffusion model used as a score function."""

    def __init__(self, model: str, device: torch.device, half_precision: bool = True, cache_dir: str = ""):
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

        quiet_hf_logging()

        self.location = locate_model(model, "diffusion", cache_dir)
        self.is_builtin = model.strip() == "builtin"
        self.device = device
        self.dtype = torch.float16 if (device.type == "cuda" and half_precision) else torch.float32
        try:
            index = self._model_index()
            self.tokenizer = _load_tokenizer(self.location)
            self.text_encoder = _load_text_encoder(self.location, index).to(device, self.dtype).eval()
            self.unet = UNet2DConditionModel.from_pretrained(self.location, subfolder="unet", torch_dtype=self.dtype).to(device).eval()
            self.scheduler = DDPMScheduler.from_pretrained(self.location, subfolder="scheduler")
            self.vae = None
            if index.get("vae", [None])[0] is not None or (Path(self.location) / "vae").is_dir():
                self.vae = AutoencoderKL.from_pretrained(self.location, subfolder="vae", torch_dtype=self.dtype).to(device).eval()
        except UserError:
            raise
        except Exception as err:  # noqa: BLE001 - any load failure is the user's folder or id
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise UserError(f"cannot load diffusion model '{model}': {first}") from None
        self._setup(cache_dir)

    @classmethod
    def from_components(cls, unet, text_encoder, tokenizer, scheduler, vae=None, device=torch.device("cpu"),
                        dtype=torch.float32, name: str = "components", cache_dir: str = "") -> "DiffusionGuidance":
        """Wrap models built in memory (benchmarks with random SD-shaped weights: no download, no save)."""
        self = cls.__new__(cls)
        self.location, self.is_builtin, self.device, self.dtype = name, False, device, dtype
        self.tokenizer, self.scheduler = tokenizer, scheduler
        self.text_encoder = text_encoder.to(device, dtype).eval()
        self.unet = unet.to(device, dtype).eval()
        self.vae = vae.to(device, dtype).eval() if vae is not None else None
        self._setup(cache_dir)
        return self

    def _setup(self, cache_dir: str) -> None:
        device = self.device
        for module in (self.unet, self.text_encoder, self.vae):
            if module is not None:
                module.requires_grad_(False)
        # NHWC convolutions: the built-in UNet's CFG forward is ~12% faster on CPU (measured); on
        # CUDA it is diffusers' own advice for fp16 UNets. Weights only change layout, not values.
        for module in (self.unet, self.vae):
            if module is not None:
                module.to(memory_format=torch.channels_last)
        try:
            self.schedule = NoiseSchedule.from_scheduler(self.scheduler, device)  # all noise maths
        except ValueError as err:
            raise UserError(f"cannot use the diffusion model's scheduler ({self.location}): {err}") from None
        self.vae_scale = 2 ** (len(self.vae.config.block_out_channels) - 1) if self.vae is not None else 1
        self.sample_size = int(self.unet.config.sample_size)
        self.image_size = self.sample_size * self.vae_scale  # the resolution the model works at
        self.cache_dir = project_cache(cache_dir) / "text_emb"
        self._emb: dict[str, torch.Tensor] = {}
        self.camera_kind = self._camera_kind()
        self.camera_critic = self._camera_critic()

    def _card(self) -> dict:
        card = Path(self.location) / "steindreamer.json"
        return json.loads(card.read_text()) if card.is_file() else {}

    def _camera_kind(self) -> str | None:
        """How the model takes the camera, from its card (`steindreamer.json` "camera"): "c2w_flat16"
        (the flattened 4x4 camera-to-world pose, as class labels added to the timestep embedding, as
        MVDream does) or None for a text-only model."""
        kind = self._card().get("camera")
        if kind is None:
            return None
        if kind != "c2w_flat16" or getattr(self.unet, "class_embedding", None) is None:
            raise UserError(f"{self.location}: steindreamer.json names camera {kind!r}, which this UNet cannot take "
                            "(expected 'c2w_flat16' with a projection class embedding)")
        return kind

    def _camera_critic(self):
        """The model's camera critic (classifier guidance on the azimuth, `camera_critic.py`), from the
        folder its card names under "camera_critic"; None if it names none."""
        name = self._card().get("camera_critic")
        if not name:
            return None
        from .camera_critic import CameraCritic

        try:
            critic = CameraCritic.from_pretrained(Path(self.location) / name)
        except (OSError, ValueError, TypeError, RuntimeError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise UserError(f"{self.location}: cannot load its camera critic '{name}': {first}") from None
        return critic.to(self.device, memory_format=torch.channels_last)  # see camera_critic.guidance_term

    def camera_condition(self, cameras) -> torch.Tensor | None:
        """The model's camera input for each rendered view ([B, 16]), or None for a text-only model."""
        if self.camera_kind is None or cameras is None:
            return None
        return cameras.flat_pose().to(self.device, self.dtype)

    def _model_index(self) -> dict:
        path = Path(self.location) / "model_index.json"
        if path.exists():
            return json.loads(path.read_text())
        if Path(self.location).exists() and not (Path(self.location) / "unet").is_dir():
            raise UserError(f"not a diffusers text-to-image folder (no model_index.json or unet/): {self.location}")
        return {}

    # --- text -------------------------------------------------------------------------------------
    def cache_key(self, prompt: str) -> str:
        """A short name for `prompt` under this model (its location and, for a folder, its text encoder's files)."""
        ident = self.location
        weights = Path(self.location) / "text_encoder"
        if weights.is_dir():  # a local folder: its weights' sizes and times identify it
            ident += "".join(f"{p.name}{p.stat().st_size}{p.stat().st_mtime_ns}" for p in sorted(weights.iterdir()))
        return hashlib.sha256(f"{ident}\0{prompt}".encode()).hexdigest()[:32]

    def text_embeddings(self, prompts: list[str]) -> torch.Tensor:
        """[N, L, D] embeddings, computed once per prompt and cached in memory and on disk."""
        missing = [p for p in dict.fromkeys(prompts) if p not in self._emb]
        for prompt in missing:
            self._emb[prompt] = self._load_or_encode(prompt)
        return torch.stack([self._emb[p] for p in prompts]).to(self.device, self.dtype)

    def _load_or_encode(self, prompt: str) -> torch.Tensor:
        """From the cache where an entry can be trusted (the prompt's, [max_length, width]), else encoded."""
        path = self.cache_dir / f"{self.cache_key(prompt)}.safetensors"
        width = getattr(getattr(self.text_encoder, "config", None), "hidden_size", None)
        cached = read_entry(path, "emb", prompt, lambda e: e.dim() == 2 and e.shape[0] == self.tokenizer.model_max_length
                            and width in (None, e.shape[1]))
        if cached is not None:
            return cached
        tokens = self.tokenizer([prompt], padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True, return_tensors="pt")
        with torch.no_grad():
            emb = self.text_encoder(tokens.input_ids.to(self.device))[0][0].float().cpu().contiguous()
        write_entry(path, "emb", emb, prompt)
        return emb

    # --- images -----------------------------------------------------------------------------------
    def encode(self, rgb: torch.Tensor) -> torch.Tensor:
        """Rendered images [B, 3, H, W] in [0, 1] -> the model's input space (latents or [-1, 1] pixels),
        differentiably. Images are resized to the model's working resolution."""
        x = rgb.to(self.dtype)
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        x = x * 2.0 - 1.0
        if self.vae is None:
            return x
        # The posterior mean, not a sample: the encoder's noise only adds variance to G.
        return self.vae.encode(x).latent_dist.mean * self.vae.config.scaling_factor

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Model space -> images in [-1, 1] (identity for pixel models)."""
        if self.vae is None:
            return z
        return self.vae.decode(z / self.vae.config.scaling_factor).sample

    def unet_kwargs(self, camera: torch.Tensor | None, batch: int) -> dict:
        """Extra UNet inputs: a camera-conditioned model gets its camera (zeros, its "no camera", when
        the caller has none); a text-only model gets nothing."""
        if self.camera_kind is None:
            return {}
        if camera is None:
            camera = torch.zeros(batch, 16, device=self.device, dtype=self.dtype)
        return {"class_labels": camera.to(self.device, self.dtype)}

    def unet_eps(self, x_t: torch.Tensor, t: torch.Tensor, emb: torch.Tensor, camera: torch.Tensor | None = None,
                 **unet_kwargs) -> torch.Tensor:
        """One UNet call, converted to an epsilon prediction whatever the model predicts."""
        unet_kwargs.update(self.unet_kwargs(camera, x_t.shape[0]))
        x_in = x_t.to(self.dtype).contiguous(memory_format=torch.channels_last)
        out = self.unet(x_in, t, encoder_hidden_states=emb, **unet_kwargs).sample.float().contiguous()
        return self.schedule.eps_from_output(out, x_t, t)

    @torch.no_grad()
    def predict_eps_cfg(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor, scale: float,
                        camera: torch.Tensor | None = None) -> torch.Tensor:
        """CFG noise prediction with conditional and unconditional halves in one batched UNet call.
        The camera (if the model takes one) goes to both halves, so guidance amplifies the text only."""
        b = x_t.shape[0]
        camera = torch.cat([camera, camera]) if camera is not None else None
        eps = self.unet_eps(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([cond, uncond.expand(b, -1, -1)]), camera=camera)
        eps_c, eps_u = eps[:b], eps[b:]
        return cfg_combine(eps_u, eps_c, scale)


def _load_tokenizer(location: str):
    from transformers import AutoTokenizer, CLIPTokenizer

    try:
        return AutoTokenizer.from_pretrained(location, subfolder="tokenizer")
    except Exception:  # noqa: BLE001 - older folders only carry CLIP vocab/merges files
        return CLIPTokenizer.from_pretrained(location, subfolder="tokenizer")


def _load_text_encoder(location: str, index: dict):
    import transformers

    cls_name = (index.get("text_encoder") or ["transformers", "CLIPTextModel"])[1]
    cls = getattr(transformers, cls_name, None) or transformers.CLIPTextModel
    return cls.from_pretrained(location, subfolder="text_encoder")
