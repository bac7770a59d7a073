"""Where a model's files are, found offline first: the built-in model, a local folder, or a hub id
("org/name") looked up in the hub's own cache and in the project's (`<cache>/models/org/name`).
Only a hub id found in neither is a network matter: the hub is asked once, with a short timeout and
no retries, whether it can serve it; if not, one line (a UserError) names the model, what was tried
and how to provide it. Without this, `from_pretrained` on a machine with no network retries every
file with backoff for minutes.

Respects HF_HUB_OFFLINE (no network try at all), HF_ENDPOINT, HF_HOME / HF_HUB_CACHE and the hub's
HF_HUB_ETAG_TIMEOUT (the probe's timeout when set; 5 s otherwise).
"""
from __future__ import annotations

import functools
import os
import re
import threading
import urllib.error
import urllib.request
from pathlib import Path

from ..errors import UserError

BUILTIN_DIR = Path(__file__).resolve().parent.parent / "builtin"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
PROBE_TIMEOUT_S = 5.0  # the hub library's own default (10 s) plus start-up would miss a 15 s answer


def resolve_model(name: str, kind: str = "diffusion") -> str:
    """`name` checked for form, without the network: the built-in model's folder, an existing folder,
    or a hub id (returned as is)."""
    name = name.strip()
    if name == "builtin":
        path = BUILTIN_DIR / kind
        if not (path / "config.json").exists() and not (path / "model_index.json").exists():
            raise UserError(f"the built-in {kind} model is not installed at {path}; train it with scripts/train_builtin.py")
        return str(path)
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path.resolve())
    if path.exists():
        raise UserError(f"model path is not a folder: {name}")
    if not _HUB_ID.match(name):  # anything that is not "org/name" was meant as a folder
        raise UserError(f"model folder not found: {name}")
    return name


def project_cache(configured: str = "") -> Path:
    """The project's cache folder: `guidance.cache_dir`, else $STEINDREAMER_CACHE, else ~/.cache/steindreamer."""
    return Path(configured or os.environ.get("STEINDREAMER_CACHE") or Path.home() / ".cache" / "steindreamer")


def _hub_settings() -> tuple[str, str, bool, float]:
    """(endpoint, hub cache folder, offline, probe timeout), read from the environment now (the hub
    library reads them once, at its import)."""
    from huggingface_hub import constants

    endpoint = os.environ.get("HF_ENDPOINT", constants.ENDPOINT).rstrip("/")
    cache = os.environ.get("HF_HUB_CACHE") or (os.path.join(os.environ["HF_HOME"], "hub") if os.environ.get("HF_HOME") else constants.HF_HUB_CACHE)
    flag = os.environ.get("HF_HUB_OFFLINE")
    offline = flag.strip().upper() in ("1", "ON", "YES", "TRUE") if flag is not None else constants.HF_HUB_OFFLINE
    try:
        timeout = float(os.environ.get("HF_HUB_ETAG_TIMEOUT") or PROBE_TIMEOUT_S)
    except ValueError:
        timeout = PROBE_TIMEOUT_S
    return endpoint, str(cache), offline, timeout


def _cached_snapshot(repo_id: str, hub_cache: str) -> str | None:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return snapshot_download(repo_id, cache_dir=hub_cache, local_files_only=True)
    except (LocalEntryNotFoundError, OSError, ValueError):
        return None


@functools.cache
def probe_hub(endpoint: str, repo_id: str, timeout: float) -> str | None:
    """None if the hub answers for `repo_id` (any answer but 404: a private or gated model is the
    loader's to authenticate), else why not, as the end of a sentence about the hub. One request; the whole probe, name
    lookup included, is bounded by `timeout` (a thread, since urllib's timeout does not cover DNS)."""
    outcome: list[str | None] = [f"did not answer in {timeout:g} s"]

    def ask() -> None:
        try:
            with urllib.request.urlopen(urllib.request.Request(f"{endpoint}/api/models/{repo_id}", method="HEAD"), timeout=timeout):
                outcome[0] = None
        except urllib.error.HTTPError as err:
            outcome[0] = "has no model of that name (HTTP 404)" if err.code == 404 else None
        except Exception as err:  # noqa: BLE001 - refused, unresolvable, TLS...: all "unreachable"
            reason = getattr(err, "reason", None) or err
            if not isinstance(reason, TimeoutError):  # a timeout keeps the default's words
                outcome[0] = f"is unreachable ({getattr(reason, 'strerror', None) or reason})"

    thread = threading.Thread(target=ask, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return outcome[0]


def locate_model(name: str, kind: str = "diffusion", cache_dir: str = "") -> str:
    """A location `from_pretrained` can load without waiting on a network that is not there: a local
    folder, or the hub id itself once the hub has answered for it. Raises UserError (one line) when
    the model cannot be had."""
    location = resolve_model(name, kind)
    if Path(location).is_dir():
        return location
    own = project_cache(cache_dir) / "models" / location
    if own.is_dir():
        return str(own)
    endpoint, hub_cache, offline, timeout = _hub_settings()
    snapshot = _cached_snapshot(location, hub_cache)
    if snapshot is not None:
        return snapshot
    reason = "was not asked (HF_HUB_OFFLINE is set)" if offline else probe_hub(endpoint, location, timeout)
    if reason is None:
        return location
    instead = ("model=/path/to/folder or model=builtin" if kind == "diffusion"
               else "depth_model=/path/to/folder or guidance.ssd.baseline=constant")
    raise UserError(f"{kind} model '{location}' is not in the hub cache ({hub_cache}) or {own}, and the hub ({endpoint}) "
                    f"{reason}; use {instead}, or download it where there is a network (`hf download {location}`) "
                    f"and copy it to {own}")


def required_models(guidance) -> list[tuple[str, str]]:
    """(name, kind) of every model a run with this GuidanceConfig loads."""
    models = [(guidance.model, "diffusion")]
    if guidance.engine == "ssd" and guidance.ssd.baseline != "constant":
        models.append((guidance.ssd.depth_model, "depth"))
    return models


def locate_all(guidance) -> dict[str, str]:
    """locate_model for each of `required_models` ({kind: location}), before any of them loads. A
    misspelt folder is refused before any network question is asked."""
    models = required_models(guidance)
    for name, kind in models:
        resolve_model(name, kind)
    return {kind: locate_model(name, kind, guidance.cache_dir) for name, kind in models}
