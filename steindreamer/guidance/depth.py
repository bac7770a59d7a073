"""Loads any transformers depth-estimation model (a folder, a hub id or the built-in one) as a
differentiable estimator for SSD's baselines."""
from __future__ import annotations

import torch

from ..errors import UserError
from .baselines import transformers_depth_estimator
from .locate import locate_model

# Metric-depth families: their output is inverted to disparity before correlating with the NeRF's.
_METRIC = {"zoedepth", "depth_pro", "glpn"}


def load_depth_estimator(name: str, device: torch.device, dtype: torch.dtype = torch.float32, cache_dir: str = ""):
    from transformers import AutoImageProcessor, AutoModelForDepthEstimation

    location = locate_model(name, "depth", cache_dir)
    try:
        # trust_remote_code stays off: nothing from a downloaded folder is executed.
        model = AutoModelForDepthEstimation.from_pretrained(location, dtype=dtype).to(device)
    except Exception as err:  # noqa: BLE001 - any failure is the user's folder or id
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"cannot load depth model '{name}': {first}") from None
    try:
        processor = AutoImageProcessor.from_pretrained(location)
    except Exception:  # noqa: BLE001 - a folder without a processor config uses the model's defaults
        processor = None
    metric = getattr(model.config, "model_type", "") in _METRIC
    # Traced on CPU only, where it was measured to pay (per-op overhead); GPU runs stay eager.
    return transformers_depth_estimator(model, processor, predicts_depth=metric, trace=device.type == "cpu")
