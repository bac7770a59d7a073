"""What the NeRF and mesh stages share, held in one explicit object: the prompt and its view
prompts, the frozen guidance model and the distillation estimator (with its state: mu sums, the VSD
LoRA), the run's random generator and the background model."""
from __future__ import annotations

import contextlib
from typing import Callable

import torch

from ..cameras import VIEWS, Cameras, sample_cameras, view_prompt, view_suffixes
from ..config import Config
from ..field.nerf import Background
from ..guidance.diffusion import DiffusionGuidance
from ..guidance.distill import Distiller
from ..guidance.reducers import draw_plan
from ..guidance.teacher_pool import teacher_pool
from ..render.shading import sample_mode
from ..sequence import VIEW_DIMS, points


class Context:
    def __init__(self, prompt: str, cfg: Config, guidance: DiffusionGuidance, show_progress: bool = True,
                 make_distiller: Callable[..., Distiller] = Distiller):
        """`make_distiller(cfg.guidance, guidance)` builds the estimator (scripts/truth_generate.py hands
        in one that learns from the world's true renders, the 3D benchmark's ceiling)."""
        self.prompt, self.cfg, self.guidance = prompt, cfg, guidance
        if cfg.train.deterministic:  # see TrainConfig.deterministic; warn_only: an op without such a path still runs
            torch.use_deterministic_algorithms(True, warn_only=True)
        self.device = guidance.device
        # One generator drives every random draw of training, so a run is deterministic under its
        # seed and continues identically after --resume.
        self.generator = torch.Generator().manual_seed(cfg.train.seed)
        # Module initialisers draw from torch's global RNG: they get a stream of their own, seeded
        # by the run, so building a run neither depends on nor changes the process' RNG state.
        self._init_rng = torch.Generator().manual_seed(cfg.train.seed).get_state()
        # The random shift of the run's view sequence (camera.sampling / guidance.noise.t_sampling =
        # sequence) and of its per-step shading draw: uniform per seed, from a stream of its own so
        # that the training stream is the same whatever the sampling.
        self.sequence_shift = torch.rand(len(VIEW_DIMS) + 1, generator=torch.Generator().manual_seed(cfg.train.seed + 0x5EED),
                                         dtype=torch.float64)
        with self.seeded_init():
            self.background = Background(cfg.background).to(self.device)
            self.distiller = make_distiller(cfg.guidance, guidance)
        self.uncond = guidance.text_embeddings([""])
        suffixes = VIEWS if cfg.guidance.view_dependent else ("",)
        self.prompts = {s: (view_prompt(prompt, s) if s else prompt) for s in suffixes}
        guidance.text_embeddings(list(self.prompts.values()))  # encode (or load) every view once
        if self.distiller.needs_pool:  # f-distill's teacher samples, drawn once per run (or cached)
            v, texts = cfg.guidance.vsd, list(self.prompts.values())
            pool = teacher_pool(guidance, texts, v.pool_per_view, v.pool_steps, cfg.guidance.guidance_scale, cfg.train.seed,
                                show_progress)
            self.distiller.attach_pool(pool, guidance.text_embeddings(texts))

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

    def view_uniforms(self, step: int, views: int, shift: torch.Tensor | None = None) -> torch.Tensor:
        """The uniforms [views, len(VIEW_DIMS)] of step `step`'s views: points step * views .. of the run's
        view sequence (steindreamer/sequence.py)."""
        shift = self.sequence_shift if shift is None else shift
        return points(step * views, views, shift[:len(VIEW_DIMS)])

    def step_uniform(self, step: int) -> float:
        """Step `step`'s uniform for its one per-step draw (the shading mode): R_1, the golden ratio."""
        return float(points(step, 1, self.sequence_shift[len(VIEW_DIMS):])[0, 0])

    def reshift(self) -> None:
        """A fresh random shift for the sequence, from the run's generator: meters draw independent
        replicates of a run of steps this way (scripts/bench_engines.py)."""
        self.sequence_shift = torch.rand(len(VIEW_DIMS) + 1, generator=self.generator, dtype=torch.float64)

    def sample_views(self, step: int, shading_step: int) -> tuple[Cameras, str]:
        """Step `step`'s training cameras (train.batch_size views, on the device) and shading mode, drawn
        as camera.sampling says: from the generator, or from the run's view sequence."""
        cfg, views = self.cfg, self.cfg.train.batch_size
        seq = cfg.camera.sampling == "sequence"
        cams = sample_cameras(cfg.camera, views, self.generator, self.view_uniforms(step, views) if seq else None)
        mode = sample_mode(cfg.shading, shading_step, self.generator, self.step_uniform(step) if seq else None)
        return cams.to(self.device), mode

    def draw_noise(self, x: torch.Tensor, t_min: float, t_max: float, step: int = 0,
                   independent: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(t, noise) for the views x: guidance.noise.draws per view, draw-major, with the configured
        reducers (guidance/reducers.py). `step` places the views in the run's sequence (t_sampling=
        sequence); `independent` takes their points from a fresh random shift instead (the training-
        time meter's extra draws, independent of the step's)."""
        n = self.cfg.guidance.noise
        lo, hi = self.guidance.schedule.t_bounds(t_min, t_max)
        base = None
        if n.t_sampling == "sequence":
            shift = torch.rand(len(VIEW_DIMS), generator=self.generator, dtype=torch.float64) if independent else None
            base = self.view_uniforms(step, x.shape[0], shift)[:, VIEW_DIMS.index("t")]
        t, noise = draw_plan(tuple(x.shape), lo, hi, n.draws, n.antithetic, n.t_sampling, self.generator, base)
        return t.to(self.guidance.schedule.device), noise.to(x.device, torch.float32)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "distiller": self.distiller.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.distiller.load_state_dict(state.get("distiller", {}))
