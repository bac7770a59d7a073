import pytest
import torch

from steindreamer.errors import UserError
from steindreamer.guidance.diffusion import DiffusionGuidance, resolve_model
from steindreamer.guidance.engines import cfg_combine, injected_loss, sanitize, sds


def test_sds_equals_weighted_residual_and_injected_gradient_is_g():
    g = torch.Generator().manual_seed(0)
    eps_hat, noise = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    w = torch.tensor([0.3, 0.9])
    grad = sds(eps_hat, noise, w)
    assert torch.allclose(grad, w.view(2, 1, 1, 1) * (eps_hat - noise))
    x = torch.randn(2, 4, 8, 8, generator=g, requires_grad=True)
    injected_loss(x, grad).backward()
    assert torch.allclose(x.grad * x.shape[0], grad, atol=1e-6)  # d loss / d x = G / batch


def test_cfg_formula_and_sanitize():
    u, c = torch.tensor([1.0, 2.0]), torch.tensor([3.0, -1.0])
    assert torch.allclose(cfg_combine(u, c, 7.5), u + 7.5 * (c - u))
    assert torch.allclose(cfg_combine(u, c, 1.0), c)
    g, finite = sanitize(torch.tensor([1.0, float("nan"), 5.0, -7.0]), clip=2.0)
    assert not finite and torch.equal(g, torch.tensor([1.0, 0.0, 2.0, -2.0]))


def test_loader_latent_model_cfg_matches_two_unet_calls(tiny_latent_model):
    guide = DiffusionGuidance(str(tiny_latent_model), torch.device("cpu"))
    assert guide.vae is not None and guide.vae_scale == 2 and guide.image_size == 32
    x = guide.encode(torch.rand(2, 3, 24, 24))  # resized to the model's 32x32, encoded to 4x16x16
    assert x.shape == (2, 4, 16, 16)
    t = torch.tensor([100, 700])
    noise = torch.randn_like(x)
    x_t = guide.schedule.add_noise(x.detach(), noise, t)
    a, s = guide.schedule.alpha_sigma(t)
    assert torch.allclose(x_t, a.view(-1, 1, 1, 1) * x + s.view(-1, 1, 1, 1) * noise, atol=1e-5)
    cond = guide.text_embeddings(["a red cube", "a red cube"])
    uncond = guide.text_embeddings([""])
    eps = guide.predict_eps_cfg(x_t, t, cond, uncond, 7.5)
    with torch.no_grad():
        e_c = guide.unet(x_t, t, encoder_hidden_states=cond).sample
        e_u = guide.unet(x_t, t, encoder_hidden_states=uncond.expand(2, -1, -1)).sample
    assert torch.allclose(eps, e_u + 7.5 * (e_c - e_u), atol=1e-4)
    assert guide.decode(x).shape == (2, 3, 32, 32)


def test_loader_pixel_model_converts_v_prediction(tiny_pixel_model):
    guide = DiffusionGuidance(str(tiny_pixel_model), torch.device("cpu"))
    assert guide.vae is None and guide.schedule.prediction_type == "v_prediction"
    x = guide.encode(torch.rand(1, 3, 16, 16))
    assert x.shape == (1, 3, 16, 16) and x.min() >= -1 and x.max() <= 1
    t = torch.tensor([500])
    emb = guide.text_embeddings(["a cube"])
    with torch.no_grad():
        v = guide.unet(x, t, encoder_hidden_states=emb).sample
        eps = guide.unet_eps(x, t, emb)
    a, s = guide.schedule.alpha_sigma(t)
    assert torch.allclose(eps, a * v + s * x, atol=1e-5)


def test_text_embeddings_are_cached_on_disk(tiny_latent_model, tmp_path):
    guide = DiffusionGuidance(str(tiny_latent_model), torch.device("cpu"), cache_dir=str(tmp_path))
    e1 = guide.text_embeddings(["a blue sphere"])
    files = list((tmp_path / "text_emb").glob("*.safetensors"))
    assert len(files) == 1
    again = DiffusionGuidance(str(tiny_latent_model), torch.device("cpu"), cache_dir=str(tmp_path))
    again.text_encoder = None  # a cache hit must not need the encoder
    assert torch.equal(again.text_embeddings(["a blue sphere"]), e1)


def test_missing_model_folder_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="model folder not found"):
        resolve_model(str(tmp_path / "nope"))
    with pytest.raises(UserError, match="not a diffusers"):
        DiffusionGuidance(str(tmp_path), torch.device("cpu"))


def test_guidance_noise_maths_is_its_schedules(tiny_latent_model):
    """DiffusionGuidance's NoiseSchedule (alpha_sigma / add_noise / weight / sample_t) is bit for bit
    the formulas the reference run was taken with."""
    from steindreamer.guidance.schedule import NoiseSchedule

    guide = DiffusionGuidance(str(tiny_latent_model), torch.device("cpu"))
    assert isinstance(guide.schedule, NoiseSchedule) and guide.schedule.prediction_type == guide.scheduler.config.prediction_type
    abar = guide.scheduler.alphas_cumprod.to(dtype=torch.float32)
    assert torch.equal(guide.schedule.alphas_cumprod, abar) and guide.schedule.num_train_timesteps == len(abar)
    g = torch.Generator().manual_seed(0)
    x, noise = torch.randn(3, 4, 16, 16, generator=g), torch.randn(3, 4, 16, 16, generator=g)
    t = guide.schedule.sample_t(3, 0.02, 0.98, torch.Generator().manual_seed(1))
    assert torch.equal(t, torch.randint(20, 981, (3,), generator=torch.Generator().manual_seed(1)))
    a, s = abar[t].sqrt(), (1 - abar[t]).sqrt()
    assert torch.equal(guide.schedule.add_noise(x, noise, t), a.view(-1, 1, 1, 1) * x + s.view(-1, 1, 1, 1) * noise)
    assert torch.equal(guide.schedule.weight(t, "sigma2"), 1 - abar[t])
    emb = guide.text_embeddings(["a cube"] * 3)
    with torch.no_grad():  # an epsilon model: unet_eps is the UNet's output as is
        out = guide.unet(x.contiguous(memory_format=torch.channels_last), t, encoder_hidden_states=emb).sample
        assert torch.equal(guide.unet_eps(x, t, emb), out)
