import pytest
import torch

from steindreamer.errors import UserError
from steindreamer.guidance.diffusion import DiffusionGuidance
from steindreamer.guidance.locate import resolve_model
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


def _damage(path, how):
    from safetensors.torch import load_file, save_file

    emb = load_file(str(path))["emb"]
    if how == "truncated":
        path.write_bytes(path.read_bytes()[:-40])
    elif how == "garbage":
        path.write_bytes(b"\x00not a safetensors file")
    elif how == "nan":
        save_file({"emb": emb.clone().fill_(float("nan"))}, str(path), metadata={"prompt": "a blue sphere"})
    elif how == "other_prompt":  # a whole, valid entry, but of another prompt (e.g. copied over it)
        save_file({"emb": emb + 1}, str(path), metadata={"prompt": "a red cube"})
    elif how == "wrong_shape":
        save_file({"emb": emb[:3]}, str(path), metadata={"prompt": "a blue sphere"})
    elif how == "no_metadata":  # what an older version wrote: not trusted, rewritten once
        save_file({"emb": emb + 1}, str(path))


@pytest.mark.parametrize("how", ["truncated", "garbage", "nan", "other_prompt", "wrong_shape", "no_metadata"])
def test_damaged_text_embedding_cache_entry_is_recomputed(how, tiny_latent_model, tmp_path):
    guide = DiffusionGuidance(str(tiny_latent_model), torch.device("cpu"), cache_dir=str(tmp_path))
    fresh = guide.text_embeddings(["a blue sphere"])
    [path] = (tmp_path / "text_emb").glob("*.safetensors")
    _damage(path, how)
    again = DiffusionGuidance(str(tiny_latent_model), torch.device("cpu"), cache_dir=str(tmp_path))
    assert torch.equal(again.text_embeddings(["a blue sphere"]), fresh)
    third = DiffusionGuidance(str(tiny_latent_model), torch.device("cpu"), cache_dir=str(tmp_path))
    third.text_encoder = None  # the entry was rewritten whole: a hit again
    assert torch.equal(third.text_embeddings(["a blue sphere"]), fresh)


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


def test_camera_conditioned_model_gets_each_views_pose(tmp_path):
    """A model whose card names a camera input gets every rendered view's flattened pose in both CFG
    halves; a text-only model's call is unchanged (no class labels)."""
    from tiny_models import build_tiny_pipeline

    from steindreamer.cameras import make_cameras

    guide = DiffusionGuidance(str(build_tiny_pipeline(tmp_path / "cam", latent=False, camera=True)), torch.device("cpu"))
    assert guide.camera_kind == "c2w_flat16"
    cams = make_cameras(torch.tensor([10.0, 30.0]), torch.tensor([0.0, 40.0]), torch.tensor([2.0, 2.0]), torch.tensor([45.0, 45.0]))
    camera = guide.camera_condition(cams)
    assert torch.equal(camera, cams.c2w.reshape(2, 16))
    x_t, t = torch.randn(2, 3, 16, 16), torch.tensor([300, 600])
    cond, uncond = guide.text_embeddings(["a red cube"] * 2), guide.text_embeddings([""])
    eps = guide.predict_eps_cfg(x_t, t, cond, uncond, 3.0, camera)
    with torch.no_grad():
        e_c = guide.unet(x_t, t, encoder_hidden_states=cond, class_labels=camera).sample
        e_u = guide.unet(x_t, t, encoder_hidden_states=uncond.expand(2, -1, -1), class_labels=camera).sample
    assert torch.allclose(eps, e_u + 3.0 * (e_c - e_u), atol=1e-5)
    other = guide.camera_condition(cams[[1, 0]])
    assert not torch.allclose(guide.predict_eps_cfg(x_t, t, cond, uncond, 3.0, other), eps, atol=1e-4)  # the pose matters


def test_text_only_model_takes_no_camera(tiny_pixel_model):
    from steindreamer.cameras import make_cameras

    guide = DiffusionGuidance(str(tiny_pixel_model), torch.device("cpu"))
    cams = make_cameras(torch.tensor([10.0]), torch.tensor([0.0]), torch.tensor([2.0]), torch.tensor([45.0]))
    assert guide.camera_kind is None and guide.camera_condition(cams) is None and guide.unet_kwargs(None, 1) == {}


def test_a_card_naming_a_camera_the_unet_cannot_take_is_one_line(tmp_path):
    import json

    from tiny_models import build_tiny_pipeline

    folder = build_tiny_pipeline(tmp_path / "m", latent=False)
    (folder / "steindreamer.json").write_text(json.dumps({"camera": "c2w_flat16"}))
    with pytest.raises(UserError, match="cannot take"):
        DiffusionGuidance(str(folder), torch.device("cpu"))


@pytest.mark.parametrize("engine", ["sds", "vsd"])
def test_distiller_passes_the_camera_to_a_camera_conditioned_model(tmp_path, engine):
    """Every UNet call of an engine (the frozen model's and, for VSD, the LoRA's on the same UNet)
    gets the views' poses; diffusers refuses a class-conditioned call without them, so a call that
    forgot the camera fails here."""
    from dataclasses import replace

    from tiny_models import build_tiny_pipeline

    from steindreamer.cameras import make_cameras
    from steindreamer.guidance.config import GuidanceConfig
    from steindreamer.guidance.distill import Distiller

    guide = DiffusionGuidance(str(build_tiny_pipeline(tmp_path / "cam", latent=False, camera=True)), torch.device("cpu"))
    distiller = Distiller(replace(GuidanceConfig(), engine=engine, guidance_scale=3.0), guide)
    seen = []
    guide.unet.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs.get("class_labels")), with_kwargs=True)
    cams = make_cameras(torch.tensor([10.0, 30.0]), torch.tensor([0.0, 40.0]), torch.tensor([2.0, 2.0]), torch.tensor([45.0, 45.0]))
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    cond, uncond = guide.text_embeddings(["a red cube"] * 2), guide.text_embeddings([""])
    t, noise = torch.tensor([300, 600]), torch.randn(2, 3, 16, 16)
    grad, _ = distiller.gradient(x, {}, cams, cond, uncond, t, noise, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(grad).all() and len(seen) == (3 if engine == "vsd" else 1)
    pose = cams.c2w.reshape(2, 16)
    assert all(c is not None and torch.equal(c[:2], pose) for c in seen)
