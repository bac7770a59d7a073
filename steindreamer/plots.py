"""Pictures of a run's numbers from metrics.jsonl: loss.png and variance.png (with mu for SSD)."""
from __future__ import annotations

import gc
import json
from pathlib import Path

import numpy as np

from .fsio import atomic_save


def read_columns(path: Path) -> dict:
    """The columns the plots draw, read line by line: {"step", "loss"} as arrays, "variance" and
    "mu" as (step, value) lists, "engine" of the last row. Only these numbers are kept, not a dict
    per row, so a long run's plot costs little memory even for a moment."""
    steps, loss, variance, mu, engine = [], [], [], [], ""
    if path.exists():
        with open(path) as f:
            for line in f:
                try:
                    r = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by a crash
                steps.append(r["step"])
                loss.append(r.get("loss", np.nan))
                if "variance" in r:
                    variance.append((r["step"], r["variance"]))
                if "mu" in r:
                    mu.append((r["step"], r["mu"]))
                engine = r.get("engine", engine)
    return {"step": np.array(steps), "loss": np.array(loss, dtype=float), "variance": variance, "mu": mu, "engine": engine}


def _smooth(y: np.ndarray, k: int) -> np.ndarray:
    if len(y) < k or k <= 1:
        return y
    return np.convolve(y, np.ones(k) / k, mode="valid")


def plot_run(run_dir: Path) -> list[Path]:
    run_dir = Path(run_dir)
    cols = read_columns(run_dir / "metrics.jsonl")
    steps, loss, engine = cols["step"], cols["loss"], cols["engine"]
    written = []
    if not len(steps):
        return written
    fig, ax = _figure()
    ax.plot(steps, loss, alpha=0.3, label="loss")
    k = max(1, len(loss) // 50)
    ax.plot(steps[k - 1:] if k > 1 and len(loss) >= k else steps, _smooth(loss, k), label=f"mean of {k}")
    ax.set_xlabel("step"), ax.set_ylabel("0.5 |G|^2"), ax.set_yscale("log"), ax.legend(), ax.set_title(engine)
    written.append(_save(fig, run_dir / "loss.png"))
    if cols["variance"]:
        fig, ax = _figure()
        ax.plot(*zip(*cols["variance"]), "o-", label="Var(G) per element")
        ax.set_xlabel("step"), ax.set_ylabel("variance"), ax.set_yscale("log"), ax.set_title(f"gradient variance ({engine})")
        if cols["mu"]:
            ax2 = ax.twinx()
            ax2.plot(*zip(*cols["mu"]), color="tab:red", alpha=0.6, label="mu")
            ax2.set_ylabel("mu (mean)")
        written.append(_save(fig, run_dir / "variance.png"))
    # A figure is a web of reference cycles: without a collection here each plot's figures waited for
    # the cyclic collector's rare full pass, and a long run's resident memory grew by ~5 MiB a plot
    # (benchmarks/memory_toy.json). A full pass costs ~75 ms, once per validation.
    gc.collect()
    return written


def _figure():
    # A bare Figure with an Agg canvas, not pyplot, whose global state a training process has no use for.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.5))
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    atomic_save(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    fig.clear()  # not redundant with the collection: without it 1.5 MiB a plot stays (the plots' test)
    return path
