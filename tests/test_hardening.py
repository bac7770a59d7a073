"""Damaged checkpoints, hostile prompts and config values (kills and resumes: test_faults.py and the
torture test in test_bench_scripts.py)."""
import re

import pytest
from hypothesis import given, settings, strategies as st

from steindreamer.cli import main
from steindreamer.config import load_config
from steindreamer.errors import UserError
from steindreamer.fsio import slugify

from test_cli import FAST


def _gen(model, out, *extra):
    return ["generate", "a red cube", "--out", str(out), f"model={model}", *FAST, "train.variance_every=0", *extra]


def test_damaged_checkpoint_and_foreign_config_are_refused(tiny_latent_model, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_gen(tiny_latent_model, out, "steps=2")) == 0
    ckpt = out / "checkpoints" / "step_0000002.pt"
    good = ckpt.read_bytes()
    ckpt.write_bytes(good[: len(good) // 2])  # truncated by something outside our control
    assert main(["generate", "a red cube", "--out", str(out), "--resume", "steps=4", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "checkpoint" in err[-1] and err[-1].startswith("error:")
    assert ckpt.read_bytes() == good[: len(good) // 2]  # nothing overwritten
    ckpt.write_bytes(good)
    # The same folder resumed with a different field config: refused, checkpoint untouched.
    # Resumed with a different field config (from the run's own file plus a change): refused.
    assert main(["generate", "a red cube", "--out", str(out), "--resume", "--config", str(out / "config.yaml"), "field.hidden=16", "steps=4", "--quiet"]) == 2
    assert "different prompt or config" in capsys.readouterr().err
    assert ckpt.read_bytes() == good


@pytest.mark.parametrize("prompt, message", [
    ("x" * 10_000, "characters long"),
    ("a red\x07 cube", "control characters"),
    ("\t\n  ", "prompt is empty"),
])
def test_hostile_prompts(prompt, message, tiny_latent_model, tmp_path, capsys):
    assert main(["generate", prompt, "--out", str(tmp_path / "r"), f"model={tiny_latent_model}", *FAST, "steps=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def test_prompt_with_path_separators_stays_in_outputs(tiny_latent_model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["generate", "../../etc/a red cube", f"model={tiny_latent_model}", *FAST, "steps=1"]) == 0
    runs = list((tmp_path / "outputs").iterdir())
    assert len(runs) == 1 and runs[0].name == "etc-a-red-cube-0"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["outputs"]


@given(st.text(max_size=300))
@settings(max_examples=300, deadline=None)
def test_slug_is_always_a_safe_folder_name(text):
    slug = slugify(text)
    assert re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", slug) and len(slug) <= 60
    assert ".." not in slug and "/" not in slug


KEYS = ["steps", "resolution", "seed", "engine", "guidance.t_min", "guidance.t_max", "render.samples", "camera.fov",
        "field.grid.levels", "train.batch_size", "background.kind", "nope", "field.nope", "guidance.guidance_scale"]
VALUES = st.one_of(st.integers(-10**6, 10**6).map(str), st.floats(allow_nan=True, allow_infinity=True).map(str),
                   st.text(max_size=12).filter(lambda v: "\n" not in v and "$" not in v), st.sampled_from(["[1,2]", "[3]", "{a: 1}", "sds", "ssd", ""]))


@given(st.lists(st.tuples(st.sampled_from(KEYS), VALUES), max_size=4))
@settings(max_examples=300, deadline=None)
def test_config_parser_accepts_or_rejects_with_one_line(pairs):
    try:
        cfg = load_config(None, None, [f"{k}={v}" for k, v in pairs])
    except UserError as err:
        assert "\n" not in str(err) and str(err)
        return
    assert cfg.train.steps >= 0 and cfg.render.resolution % 8 == 0 and cfg.guidance.t_min < cfg.guidance.t_max
