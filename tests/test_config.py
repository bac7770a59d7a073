import dataclasses
import inspect
import typing

import pytest
from omegaconf import OmegaConf

from steindreamer.cameras import CameraConfig
from steindreamer.config import (Config, ExportConfig, GuidanceConfig, MeshConfig, SSDConfig, TrainConfig, VSDConfig,
                                 config_from_saved, load_config, presets, to_yaml, from_yaml_text)
from steindreamer.errors import UserError
from steindreamer.field.hashgrid import HashGridConfig
from steindreamer.field.nerf import BackgroundConfig, FieldConfig
from steindreamer.render.occupancy import OccupancyConfig
from steindreamer.render.shading import ShadingConfig
from steindreamer.render.volume import RenderConfig


@pytest.mark.parametrize("name", ["toy", "dreamfusion", "prolificdreamer", "steindreamer"])
def test_presets_load_validate_and_round_trip(name):
    assert name in presets()
    cfg = load_config(name)
    assert from_yaml_text(to_yaml(cfg)) == cfg


def test_presets_carry_the_published_settings():
    assert load_config("dreamfusion").guidance.engine == "sds" and load_config("dreamfusion").guidance.guidance_scale == 100
    vsd = load_config("prolificdreamer").guidance
    assert vsd.engine == "vsd" and vsd.guidance_scale == 7.5 and vsd.anneal_t_max == 0.5 and vsd.vsd.lora_rank == 4
    assert load_config("steindreamer").guidance.engine == "ssd"


def test_toy_preset_matches_the_world_it_was_trained_on():
    from steindreamer.toy.world import AMBIENT, LIGHT_DIR, TOY_CAMERA, TOY_RESOLUTION

    cfg = load_config("toy")
    for key in ("distance", "fov", "azimuth"):
        assert tuple(getattr(cfg.camera, key)) == tuple(getattr(TOY_CAMERA, key))
    # the world's elevations and more from above (the torus' hole, the tops)
    assert cfg.camera.elevation[0] == TOY_CAMERA.elevation[0] and cfg.camera.elevation[1] > TOY_CAMERA.elevation[1]
    assert cfg.render.resolution == TOY_RESOLUTION and cfg.background.kind == "white"
    assert tuple(cfg.shading.light_dir) == tuple(LIGHT_DIR) and cfg.shading.ambient == AMBIENT


def test_short_keys_and_overrides():
    cfg = load_config("toy", None, ["steps=7", "seed=3", "engine=ssd", "resolution=64", "model=/x", "depth_model=/y", "camera.fov=[30,40]"])
    assert (cfg.train.steps, cfg.train.seed, cfg.guidance.engine, cfg.render.resolution) == (7, 3, "ssd", 64)
    assert (cfg.guidance.model, cfg.guidance.ssd.depth_model, cfg.camera.fov) == ("/x", "/y", (30.0, 40.0))
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


def _literal_fields(cls=Config, prefix=""):
    """(dotted key, allowed values, is a list) of every Literal field in the config tree."""
    for f in dataclasses.fields(cls):
        hint = typing.get_type_hints(cls)[f.name]
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hint):
            yield from _literal_fields(hint, key + ".")
        elif typing.get_origin(hint) is typing.Literal:
            yield key, typing.get_args(hint), False
        elif typing.get_origin(hint) is list and typing.get_origin(typing.get_args(hint)[0]) is typing.Literal:
            yield key, typing.get_args(typing.get_args(hint)[0]), True


LITERALS = list(_literal_fields())


def test_the_choice_fields_are_literals():
    keys = {k for k, _, _ in LITERALS}
    assert keys == {"field.grid.backend", "background.kind", "render.backend", "render.normals", "shading.light",
                    "guidance.engine", "guidance.weighting", "guidance.ssd.baseline", "guidance.ssd.mu_shape", "guidance.ssd.stein_form",
                    "guidance.noise.t_sampling", "guidance.vsd.divergence", "camera.sampling",
                    "mesh.threshold_rule", "export.formats"}


