"""Pictures of a run's numbers from metrics.jsonl: loss.png and variance.png (with mu for SSD)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .fsio import atomic_save


def read_metrics(path: Path) -> list[dict]:
    rows = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by a crash
    return rows


def _smooth(y: np.ndarray, k: int) -> np.ndarray:
    if len(y) < k or k <= 1:
        return y
    return np.convolve(y, np.ones(k) / k, mode="valid")


def plot_run(run_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    rows = read_metrics(run_dir / "metrics.jsonl")
    written = []
    if not rows:
        return written
    steps = np.array([r["step"] for r in rows])
    loss = np.array([r.get("loss", np.nan) for r in rows], dtype=float)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, loss, alpha=0.3, label="loss")
    k = max(1, len(loss) // 50)
    ax.plot(steps[k - 1:] if k > 1 and len(loss) >= k else steps, _smooth(loss, k), label=f"mean of {k}")
    ax.set_xlabel("step"), ax.set_ylabel("0.5 |G|^2"), ax.set_yscale("log"), ax.legend(), ax.set_title(rows[-1].get("engine", ""))
    written.append(_save(fig, run_dir / "loss.png"))
    var = [(r["step"], r["variance"]) for r in rows if "variance" in r]
    mu = [(r["step"], r["mu"]) for r in rows if "mu" in r]
    if var:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(*zip(*var), "o-", label="Var(G) per element")
        ax.set_xlabel("step"), ax.set_ylabel("variance"), ax.set_yscale("log"), ax.set_title(f"gradient variance ({rows[-1].get('engine', '')})")
        if mu:
            ax2 = ax.twinx()
            ax2.plot(*zip(*mu), color="tab:red", alpha=0.6, label="mu")
            ax2.set_ylabel("mu (mean)")
        written.append(_save(fig, run_dir / "variance.png"))
    plt.close("all")
    return written


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    atomic_save(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    return path
