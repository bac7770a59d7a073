"""NaN/Inf handling: bad steps are skipped, N in a row restore the last good state with a lower
learning rate, and a run that cannot recover stops with one line and its last good checkpoint."""
import json

import torch

from steindreamer.cli import main
from steindreamer.guidance.distill import Distiller

from test_cli import FAST


def _poison(monkeypatch, bad_calls):
    calls = {"n": 0}
    original = Distiller.gradient

    def gradient(self, *args, **kwargs):
        grad, logs = original(self, *args, **kwargs)
        calls["n"] += 1
        if bad_calls(calls["n"]):
            grad = grad * float("nan")
            logs["finite"] = False
        return grad, logs

    monkeypatch.setattr(Distiller, "gradient", gradient)


def _args(model, out, *extra):
    return ["generate", "a red cube", "--out", str(out), f"model={model}", *FAST, "train.variance_every=0",
            "train.nan_patience=2", *extra]


def test_recovers_with_lower_learning_rate(tiny_latent_model, tmp_path, monkeypatch):
    _poison(monkeypatch, lambda n: n in (3, 4))
    out = tmp_path / "run"
    assert main(_args(tiny_latent_model, out, "steps=6")) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in rows] == [False, False, True, True, False, False]
    assert "restored the state of step 2" in rows[3]["recovery"]
    state = torch.load(out / "checkpoints" / "step_0000006.pt", weights_only=True)
    lrs = {g["name"]: g["lr"] for g in state["optimizer"]["param_groups"]}
    assert lrs["grid"] == 0.01 * 0.5 and all(torch.isfinite(v).all() for v in state["field"].values())


def test_unrecoverable_run_stops_with_one_line_and_keeps_checkpoint(tiny_latent_model, tmp_path, monkeypatch, capsys):
    _poison(monkeypatch, lambda n: n > 2)
    out = tmp_path / "run"
    assert main(_args(tiny_latent_model, out, "steps=20", "train.max_restores=1")) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: training diverged")
    files = sorted(p.name for p in (out / "checkpoints").iterdir())
    kept = int(err.rsplit("step ", 1)[1].rstrip(")"))
    assert files[-1] == f"step_{kept:07d}.pt"  # the checkpoint the message names is the newest on disk
    state = torch.load(out / "checkpoints" / files[-1], weights_only=True)
    assert all(torch.isfinite(v).all() for v in state["field"].values())