@pytest.mark.parametrize("key,allowed,is_list", LITERALS, ids=[k for k, _, _ in LITERALS])
def test_every_literal_field_rejects_a_value_outside_its_set_in_one_line(key, allowed, is_list):
    bad = "[bogus]" if is_list else "bogus"
    with pytest.raises(UserError) as err:
        load_config(None, None, [f"{key}={bad}"])
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"invalid config: {key}") and "bogus" in msg and all(a in msg for a in allowed)
    for value in allowed:  # and takes each value of its set
        cfg = load_config(None, None, [f"{key}=[{value}]" if is_list else f"{key}={value}"])
        got = OmegaConf.select(OmegaConf.structured(cfg), key)
        assert (list(got) == [value]) if is_list else (got == value)


def test_choice_sets_are_written_once():
    from steindreamer.guidance.config import ENGINES
    from steindreamer.guidance.stein import MU_SHAPES

    assert ENGINES == ("sds", "vsd", "ssd") and MU_SHAPES == ("scalar", "channel", "pixel")
    assert dict((k, a) for k, a, _ in LITERALS)["guidance.ssd.mu_shape"] == MU_SHAPES


@pytest.mark.parametrize("override,key", [
    ("render.resolution=12", "render.resolution"),
    ("camera.fov=[10,190]", "camera.fov"),
    ("camera.distance=[2,1]", "camera.distance"),
    ("field.bound=0", "field.bound/blob_radius"),
    ("field.grid.log2_table=30", "field.grid.log2_table"),
    ("field.occupancy.resolution=4", "field.occupancy.resolution"),
    ("background.random_p=2", "background.random_p"),
    ("shading.light_dir=[0,0,0]", "shading.light_dir"),
    ("guidance.t_min=0.99", "guidance.t_min/t_max"),
    ("guidance.ssd.mu_decay=1", "guidance.ssd.mu_decay"),
    ("guidance.vsd.pose_drop_p=1.5", "guidance.vsd.pose_drop_p"),
    ("train.restore_lr_factor=0", "train.restore_lr_factor"),
    ("train.device=tpu", "train.device"),
    ("mesh.target_faces=5", "mesh.target_faces"),
    ("export.texture_size=8", "export.texture_size"),
    ("export.formats=[]", "export.formats"),
    ("mesh.t_max=0.01", "mesh.t_max"),  # across components: Config.check
])
def test_each_component_check_catches_a_bad_value(override, key):
    with pytest.raises(UserError, match=f"^invalid config: {key} must be "):
        load_config(None, None, [override])


@pytest.mark.parametrize("component,changes,key", [
    (CameraConfig, {"fov": (10.0, 190.0)}, "camera.fov"),
    (HashGridConfig, {"base_res": 64, "max_res": 32}, "field.grid.base_res/max_res"),
    (HashGridConfig, {"backend": "cuda"}, "field.grid.backend"),  # built in Python: no OmegaConf in the way
    (OccupancyConfig, {"dilate": 5}, "field.occupancy.dilate"),
    (FieldConfig, {"blob_radius": 0.0}, "field.bound/blob_radius"),
    (BackgroundConfig, {"kind": "grey"}, "background.kind"),
    (RenderConfig, {"samples": 1}, "render.samples"),
    (ShadingConfig, {"light": "sun"}, "shading.light"),
    (SSDConfig, {"baseline": "flat"}, "guidance.ssd.baseline"),
    (VSDConfig, {"lora_rank": 0}, "guidance.vsd.lora_rank"),
    (GuidanceConfig, {"weighting": "snr"}, "guidance.weighting"),
    (TrainConfig, {"batch_size": 0}, "train.batch_size"),
    (MeshConfig, {"grid_resolution": 8}, "mesh.grid_resolution"),
    (ExportConfig, {"formats": ["fbx"]}, "export.formats"),
])
def test_component_check_methods_name_their_key(component, changes, key):
    component().check()  # the defaults pass
    with pytest.raises(UserError, match=f"^invalid config: {key} must be "):
        component(**changes).check()
    prefix = inspect.signature(component.check).parameters["key"].default  # where it sits in Config
    assert key.startswith(prefix + ".")
    with pytest.raises(UserError, match=f"^invalid config: elsewhere.{key[len(prefix) + 1:]} must be "):
        component(**changes).check("elsewhere")  # the key it is given leads the message


