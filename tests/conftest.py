import os
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
