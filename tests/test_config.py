import pytest

from steindreamer.config import load_config, presets, to_yaml, from_yaml_text
from steindreamer.errors import UserError


@pytest.mark.parametrize("name", ["toy", "dreamfusion", "prolificdreamer", "steindreamer"])
def test_presets_load_validate_and_round_trip(name):
    assert name in presets()
    cfg = load_config(name)
    assert from_yaml_text(to_yaml(cfg)) == cfg


def test_presets_carry_the_published_settings():
    assert load_config("dreamfusion").guidance.engine == "sds" and load_config("dreamfusion").guidance.guidance_scale == 100
    vsd = load_config("prolificdreamer").guidance
    assert vsd.engine == "vsd" and vsd.guidance_scale == 7.5 and vsd.anneal_t_max == 0.5 and vsd.lora_rank == 4
    assert load_config("steindreamer").guidance.engine == "ssd"


def test_toy_preset_matches_the_world_it_was_trained_on():
    from steindreamer.toy.world import AMBIENT, LIGHT_DIR, TOY_CAMERA, TOY_RESOLUTION

    cfg = load_config("toy")
    for key in ("distance", "fov", "elevation", "azimuth"):
        assert tuple(getattr(cfg.camera, key)) == tuple(getattr(TOY_CAMERA, key))
    assert cfg.render.resolution == TOY_RESOLUTION and cfg.background.kind == "white"
    assert tuple(cfg.shading.light_dir) == tuple(LIGHT_DIR) and cfg.shading.ambient == AMBIENT


def test_short_keys_and_overrides():
    cfg = load_config("toy", None, ["steps=7", "seed=3", "engine=ssd", "resolution=64", "model=/x", "depth_model=/y", "camera.fov=[30,40]"])
    assert (cfg.train.steps, cfg.train.seed, cfg.guidance.engine, cfg.render.resolution) == (7, 3, "ssd", 64)
    assert (cfg.guidance.model, cfg.guidance.depth_model, cfg.camera.fov) == ("/x", "/y", (30.0, 40.0))
    with pytest.raises(UserError, match="export.formats"):
        load_config(None, None, ["export.formats=[fbx]"])
    with pytest.raises(UserError, match="render.normals"):
        load_config(None, None, ["render.normals=vertex"])
    assert load_config(None, None, ["render.normals=samples"]).render.normals == "samples"
    assert load_config(None, None, ["render.normals=difference"]).render.normals == "difference"
    with pytest.raises(UserError, match="render.normal_eps"):
        load_config(None, None, ["render.normal_eps=0"])
    assert load_config(None, None, ["field.grid.backend=cpu"]).field.grid.backend == "cpu"
    with pytest.raises(UserError, match="field.occupancy.dilate"):
        load_config(None, None, ["field.occupancy.dilate=-1"])