def test_engine_settings_are_nested_and_the_flat_keys_are_unknown():
    cfg = load_config(None, None, ["guidance.ssd.baseline=normal", "guidance.ssd.keep_sds_cv=false", "guidance.ssd.mu_shape=pixel",
                                   "guidance.vsd.lora_rank=8", "guidance.vsd.lora_lr=0.001", "depth_model=X"])
    assert (cfg.guidance.ssd.baseline, cfg.guidance.ssd.keep_sds_cv, cfg.guidance.ssd.mu_shape) == ("normal", False, "pixel")
    assert (cfg.guidance.vsd.lora_rank, cfg.guidance.vsd.lora_lr, cfg.guidance.ssd.depth_model) == (8, 0.001, "X")
    for flat, nested in [("guidance.baseline=normal", "guidance.ssd.baseline"), ("guidance.depth_model=X", "guidance.ssd.depth_model"),
                         ("guidance.keep_sds_cv=false", "guidance.ssd.keep_sds_cv"), ("guidance.lora_rank=8", "guidance.vsd.lora_rank")]:
        key = flat.split("=")[0]
        with pytest.raises(UserError) as err:
            load_config(None, None, [flat])
        assert str(err.value) == f"invalid config: {key}: Key '{key[9:]}' not in 'GuidanceConfig' (it is {nested})"
    assert from_yaml_text(to_yaml(cfg)) == cfg  # the nested shape round-trips


def test_defaults_are_unchanged_by_the_split():
    g = GuidanceConfig()
    assert (g.ssd.depth_model, g.ssd.baseline, g.ssd.mu_shape, g.ssd.mu_decay, g.ssd.mu_init, g.ssd.keep_sds_cv) == \
        ("builtin", "depth", "scalar", 0.99, 1.0, True)
    assert (g.vsd.lora_rank, g.vsd.lora_lr, g.vsd.pose_drop_p) == (4, 1e-4, 0.1)
    assert (g.engine, g.weighting, RenderConfig().backend, HashGridConfig().backend, RenderConfig().normals) == \
        ("sds", "sigma2", "auto", "auto", "surface")


@pytest.mark.parametrize("preset", ["toy", "steindreamer"])
def test_saved_config_plus_overrides_equals_load_config(preset):
    overrides = ["steps=5", "guidance.ssd.baseline=normal", "depth_model=/d", "camera.fov=[30,40]", "render.normals=samples"]
    saved = to_yaml(load_config(preset))
    assert config_from_saved(saved, overrides) == load_config(preset, None, overrides)
    assert config_from_saved(saved) == from_yaml_text(saved) == load_config(preset)


def test_saved_config_keeps_its_own_values_under_the_overrides():
    saved = to_yaml(load_config("toy", None, ["guidance.t_min=0.3", "guidance.anneal_step=-1", "mesh.t_max=0.4"]))
    cfg = config_from_saved(saved, ["guidance.t_max=0.5"])
    assert (cfg.guidance.t_min, cfg.guidance.t_max, cfg.mesh.t_max) == (0.3, 0.5, 0.4)


@pytest.mark.parametrize("override,match", [
    ("guidance.baseline=normal", r"^invalid config: guidance\.baseline: Key 'baseline' not in 'GuidanceConfig'"),
    ("render.backend=optix", r"^invalid config: render\.backend: Invalid value 'optix'"),
    ("guidance.t_min=0.99", r"^invalid config: guidance\.t_min/t_max must be "),
    ("steps", r"^override 'steps' is not key=value$"),
])
def test_a_bad_override_on_saved_text_is_a_user_error(override, match):
    with pytest.raises(UserError, match=match):
        config_from_saved(to_yaml(load_config("toy")), [override])


def test_bad_saved_text_is_a_one_line_user_error():
    for text in ("render: {backend: optix}\n", "nope: 1\n", "render: [1\n"):
        with pytest.raises(UserError, match="^invalid saved config: ") as err:
            config_from_saved(text, ["steps=1"])
        assert "\n" not in str(err.value)


def test_runs_saved_before_the_engine_split_still_read():
    data = OmegaConf.to_container(OmegaConf.structured(load_config("toy")))
    g = data["guidance"]
    g.update(g.pop("ssd"), **g.pop("vsd"))  # the flat shape of config.yaml files written before
    g.update(depth_model="/old-depth", baseline="normal", lora_rank=8)
    cfg = from_yaml_text(OmegaConf.to_yaml(data))
    assert (cfg.guidance.ssd.depth_model, cfg.guidance.ssd.baseline, cfg.guidance.vsd.lora_rank) == ("/old-depth", "normal", 8)
