"""VSD's LoRA particle model on a tiny random UNet2DConditionModel (blocks (32, 64), one layer
each, cross-attention dim 32, 8 norm groups: ~0.8 M parameters, built offline from its config)."""
import pytest
import torch

import torch.nn.functional as F

from steindreamer.guidance.lora import VSDLora, drop_pose
from steindreamer.guidance.schedule import NoiseSchedule


def tiny_unet(seed=0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                                layers_per_block=1, cross_attention_dim=32, norm_num_groups=8,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=8)


def scheduler(prediction_type):
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                         beta_schedule="scaled_linear", prediction_type=prediction_type, clip_sample=False)


def schedule(prediction_type):
    return NoiseSchedule.from_scheduler(scheduler(prediction_type))


def batch(seed=1, b=2):
    g = torch.Generator().manual_seed(seed)
    lat = torch.randn(b, 4, 8, 8, generator=g)
    text = torch.randn(b, 5, 32, generator=g)
    pose = torch.eye(4).expand(b, 4, 4).clone()
    pose[:, :3, 3] = torch.randn(b, 3, generator=g)
    return lat, text, pose, torch.tensor([10, 700])


def lora_on_tiny_unet():
    """(unet, its VSDLora, a batch, the UNet's output on that batch before the LoRA was attached)."""
    unet = tiny_unet()
    lat, text, pose, t = batch()
    with torch.no_grad():
        before = unet(lat, t, encoder_hidden_states=text).sample
    return unet, VSDLora(unet, rank=4, lr=1e-2), (lat, text, pose, t), before


def test_pretrained_output_unchanged_and_lora_differs_after_training():
    unet, vsd, (lat, text, pose, t), before = lora_on_tiny_unet()
    assert any("lora_" in n for n, _ in unet.named_parameters())
    assert not any(p.requires_grad for n, p in unet.named_parameters() if "lora_" not in n)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        vsd.train_step(lat, text, pose, schedule("epsilon"), gen)
    with torch.no_grad():
        pre = vsd.pretrained(lat, t, text)
        lora = vsd.predict(lat, t, text, pose)
        lora_nopose = vsd.predict(lat, t, text, torch.zeros_like(pose))
    assert torch.equal(pre, before)  # adapters off and no pose term: bit-for-bit the original UNet
    assert not torch.allclose(lora, before, atol=1e-6)  # the LoRA model has moved
    assert not torch.allclose(lora, lora_nopose, atol=1e-7)  # and it sees the pose
    with torch.no_grad():  # no hook is left behind on the shared UNet
        assert torch.equal(vsd.pretrained(lat, t, text), before)
    assert len(unet.time_embedding._forward_hooks) == 0


def test_lora_starts_at_pretrained():
    """peft's zero B and the zero last pose layer: eps_phi == eps_pre before any training."""
    unet = tiny_unet()
    lat, text, pose, t = batch()
    vsd = VSDLora(unet)
    with torch.no_grad():
        torch.testing.assert_close(vsd.predict(lat, t, text, pose), vsd.pretrained(lat, t, text))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_train_step_reduces_loss_on_fixed_batch(prediction_type):
    unet = tiny_unet()
    lat, text, pose, _ = batch(b=2)
    vsd = VSDLora(unet, rank=4, lr=1e-2)
    sch = schedule(prediction_type)

    def fixed_loss():  # same t, noise and pose-dropout draws every time
        with torch.no_grad():
            return float(vsd.loss(lat, text, pose, sch, torch.Generator().manual_seed(123)))

    start = fixed_loss()
    for _ in range(6):
        vsd.train_step(lat, text, pose, sch, torch.Generator().manual_seed(123))
    assert fixed_loss() < 0.9 * start


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_loss_is_diffusers_denoising_loss(prediction_type, monkeypatch):
    """The loss noises and targets with the NoiseSchedule; in float32 it is bit for bit the loss built
    from diffusers' add_noise / get_velocity with the same draws (t, noise, pose dropout). (In float16
    diffusers rounds alpha_bar to half first; the schedule computes in float32 and rounds once.)"""
    unet = tiny_unet()
    lat, text, pose, _ = batch(b=3)
    vsd = VSDLora(unet, rank=4, lr=1e-2)
    vsd.train_step(lat, text, pose, schedule(prediction_type), torch.Generator().manual_seed(5))  # LoRA != 0
    seen = []
    real = vsd.predict
    monkeypatch.setattr(vsd, "predict", lambda x, t, e, p: (seen.append((x, t, p)), real(x, t, e, p))[1])
    with torch.no_grad():
        loss = vsd.loss(lat, text, pose, schedule(prediction_type), torch.Generator().manual_seed(9))
        sch, g = scheduler(prediction_type), torch.Generator().manual_seed(9)
        t = torch.randint(0, 1000, (3,), generator=g)
        noise = torch.randn(lat.shape, generator=g)
        x_t = sch.add_noise(lat, noise, t)
        target = noise if prediction_type == "epsilon" else sch.get_velocity(lat, noise, t)
        want = F.mse_loss(real(x_t, t, text, drop_pose(pose, vsd.pose_dropout, g)), target)
    assert torch.equal(seen[0][1], t)
    assert torch.equal(seen[0][0], x_t) and torch.equal(loss, want)  # float32: the same operations


def test_adapters_disabled_is_the_pretrained_unet_and_restores_adapters():
    unet, vsd, (lat, text, pose, t), before = lora_on_tiny_unet()
    for _ in range(2):
        vsd.train_step(lat, text, pose, schedule("epsilon"), torch.Generator().manual_seed(0))
    with torch.no_grad():
        lora_nohook = unet(lat, t, encoder_hidden_states=text).sample
        with vsd.adapters_disabled():
            assert torch.equal(unet(lat, t, encoder_hidden_states=text).sample, before)
        assert torch.equal(unet(lat, t, encoder_hidden_states=text).sample, lora_nohook)  # adapters back on
        with pytest.raises(RuntimeError), vsd.adapters_disabled():
            raise RuntimeError("boom")
        assert torch.equal(unet(lat, t, encoder_hidden_states=text).sample, lora_nohook)
    assert not torch.equal(lora_nohook, before)


def test_pose_dropout_rate_and_zeroing():
    pose = torch.randn(20_000, 4, 4) + 3.0
    out = drop_pose(pose, 0.1, torch.Generator().manual_seed(0))
    dropped = (out.flatten(1) == 0).all(1)
    kept = (out == pose).flatten(1).all(1)
    assert (dropped | kept).all()
    assert 0.09 < float(dropped.float().mean()) < 0.11  # 3 SE of a Binomial(20000, 0.1) is 0.0064
    assert torch.equal(drop_pose(pose, 0.0), pose)


def test_train_step_applies_pose_dropout(monkeypatch):
    """The pose reaching the UNet during training is zeroed per sample (p = 0.5 here, for a clear split),
    and the other samples see their own pose unchanged."""
    unet = tiny_unet()
    vsd = VSDLora(unet, pose_dropout=0.5)
    seen = []
    real = vsd.predict
    monkeypatch.setattr(vsd, "predict", lambda x, t, e, p: (seen.append(p), real(x, t, e, p))[1])
    g = torch.Generator().manual_seed(0)
    lat = torch.randn(16, 4, 8, 8, generator=g)
    text = torch.randn(16, 5, 32, generator=g)
    pose = torch.randn(16, 4, 4, generator=g)
    vsd.train_step(lat, text, pose, schedule("epsilon"), g)
    zero = (seen[0].flatten(1) == 0).all(1)
    assert 0 < int(zero.sum()) < 16 and torch.equal(seen[0][~zero], pose[~zero])
