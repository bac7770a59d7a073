"""VSD's particle score eps_phi: a LoRA on the pretrained UNet plus a camera-pose embedding
(ProlificDreamer; docs/method.md, "VSD").

The LoRA lives on the SAME `UNet2DConditionModel` instance as the frozen pretrained model (peft via
diffusers' `add_adapter`), so the weights are shared. The pose enters through a 2-layer MLP whose
output is added to the UNet's timestep embedding by a forward hook on `unet.time_embedding` that
exists only during a LoRA call. `pretrained()` (and any call inside `adapters_disabled()`) runs with
adapters disabled and no hook, which is bit-for-bit the UNet before the LoRA was attached.

Noising and the training target come from the guidance's `NoiseSchedule` (schedule.py).
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

from .schedule import NoiseSchedule

LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # attention projections (self and cross)
ADAPTER = "vsd_lora"


class PoseMLP(nn.Module):
    """Flattened camera-to-world 4x4 (16 numbers) -> 2 layers -> time-embedding dim. The last layer
    starts at zero so that, with peft's zero-initialised LoRA B, eps_phi starts equal to eps_pre."""

    def __init__(self, pose_dim: int, emb_dim: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(pose_dim, emb_dim), nn.Linear(emb_dim, emb_dim)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, pose: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.silu(self.fc1(pose.flatten(1))))


def drop_pose(pose: torch.Tensor, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Zero each sample's pose with probability p (classifier-free style pose dropout)."""
    keep = torch.rand(pose.shape[0], generator=generator, device="cpu") >= p
    return pose * keep.to(pose.device, pose.dtype).view(-1, *([1] * (pose.dim() - 1)))


class VSDLora:
    """LoRA + pose embedding on a shared UNet; trained online on the (detached) renders.

    predict(x_t, t, text_emb, pose): LoRA model output (the UNet's parameterisation: eps or v).
    pretrained(x_t, t, text_emb):    the frozen UNet's output (adapters off, no pose term).
    adapters_disabled():             context in which any call of the shared UNet is the frozen model.
    train_step(latents, text_emb, pose, schedule, generator) -> float loss (one AdamW step);
                                     `schedule` is a NoiseSchedule (noising and target).
    """

    def __init__(self, unet, rank: int = 4, lr: float = 1e-4, pose_dim: int = 16,
                 pose_dropout: float = 0.1, alpha: float | None = None, weight_decay: float = 0.0):
        from peft import LoraConfig

        self.unet = unet
        unet.requires_grad_(False)  # pretrained weights stay frozen; only LoRA + pose MLP train
        unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank,
                                    init_lora_weights="gaussian", target_modules=list(LORA_TARGETS)),
                         adapter_name=ADAPTER)
        p = next(unet.parameters())
        emb_dim = unet.time_embedding.linear_2.out_features
        self.pose_mlp = PoseMLP(pose_dim, emb_dim).to(p.device)
        self.pose_dropout = pose_dropout
        self.lora_params = [q for n, q in unet.named_parameters() if "lora_" in n and q.requires_grad]
        if not self.lora_params:
            raise RuntimeError("peft attached no trainable LoRA parameters to the UNet")
        self.optimizer = torch.optim.AdamW(self.lora_params + list(self.pose_mlp.parameters()),
                                           lr=lr, weight_decay=weight_decay)

    def parameters(self) -> list[torch.Tensor]:
        return self.lora_params + list(self.pose_mlp.parameters())

    @contextmanager
    def _pose_added(self, pose: torch.Tensor):
        emb = self.pose_mlp(pose.to(next(self.pose_mlp.parameters()).dtype))
        handle = self.unet.time_embedding.register_forward_hook(lambda m, i, out: out + emb.to(out.dtype))
        try:
            yield
        finally:
            handle.remove()

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, text_emb: torch.Tensor,
                pose: torch.Tensor, **unet_kwargs) -> torch.Tensor:
        """eps_phi (or v_phi): adapters on, pose embedding added to the timestep embedding.
        `unet_kwargs` are the base model's own inputs (a camera-conditioned model's class labels)."""
        self.unet.enable_adapters()
        with self._pose_added(pose):
            return self.unet(x_t, t, encoder_hidden_states=text_emb, **unet_kwargs).sample

    @contextmanager
    def adapters_disabled(self):
        """Within this block the shared UNet is the pretrained model (LoRA off; the pose hook only
        exists inside `predict`). Adapters are re-enabled on exit, also on an exception."""
        self.unet.disable_adapters()
        try:
            yield
        finally:
            self.unet.enable_adapters()

    def pretrained(self, x_t: torch.Tensor, t: torch.Tensor, text_emb: torch.Tensor, **unet_kwargs) -> torch.Tensor:
        """The pretrained UNet's output: adapters disabled and no pose term."""
        with self.adapters_disabled():
            return self.unet(x_t, t, encoder_hidden_states=text_emb, **unet_kwargs).sample

    def loss(self, latents: torch.Tensor, text_emb: torch.Tensor, pose: torch.Tensor, schedule: NoiseSchedule,
             generator: torch.Generator | None = None, unet_kwargs: dict | None = None) -> torch.Tensor:
        """Denoising loss of the LoRA model on detached latents: t over the full range, pose dropout;
        the target is `schedule.target` (the UNet's own parameterisation)."""
        latents = latents.detach()
        t = schedule.sample_t(latents.shape[0], 0.0, 1.0, generator).to(latents.device)  # 0 .. T-1
        noise = torch.randn(latents.shape, generator=generator).to(latents.device, latents.dtype)
        x_t = schedule.add_noise(latents, noise, t)
        pred = self.predict(x_t, t, text_emb.detach(), drop_pose(pose, self.pose_dropout, generator), **(unet_kwargs or {}))
        return F.mse_loss(pred.float(), schedule.target(latents, noise, t).float())

    def train_step(self, latents: torch.Tensor, text_emb: torch.Tensor, pose: torch.Tensor, schedule: NoiseSchedule,
                   generator: torch.Generator | None = None, unet_kwargs: dict | None = None) -> float:
        """One AdamW step on `loss`; returns the loss before the step."""
        with torch.enable_grad():
            loss = self.loss(latents, text_emb, pose, schedule, generator, unet_kwargs)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
        self.optimizer.step()
        return float(loss.detach())

    def state_dict(self) -> dict:
        return {"lora": {n: q.detach().clone() for n, q in self.unet.named_parameters() if "lora_" in n},
                "pose_mlp": self.pose_mlp.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        named = dict(self.unet.named_parameters())
        with torch.no_grad():
            for n, v in state["lora"].items():
                named[n].copy_(v)
        self.pose_mlp.load_state_dict(state["pose_mlp"])
        self.optimizer.load_state_dict(state["optimizer"])
