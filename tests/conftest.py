import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("STEINDREAMER_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="session")
def tiny_latent_model(tmp_path_factory):
    from tiny_models import build_tiny_pipeline

    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny-latent"), latent=True)


@pytest.fixture(scope="session")
def tiny_pixel_model(tmp_path_factory):
    from tiny_models import build_tiny_pipeline

    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny-pixel"), latent=False, prediction_type="v_prediction")


@pytest.fixture(scope="session")
def tiny_depth_model(tmp_path_factory):
    from tiny_models import build_tiny_depth

    return build_tiny_depth(tmp_path_factory.mktemp("tiny-depth"))


@pytest.fixture(scope="session")
def khronos():
    """The Khronos glTF validator as `validate(path) -> report`; a test that needs it skips whole, at
    its start, where node or the npm package is missing."""
    node = shutil.which("node")
    tests = Path(__file__).parent
    if node is None:
        pytest.skip("glTF validation needs node (not on PATH)")
    if not (tests / "node_modules" / "gltf-validator").is_dir():
        pytest.skip("glTF validation needs the npm package: run `npm ci --prefix tests` (or `npm install --prefix tests`)")

    def validate(path):
        proc = subprocess.run([node, str(tests / "gltf_validate.js"), str(path)], capture_output=True, text=True, timeout=120)
        assert proc.returncode in (0, 1), proc.stderr
        return json.loads(proc.stdout.strip().splitlines()[-1])

    return validate
