"""The toy world against analytic truth: ray hits, silhouettes, normals, captions, vocabulary."""
from __future__ import annotations

import json
import math

import pytest
import torch

from steindreamer.cameras import make_cameras, sample_cameras, view_suffix
from steindreamer.toy import vocab, world
from steindreamer.toy.world import (COLOURS, HELD_OUT, PALETTE, SHAPES, TOY_CAMERA, TRAIN_PAIRS, caption,
                                    parse_caption, render_shape, training_captions, view_captions)

D = 2.0  # camera distance of the head-on tests


def head_on(elevation=0.0, azimuth=0.0, fov=45.0):
    return make_cameras(torch.tensor([elevation]), torch.tensor([azimuth]), torch.tensor([D]), torch.tensor([fov]))


def centre(shape, elevation=0.0, azimuth=0.0, n=33):
    """The render of the pixel whose centre ray passes through the origin (odd resolution)."""
    r = render_shape(shape, "red", head_on(elevation, azimuth), n, n)
    return {k: v[0, n // 2, n // 2] for k, v in r.items()}


@pytest.mark.parametrize("shape, expected", [
    ("sphere", D - world.SPHERE_R),
    ("cube", D - world.CUBE_HALF),
    ("cylinder", D - world.CYL_R),
    ("torus", D - world.TORUS_R - world.TORUS_r),
    # the front face of the pyramid at y = 0, where its half-width is a (y1 - 0) / (y1 - y0)
    ("pyramid", D - world.PYR_HALF * world.PYR_Y1 / (world.PYR_Y1 - world.PYR_Y0)),
    ("cone", D - world.CONE_R / 2),  # the cone's radius at mid-height is half the base radius
])
def test_centre_ray_hits_at_analytic_distance(shape, expected):
    c = centre(shape)
    assert bool(c["mask"])
    assert c["depth"].item() == pytest.approx(expected, abs=2e-3)
    assert c["disparity"].item() == pytest.approx(1 / expected, rel=2e-3)


def test_centre_ray_from_above():
    assert centre("cone", elevation=90.0)["depth"].item() == pytest.approx(D - world.CONE_HALF_H, abs=2e-3)  # apex
    assert not bool(centre("torus", elevation=90.0)["mask"])  # straight down through the hole


def test_sphere_normal_at_centre_faces_camera():
    n = centre("sphere")["normal"]
    assert torch.allclose(n, torch.tensor([0.0, 0.0, 1.0]), atol=1e-3)


def test_cube_silhouette_head_on_is_the_analytic_square():
    n, fov = 64, 45.0
    r = render_shape("cube", "blue", head_on(fov=fov), n, n)
    focal = 0.5 * n / math.tan(math.radians(fov) / 2)
    # Head-on, the silhouette is the front face z = h: |x|, |y| <= h / (D - h) in image-plane units.
    half = world.CUBE_HALF / (D - world.CUBE_HALF)
    u = (torch.arange(n) + 0.5 - n / 2) / focal
    inside = (u.abs()[None, :] <= half) & (u.abs()[:, None] <= half)
    near_edge = ((u.abs() - half).abs() < 1.5 / focal)
    sure = ~(near_edge[None, :] | near_edge[:, None])
    assert torch.equal(r["mask"][0, ..., 0][sure], inside[sure])
    # Depth on the face: the ray (u, v, -1) reaches z = h after (D - h) sqrt(1 + u² + v²).
    uu, vv = u[None, :].expand(n, n), u[:, None].expand(n, n)
    expected = (D - world.CUBE_HALF) * torch.sqrt(1 + uu ** 2 + vv ** 2)
    face = inside & sure
    assert torch.allclose(r["depth"][0, ..., 0][face], expected[face], atol=2e-3)
    assert torch.allclose(r["normal"][0][face], torch.tensor([0.0, 0.0, 1.0]), atol=1e-3)


@pytest.mark.parametrize("shape", SHAPES)
def test_buffers_consistent_and_normals_face_camera(shape):
    cams = sample_cameras(TOY_CAMERA, 4, torch.Generator().manual_seed(1))
    r = render_shape(shape, "green", cams, 32, 32)
    m = r["mask"][..., 0]
    assert r["rgb"].shape == (4, 32, 32, 3) and r["depth"].shape == (4, 32, 32, 1) and r["normal"].shape == (4, 32, 32, 3)
    assert 0.05 < m.float().mean() < 0.6  # the object is in view and fits in it
    assert torch.equal(m, r["depth"][..., 0] > 0)
    assert torch.allclose(r["disparity"][m], 1 / r["depth"][m])
    assert (r["disparity"][~m] == 0).all() and (r["depth"][~m] == 0).all()
    # depth within the bounding sphere's span along the ray
    dist = cams.distance.view(4, 1, 1).expand_as(m)
    assert ((r["depth"][..., 0][m] > dist[m] - 0.7) & (r["depth"][..., 0][m] < dist[m] + 0.7)).all()
    normals = r["normal"][m]
    assert torch.allclose(normals.norm(dim=-1), torch.ones(len(normals)), atol=1e-4)
    _, dirs = cams.rays(32, 32)
    facing = (normals * dirs[m]).sum(-1)
    # Sphere tracing stops within 1e-4 of the surface, so a ray grazing the silhouette may stop at a
    # point whose normal is perpendicular to it: allow that slack at a handful of edge pixels.
    assert (facing < 0.05).all() and (facing < 0).float().mean() > 0.99
    # white background; the object is the albedo times a shade in [ambient, 1]
    assert (r["rgb"][~m] == 1).all()
    shade = r["rgb"][m] / torch.tensor(PALETTE["green"])
    assert (shade > world.AMBIENT - 1e-4).all() and (shade < 1 + 1e-4).all()


def test_supersampled_render_is_antialiased_version():
    cams = head_on(elevation=20.0, azimuth=30.0)
    sharp = render_shape("torus", "orange", cams, 64, 64)
    soft = render_shape("torus", "orange", cams, 32, 32, supersample=2)
    pooled = torch.nn.functional.avg_pool2d(sharp["rgb"].permute(0, 3, 1, 2), 2).permute(0, 2, 3, 1)
    assert torch.allclose(soft["rgb"], pooled, atol=1e-5)


def test_captions_and_view_suffixes():
    assert caption("red", "cube") == "a red cube"
    assert parse_caption("a red cube, back view") == ("red", "cube")
    with pytest.raises(ValueError):
        parse_caption("a cube")
    cams = make_cameras(torch.tensor([10.0, 10.0, 10.0, 70.0]), torch.tensor([0.0, 90.0, 180.0, 0.0]),
                        torch.tensor([2.0] * 4), torch.tensor([45.0] * 4))
    got = view_captions([("red", "cube")] * 4, cams)
    assert got == ["a red cube, front view", "a red cube, side view", "a red cube, back view", "a red cube, overhead view"]
    assert view_suffix(10.0, -170.0, TOY_CAMERA) == "back view"


def test_held_out_pairs_never_trained():
    assert len(HELD_OUT) == 4 and len(set(HELD_OUT)) == 4
    assert all(c in COLOURS and s in SHAPES for c, s in HELD_OUT)
    assert len(TRAIN_PAIRS) == len(COLOURS) * len(SHAPES) - 4
    trained = {parse_caption(t) for t in training_captions()}
    assert trained == set(TRAIN_PAIRS) and not trained & set(HELD_OUT)
    # every colour and every shape still appears in training
    assert {c for c, _ in TRAIN_PAIRS} == set(COLOURS) and {s for _, s in TRAIN_PAIRS} == set(SHAPES)


def test_check_prompt_with_the_builtin_models_vocabulary():
    from steindreamer.errors import UserError
    from steindreamer.prompt import check_prompt
    from steindreamer.toy.model import DIFFUSION_DIR, MODEL_CARD

    # The shipped folder's card is what training writes (the vocabulary lives with the model).
    # (plus the camera critic that train_builtin's critic stage adds)
    card = json.loads((DIFFUSION_DIR / "steindreamer.json").read_text())
    assert (DIFFUSION_DIR / card.pop("camera_critic") / "model.safetensors").is_file()
    assert card == MODEL_CARD
    for text in training_captions()[:40] + ["A Red Cube", "a blue torus, overhead view"]:
        assert check_prompt(f"  {text} ", str(DIFFUSION_DIR)) == text.lower()
    with pytest.raises(UserError) as e:
        check_prompt("a red dog on a teapot", str(DIFFUSION_DIR))
    msg = str(e.value)
    assert "\n" not in msg and "'dog'" in msg and "'teapot'" in msg and "'on'" in msg
    assert "'red'" not in msg and "cylinder" in msg  # names only the unknown words, lists the vocabulary
    assert "overhead" not in msg.split("vocabulary is:")[1]  # view suffixes are ours to add, not the user's words
    with pytest.raises(UserError, match="at most 14"):
        check_prompt("a " * 15 + "cube", str(DIFFUSION_DIR))
    assert check_prompt("a red dog", None) == "a red dog"  # a model without a card: no vocabulary check
    # What people type becomes the model's words: articles, plurals, capitals, spaces, a full stop.
    for typed, meant in [("An orange pyramid", "a orange pyramid"), ("  The  Green CUBES. ", "a green cube"),
                         ("a blue torus , overhead view", "a blue torus, overhead view"), ("one yellow tori!", "a yellow torus")]:
        assert check_prompt(typed, str(DIFFUSION_DIR)) == meant
    with pytest.raises(UserError, match="empty"):
        check_prompt(" . ", str(DIFFUSION_DIR))


def test_tokenizer_one_token_per_word():
    tok = vocab.build_tokenizer()
    for w in vocab.WORDS:
        assert len(tok.tokenize(w)) == 1, w
    ids = tok("a red cube, front view").input_ids
    assert len(ids) == 8 and ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id


def test_turned_shapes_render_as_their_symmetry_says():
    import torch

    from steindreamer.cameras import make_cameras
    from steindreamer.toy.world import render_shape

    cams = make_cameras(torch.tensor([15.0, 30.0]), torch.tensor([0.0, 70.0]), torch.tensor([2.0, 2.0]), torch.tensor([45.0, 45.0]))
    r = lambda shape, yaw: render_shape(shape, "red", cams, 24, 24, yaw=yaw)["rgb"]  # noqa: E731
    assert torch.allclose(r("cube", 90.0), r("cube", 0.0), atol=1e-4)  # 4-fold
    assert torch.allclose(r("cylinder", 37.0), r("cylinder", 0.0), atol=1e-3)  # round
    assert (r("cube", 45.0) - r("cube", 0.0)).abs().max() > 0.3  # corner-on is not face-on
