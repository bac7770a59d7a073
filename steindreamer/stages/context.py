"""What the NeRF and mesh stages share, held in one explicit object: the prompt and its view
prompts, the frozen guidance model and the distillation estimator (with its state: mu sums, the VSD
LoRA), the run's random generator and the background model."""
from __future__ import annotations

import contextlib

import torch

from ..cameras import VIEWS, view_prompt, view_suffixes
from ..config import Config
from ..field.nerf import Background
from ..guidance.diffusion import DiffusionGuidance
from ..guidance.distill import Distiller


class Context:
    def __init__(self, prompt: str, cfg: Config, guidance: DiffusionGuidance):
        self.prompt, self.cfg, self.guidance = prompt, cfg, guidance
        self.device = guidance.device
        # One generator drives every random draw of training, so a run is deterministic under its
        # seed and continues identically after --resume.
        self.generator = torch.Generator().manual_seed(cfg.train.seed)
        # Module initialisers draw from torch's global RNG: they get a stream of their own, seeded
        # by the run, so building a run neither depends on nor changes the process' RNG state.
        self._init_rng = torch.Generator().manual_seed(cfg.train.seed).get_state()
        with self.seeded_init():
            self.background = Background(cfg.background).to(self.device)
            self.distiller = Distiller(cfg.guidance, guidance)
        self.uncond = guidance.text_embeddings([""])
        suffixes = VIEWS if cfg.guidance.view_dependent else ("",)
        self.prompts = {s: (view_prompt(prompt, s) if s else prompt) for s in suffixes}
        guidance.text_embeddings(list(self.prompts.values()))  # encode (or load) every view once

    @contextlib.contextmanager
    def seeded_init(self):
        """Run module initialisation on the run's own init stream (torch's global RNG is restored)."""
        with torch.random.fork_rng(devices=[]):
            torch.set_rng_state(self._init_rng)
            yield
            self._init_rng = torch.get_rng_state()

    def text_for(self, cameras) -> torch.Tensor:
        """Text embeddings for each camera: the prompt with its view suffix (front, side, ...)."""
        if not self.cfg.guidance.view_dependent:
            return self.guidance.text_embeddings([self.prompt] * len(cameras))
        return self.guidance.text_embeddings([self.prompts[s] for s in view_suffixes(cameras, self.cfg.camera)])

    def draw_noise(self, x: torch.Tensor, t_min: float, t_max: float) -> tuple[torch.Tensor, torch.Tensor]:
        t = self.guidance.schedule.sample_t(x.shape[0], t_min, t_max, self.generator)
        noise = torch.randn(x.shape, generator=self.generator).to(x.device, torch.float32)
        return t, noise

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "distiller": self.distiller.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.distiller.load_state_dict(state.get("distiller", {}))
