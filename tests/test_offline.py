"""Offline-first model loading (guidance/locate.py) and what the machine cannot serve, refused at
config time. The hub is pointed at addresses on loopback: a socket that accepts and never answers (a
black hole: the probe's timeout; README's command as a user runs it, in a subprocess), a closed port
(refused at once; the other commands, in-process), and tiny HTTP servers that answer 404 or 200.
Each failing command must end in one line, exit 2, in under 15 s, having made nothing."""
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

from steindreamer.cli import main
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
            return  # no request lines on the test's stderr

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


def test_default_command_without_network_is_one_line_in_seconds(black_hole, tmp_path):
    """README's main command for real models (default preset: SD 2.1 and the SSD depth model), as a
    user runs it, on a machine with nothing cached and a hub that never answers."""
    env = _offline_env(tmp_path, black_hole)
    proc, seconds = _cli(tmp_path, env, "generate", "a red cube")
    _assert_refused(proc, seconds, "diffusion model 'stabilityai/stable-diffusion-2-1-base'", "did not answer in 5 s",
                    "model=builtin", "hf download stabilityai/stable-diffusion-2-1-base")
    assert not (tmp_path / "outputs").exists()


@pytest.fixture
def no_network(closed_port, tmp_path, monkeypatch):
    """This process's hub: nothing cached, every connection refused, HF_HUB_OFFLINE not set."""
    for key, value in _offline_env(tmp_path, closed_port).items():
        if os.environ.get(key) != value:
            monkeypatch.setenv(key, value)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # read now: the hub library read conftest's "1" at its import
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    return tmp_path


def _refused_in_process(capsys, argv, *words):
    start = time.perf_counter()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    for word in words:
        assert word in err, err
    assert time.perf_counter() - start < LIMIT_S


def test_missing_depth_model_is_named_before_the_diffusion_model_loads(tiny_pixel_model, no_network, capsys, monkeypatch):
    """A local diffusion model and a depth model that cannot be had: refused before the (large)
    diffusion model loads, naming the depth model."""
    import steindreamer.pipeline

    monkeypatch.setattr(steindreamer.pipeline, "DiffusionGuidance", None)  # a load would fail loudly
    out = no_network / "r"
    _refused_in_process(capsys, ["generate", "a red cube", "--out", str(out), f"model={tiny_pixel_model}"],
                        "depth model 'Intel/dpt-hybrid-midas'", "is unreachable", "depth_model=/path/to/folder")
    _refused_in_process(capsys, ["generate", "a red cube", "--out", str(out), "--preset", "toy", "engine=ssd", "depth_model=org/no-depth"],
                        "depth model 'org/no-depth'", "hf download org/no-depth")
    assert not out.exists()


def test_batch_with_an_unreachable_model_is_one_line(no_network, capsys):
    prompts = no_network / "prompts.txt"
    prompts.write_text("a red cube\na blue sphere\n")
    _refused_in_process(capsys, ["batch", str(prompts), "--preset", "toy", "model=org/no-model", "--out", str(no_network / "b")],
                        "diffusion model 'org/no-model'")
    assert not (no_network / "b").exists()


def test_hf_hub_offline_is_not_asked(no_network, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _refused_in_process(capsys, ["generate", "a red cube", "--preset", "toy", "model=org/no-model", "--out", str(no_network / "r")],
                        "was not asked (HF_HUB_OFFLINE is set)")


def _hub_cache_copy(hub: Path, repo_id: str, folder: Path) -> Path:
    """The hub library's cache layout: models--org--name/{refs/main, snapshots/<commit>/...}."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = hub / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(folder, repo / "snapshots" / commit)
    return repo / "snapshots" / commit


def test_cached_hub_model_runs_with_no_network(tiny_pixel_model, no_network):
    """A hub id already in the hub's cache is loaded from there: the run finishes though the hub
    refuses every connection."""
    _hub_cache_copy(no_network / "hf" / "hub", "org/tiny", Path(tiny_pixel_model))
    out = no_network / "run"
    assert main(["generate", "a red cube", "--out", str(out), "--preset", "toy", "model=org/tiny", "steps=2", *FAST]) == 0
    assert (out / "model.glb").is_file()


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
def test_backend_this_machine_cannot_serve_is_refused_at_config_time(override, key, tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CPU-only machine's refusals")
    _refused_in_process(capsys, ["generate", "a red cube", "--preset", "toy", override, "--out", str(tmp_path / "r")], key)
    assert not (tmp_path / "r").exists()


def test_backends_that_run_here_pass_the_check():
    from steindreamer.config import check_machine, load_config

    for override in ("render.backend=torch", "field.grid.backend=torch", "render.backend=auto", "train.device=cpu"):
        check_machine(load_config("toy", None, [override]))
