"""Offline-first model loading (guidance/locate.py) and what the machine cannot serve, refused at
config time. The hub is pointed at addresses on loopback: a closed port (refused at once), a socket
that accepts and never answers (a black hole: the probe's timeout), and tiny HTTP servers that
answer 404 or 200. Each failing command must end in one line, exit 2, in under 15 s, having made
nothing."""
import http.server
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from steindreamer.errors import UserError
from steindreamer.guidance import locate

from test_cli import FAST

LIMIT_S = 15.0


@pytest.fixture(scope="module")
def black_hole():
    """An endpoint whose connections are accepted by the kernel and never answered."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    sock.close()


@pytest.fixture(scope="module")
def closed_port():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now: connections are refused
    return f"http://127.0.0.1:{port}"


def _server(code: int):
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self):  # noqa: N802 - the http.server API
            self.send_response(code)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def _offline_env(tmp_path, endpoint: str, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_CACHE")}
    env.update(HF_ENDPOINT=endpoint, HF_HOME=str(tmp_path / "hf"), STEINDREAMER_CACHE=str(tmp_path / "cache"), **extra)
    return env


def _cli(tmp_path, env, *argv):
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "steindreamer", *argv], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=120)
    return proc, time.perf_counter() - start


def _assert_refused(proc, seconds, *words):
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]
    for word in words:
        assert word in lines[0], lines[0]
    assert seconds < LIMIT_S, seconds


@pytest.mark.parametrize("where", ["black_hole", "closed_port"])
def test_default_command_without_network_is_one_line_in_seconds(where, request, tmp_path):
    """README's main command for real models (default preset: SD 2.1 and the SSD depth model) on a
    machine with nothing cached and no network."""
    env = _offline_env(tmp_path, request.getfixturevalue(where))
    proc, seconds = _cli(tmp_path, env, "generate", "a red cube")
    _assert_refused(proc, seconds, "diffusion model 'stabilityai/stable-diffusion-2-1-base'",
                    "did not answer in 5 s" if where == "black_hole" else "unreachable", "model=builtin")
    assert not (tmp_path / "outputs").exists()


def test_missing_depth_model_is_named_before_the_diffusion_model_loads(tiny_pixel_model, black_hole, tmp_path):
    """A local diffusion model and a depth model that cannot be had: refused before the (large)
    diffusion model loads, i.e. in seconds, naming the depth model."""
    env = _offline_env(tmp_path, black_hole)
    proc, seconds = _cli(tmp_path, env, "generate", "a red cube", f"model={tiny_pixel_model}")
    _assert_refused(proc, seconds, "depth model 'Intel/dpt-hybrid-midas'", "depth_model=/path/to/folder")
    proc, seconds = _cli(tmp_path, env, "generate", "a red cube", "--preset", "toy", "engine=ssd", "depth_model=org/no-depth")
    _assert_refused(proc, seconds, "depth model 'org/no-depth'", "hf download org/no-depth")


def test_batch_with_an_unreachable_model_is_one_line(black_hole, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cube\na blue sphere\n")
    env = _offline_env(tmp_path, black_hole)
    proc, seconds = _cli(tmp_path, env, "batch", str(prompts), "--preset", "toy", "model=org/no-model", "--out", str(tmp_path / "b"))
    _assert_refused(proc, seconds, "diffusion model 'org/no-model'")
    assert not (tmp_path / "b").exists()


def test_hf_hub_offline_is_not_asked(black_hole, tmp_path):
    env = _offline_env(tmp_path, black_hole, HF_HUB_OFFLINE="1")
    proc, seconds = _cli(tmp_path, env, "generate", "a red cube", "--preset", "toy", "model=org/no-model")
    _assert_refused(proc, seconds, "was not asked (HF_HUB_OFFLINE is set)")
    assert seconds < LIMIT_S / 2


def _hub_cache_copy(hub: Path, repo_id: str, folder: Path) -> Path:
    """The hub library's cache layout: models--org--name/{refs/main, snapshots/<commit>/...}."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = hub / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(folder, repo / "snapshots" / commit)
    return repo / "snapshots" / commit


def test_cached_hub_model_runs_with_no_network(tiny_pixel_model, closed_port, tmp_path):
    """A hub id already in the hub's cache is loaded from there: the run finishes though the hub
    refuses every connection."""
    _hub_cache_copy(tmp_path / "hf" / "hub", "org/tiny", Path(tiny_pixel_model))
    env = _offline_env(tmp_path, closed_port)
    proc, _ = _cli(tmp_path, env, "generate", "a red cube", "--out", str(tmp_path / "run"), "--preset", "toy",
                   "model=org/tiny", "steps=2", *FAST)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "run" / "model.glb").is_file()


def test_locate_order_project_cache_hub_cache_then_probe(tiny_pixel_model, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # read now: the hub library read conftest's "1" at its import
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    missing, server404 = _server(404)
    present, server200 = _server(200)
    try:
        monkeypatch.setenv("HF_ENDPOINT", server404)
        with pytest.raises(UserError, match=r"the hub \(http://127.0.0.1:\d+\) has no model of that name \(HTTP 404\)"):
            locate.locate_model("org/tiny", "diffusion", str(tmp_path / "cache"))
        snapshot = _hub_cache_copy(tmp_path / "hf" / "hub", "org/tiny", Path(tiny_pixel_model))
        assert locate.locate_model("org/tiny", "diffusion", str(tmp_path / "cache")) == str(snapshot)
        own = tmp_path / "cache" / "models" / "org" / "tiny"
        shutil.copytree(tiny_pixel_model, own)
        assert locate.locate_model("org/tiny", "diffusion", str(tmp_path / "cache")) == str(own)  # the project's first
        monkeypatch.setenv("HF_ENDPOINT", server200)  # reachable and serving: the id goes to from_pretrained
        assert locate.locate_model("org/other", "diffusion", str(tmp_path / "cache")) == "org/other"
    finally:
        missing.shutdown()
        present.shutdown()
    assert locate.locate_model(str(tiny_pixel_model)) == str(Path(tiny_pixel_model).resolve())  # folders: no lookup


@pytest.mark.parametrize("override,key", [
    ("render.backend=nerfacc", "render.backend=nerfacc"),
    ("field.grid.backend=tcnn", "field.grid.backend=tcnn"),
    ("field.grid.backend=triton", "field.grid.backend=triton"),
    ("train.device=cuda", "train.device"),
])
def test_backend_this_machine_cannot_serve_is_refused_at_config_time(override, key, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CPU-only machine's refusals")
    proc, seconds = _cli(tmp_path, dict(os.environ), "generate", "a red cube", "--preset", "toy", override, "--out", str(tmp_path / "r"))
    _assert_refused(proc, seconds, key)
    assert not (tmp_path / "r").exists()


def test_backends_that_run_here_pass_the_check():
    from steindreamer.config import check_machine, load_config

    for override in ("render.backend=torch", "field.grid.backend=torch", "render.backend=auto", "train.device=cpu"):
        check_machine(load_config("toy", None, [override]))
