"""Ties one estimator (SDS, VSD or SSD from `engines`) to the models it needs for a training run.

`Distiller.gradient` takes the differentiable model-space image x (latent or pixels), the render it
came from and its cameras, draws t and noise, and returns the image-space gradient G plus a few
numbers to log. The estimators themselves stay pure functions in `engines`."""
from __future__ import annotations

import torch

from .config import GuidanceConfig
from .baselines import constant_baseline, depth_baseline, normal_baseline
from .camera_critic import guidance_term
from .diffusion import DiffusionGuidance
from .engines import control_variate, paper_term, sanitize, sds, vsd
from .reducers import average_draws, repeat_draws


class Distiller:
    def __init__(self, cfg: GuidanceConfig, guidance: DiffusionGuidance):
        self.cfg, self.guidance = cfg, guidance
        self.estimate = None
        self.mu = None
        self.lora = None
        if cfg.engine == "ssd":
            from .stein import LaggedJointMu, LaggedMu

            self.mu = LaggedJointMu(cfg.ssd.mu_decay) if cfg.ssd.keep_sds_cv else LaggedMu(cfg.ssd.mu_shape, cfg.ssd.mu_decay, cfg.ssd.mu_init)
            if cfg.ssd.baseline != "constant":
                from .depth import load_depth_estimator

                self.estimate = load_depth_estimator(cfg.ssd.depth_model, guidance.device, guidance.dtype, cfg.cache_dir)
        elif cfg.engine == "vsd":
            from .lora import VSDLora

            self.lora = VSDLora(guidance.unet, rank=cfg.vsd.lora_rank, lr=cfg.vsd.lora_lr, pose_dropout=cfg.vsd.pose_drop_p)
        self.ratio = self.f_weight = None
        self._pool: list[tuple[torch.Tensor, torch.Tensor]] = []  # (text embedding, teacher samples) per view prompt
        if cfg.engine == "vsd" and cfg.vsd.divergence != "rkl":  # f-distill: h(r) from a discriminator
            from .ratio import ConvRatioNet, DensityRatio, FWeight

            net = ConvRatioNet(int(guidance.unet.config.in_channels)).to(guidance.device)
            self.ratio = DensityRatio(net, cfg.vsd.ratio_lr)
            self.f_weight = FWeight(cfg.vsd.divergence, tuple(cfg.vsd.h_clip))

    @property
    def needs_pool(self) -> bool:
        """Whether this estimator needs teacher samples (`attach_pool`): f-distill's divergences."""
        return self.ratio is not None

    def attach_pool(self, pool: dict[str, torch.Tensor], embeddings: torch.Tensor) -> None:
        """Teacher samples per view prompt ({text: [N, C, S, S]}) and the texts' embeddings, in the
        same order: a render is paired with samples of the prompt it was guided by."""
        self._pool = [(e, x.to(self.guidance.device)) for e, x in zip(embeddings, pool.values())]

    def _pool_batch(self, cond: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """One teacher sample per row of `cond`, drawn from that row's view prompt's samples."""
        rows = []
        for emb in cond:
            samples = next((x for e, x in self._pool if torch.equal(e, emb)), None)
            if samples is None:
                raise RuntimeError("no teacher samples for a view prompt: the pool was built for other prompts")
            rows.append(samples[int(torch.randint(len(samples), (1,), generator=generator))])
        return torch.stack(rows)

    @property
    def needs_normals(self) -> bool:
        return self.cfg.engine == "ssd" and self.cfg.ssd.baseline == "normal"

    def _eps_pretrained(self, x_t, t, cond, uncond, camera) -> torch.Tensor:
        if self.lora is None:
            return self.guidance.predict_eps_cfg(x_t, t, cond, uncond, self.cfg.guidance_scale, camera)
        with self.lora.adapters_disabled():  # the frozen model's score, not the LoRA's
            return self.guidance.predict_eps_cfg(x_t, t, cond, uncond, self.cfg.guidance_scale, camera)

    def gradient(self, x: torch.Tensor, render: dict, cameras, cond, uncond, t, noise, update: bool = True,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict]:
        """G for the draws (t, noise): K = len(t) / len(x) draws per view, draw-major (see
        guidance/reducers.py), averaged per view. With update=False nothing is learned from them (mu
        sums, LoRA): the variance meter draws extra samples that way."""
        views, draws = x.shape[0], t.shape[0] // x.shape[0]
        if draws > 1:  # one render, K model calls: the views repeated once per draw
            x, cond, cameras = repeat_draws(x, draws), repeat_draws(cond, draws), cameras.repeat(draws)
            render = {k: repeat_draws(v, draws) for k, v in render.items() if torch.is_tensor(v) and v.dim() and len(v) == views}
        grad, logs = self._gradient(x, render, cameras, cond, uncond, t, noise, update, generator, views)
        return average_draws(grad, draws), logs

    def _gradient(self, x, render, cameras, cond, uncond, t, noise, update, generator, views):
        g, guide = self.cfg, self.guidance
        weight = guide.schedule.weight(t, g.weighting)
        x0 = x.detach().float()
        logs: dict = {}
        camera = guide.camera_condition(cameras)  # None for a text-only model
        with torch.no_grad():
            x_t = guide.schedule.add_noise(x0, noise, t)
            eps = self._eps_pretrained(x_t, t, cond, uncond, camera)
        if guide.camera_critic is not None and g.camera_scale > 0:  # the prior made camera-aware (Bayes)
            eps = eps + guidance_term(guide.camera_critic, x_t, t, cond, cameras.azimuth, guide.schedule.alpha_sigma(t)[1],
                                      g.camera_scale)
        if g.engine == "sds":
            grad = sds(eps, noise, weight)
        elif g.engine == "ssd":
            h, phi = self._control_variate(x_t, noise, t, render, cameras)
            mu_used = self.mu.summary()  # the mu applied to this sample (fitted on earlier steps)
            if g.ssd.keep_sds_cv:
                nu_used = self.mu.coefficients()[1]
                grad = self.mu.apply(eps, h, noise, weight, update=update)
                logs["nu"] = nu_used
            else:
                grad = self.mu.apply(eps, h, weight, update=update)
            logs.update(mu=mu_used, phi=float(phi.mean()))
        else:  # vsd
            with torch.no_grad():
                base = guide.unet_kwargs(camera, x_t.shape[0])  # the base model's own camera input, if any
                out = self.lora.predict(x_t.to(guide.dtype), t, cond, cameras.flat_pose().to(x_t.device, guide.dtype), **base)
                eps_lora = guide.schedule.eps_from_output(out.float(), x_t, t)
            f_weight = self._f_weight(x_t, t, cond, update, generator, logs) if self.ratio is not None else None
            grad = vsd(eps, eps_lora, weight, f_weight)
            if update:
                # the LoRA learns each render once, not once per draw
                logs["lora_loss"] = self.lora.train_step(x0[:views].to(guide.dtype), cond[:views],
                                                         cameras.flat_pose()[:views].to(x0.device, guide.dtype),
                                                         guide.schedule, generator,
                                                         unet_kwargs=guide.unet_kwargs(None if camera is None else camera[:views], views))
        grad, finite = sanitize(grad, g.grad_clip)
        logs["finite"] = finite
        return grad, logs

    def _f_weight(self, x_t, t, cond, update, generator, logs) -> torch.Tensor | None:
        """f-distill's h(r) for the renders' x_t (None, i.e. VSD, while the discriminator warms up);
        with `update` the discriminator then takes one step on teacher samples against these renders."""
        schedule = self.guidance.schedule
        t_frac = t.float() / schedule.num_train_timesteps
        r = self.ratio.ratio(x_t, t_frac)
        h = self.f_weight(r, update=update)
        logs.update(log_r=float(r.log().mean()), h_max=float(h.max()))
        warm = self.ratio.steps >= self.cfg.vsd.ratio_warmup
        if update:
            p0 = self._pool_batch(cond, generator)
            p_t = schedule.add_noise(p0, torch.randn(p0.shape, generator=generator).to(p0.device), t)
            logs["ratio_loss"] = self.ratio.train_step(p_t, x_t, t_frac, t_frac)
        return h if warm else None

    def _control_variate(self, x_t, noise, t, render, cameras):
        g, guide = self.cfg, self.guidance
        _, sigma = guide.schedule.alpha_sigma(t)
        decode = guide.decode if guide.vae is not None else None
        if g.ssd.baseline == "constant":
            phi, grad_phi = constant_baseline(x_t)
        elif g.ssd.baseline == "depth":
            disparity = render["disparity"].permute(0, 3, 1, 2)
            opacity = render["opacity"].permute(0, 3, 1, 2)
            phi, grad_phi = depth_baseline(x_t.to(guide.dtype), disparity, opacity, self.estimate, decode)
        else:  # normal: world-space rendered normals -> camera space (OpenGL, facing the camera = +z)
            rot = cameras.c2w[:, :3, :3]
            normals_cam = torch.einsum("bji,bhwj->bihw", rot, render["normal"])
            opacity = render["opacity"].permute(0, 3, 1, 2)
            phi, grad_phi = normal_baseline(x_t.to(guide.dtype), normals_cam, opacity, self.estimate, decode)
        if g.ssd.stein_form == "paper":
            return paper_term(noise, phi.float(), grad_phi.float()), phi
        h = control_variate(noise, phi.float(), grad_phi.float(), sigma)
        return h, phi

    def state_dict(self) -> dict:
        state = {}
        if self.mu is not None:
            state["mu"] = {k: v for k, v in self.mu.state_dict().items() if v is not None}
        if self.lora is not None:
            state["lora"] = self.lora.state_dict()
        if self.ratio is not None:
            state["ratio"] = {**self.ratio.state_dict(), "h": self.f_weight.state_dict()}
        return state

    def load_state_dict(self, state: dict) -> None:
        if self.mu is not None and "mu" in state:
            mu = state["mu"]
            self.mu.load_state_dict(mu if self.cfg.ssd.keep_sds_cv else {"eh": mu.get("eh"), "hh": mu.get("hh"), "n": mu.get("n", 0)})
        if self.lora is not None and "lora" in state:
            self.lora.load_state_dict(state["lora"])
        if self.ratio is not None and "ratio" in state:
            self.ratio.load_state_dict(state["ratio"])
            self.f_weight.load_state_dict(state["ratio"]["h"])
