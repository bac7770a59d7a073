"""`summary.json` and a static `index.html` gallery for a batch folder. Both are rebuilt from the
ledger rows and the run folders after every item and written atomically, so a browser (or a
script) reading them mid-batch sees a complete file. Every path in them is relative to the batch
folder, so the folder can be moved, zipped or served as is."""
from __future__ import annotations

import html
import json
import os
import time
from pathlib import Path
from urllib.parse import quote

from ..fsio import atomic_write

PICTURES = ("turntable.mp4", "turntable.gif")
MODELS = ("model.glb", "mesh.obj")
SKIP_DIRS = {"checkpoints"}  # big, and never holds pictures or models


def run_files(run: Path) -> list[Path]:
    """Files of a run folder (one walk), shallowest first; checkpoints/ and hidden files skipped.
    Export stages may write into the run root or a sub-folder (renders/, export/)."""
    found = []
    for folder, dirs, files in os.walk(run):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.startswith("."))
        found += [Path(folder) / f for f in sorted(files) if not f.startswith(".")]
    return sorted(found, key=lambda p: (len(p.parts), str(p)))


def _find(files: list[Path], name: str) -> Path | None:
    return next((p for p in files if p.name == name), None)


def picture(run: Path, files: list[Path] | None = None, still: bool = False) -> Path | None:
    """The turntable video/GIF, else the contact sheet, else the newest validation grid (`still`:
    skip the turntable, for a video's poster)."""
    files = run_files(run) if files is None else files
    for name in ((*PICTURES, "contact_sheet.png") if not still else ("contact_sheet.png",)):
        found = _find(files, name)
        if found:
            return found
    vals = sorted(p for p in files if p.parent == run / "renders" and p.name.startswith("val_") and p.suffix == ".png")
    return vals[-1] if vals else None  # names carry the zero-padded step: the last sorts newest


def read_result(run: Path) -> dict | None:
    try:
        return json.loads((run / "result.json").read_text())
    except (OSError, ValueError):
        return None  # not finished yet (or no pipeline result): no final metrics to show


def item_entry(batch_dir: Path, row: dict) -> dict:
    run = batch_dir / row["run_dir"]
    rel = lambda p: p.relative_to(batch_dir).as_posix() if p else None  # noqa: E731
    files = run_files(run)
    result = read_result(run) if row["status"] == "done" else None
    entry = {
        "prompt": row["prompt"], "seed": row["seed"], "status": row["status"], "run_dir": row["run_dir"],
        "overrides": json.loads(row["overrides"]), "attempts": row["attempts"], "started_at": row["started_at"],
        "ended_at": row["ended_at"], "seconds": row["seconds"], "resumed_from_step": row["resumed_from"],
        "worker": row["worker"], "error": row["error"], "picture": rel(picture(run, files)), "still": rel(picture(run, files, still=True)),
        "models": {name: rel(_find(files, name)) for name in MODELS if _find(files, name)},
        "log": row["log"], "in_prompts_file": row.get("in_prompts_file", True),
    }
    if result:
        entry["steps"] = result.get("steps")
        entry["engine"] = result.get("engine")
        entry["run_seconds"] = result.get("seconds")
        entry["metrics"] = result.get("final", {})
    return entry


def build_summary(batch_dir: Path, rows: list[dict], meta: dict, active: bool, cache: dict | None = None) -> dict:
    """`cache` keeps the entries of finished attempts (their run folders no longer change), so a
    batch of thousands does not walk every run folder after every item."""
    items = []
    for r in rows:
        key = (r["id"], r["status"], r["attempts"], r["ended_at"], r["log"], r.get("in_prompts_file"))
        if cache is not None and key in cache:
            items.append(cache[key])
            continue
        entry = item_entry(batch_dir, r)
        if cache is not None and r["status"] in ("done", "failed"):
            cache[key] = entry
        items.append(entry)
    counts = {s: sum(1 for i in items if i["status"] == s) for s in ("done", "failed", "running", "pending")}
    return {"updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "active": active, "counts": counts, "total": len(items),
            **meta, "items": items}


def write(batch_dir: Path, summary: dict) -> None:
    atomic_write(batch_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    atomic_write(batch_dir / "index.html", render_html(summary))


def _url(rel: str) -> str:
    return html.escape(quote(rel), quote=True)


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return html.escape(str(value))


def _card(i: int, item: dict) -> str:
    esc = html.escape
    pic = item["picture"]
    if pic is None:
        media = f'<div class="nopic">{"no picture" if item["status"] == "failed" else "no picture yet"}</div>'
    elif pic.endswith(".mp4"):
        poster = f' poster="{_url(item["still"])}"' if item.get("still") else ""  # shown where the browser cannot play it
        media = f'<video src="{_url(pic)}"{poster} autoplay loop muted playsinline></video>'
    else:
        # A broken link marks the card, so a missing picture is visible (and testable).
        media = f'<img src="{_url(pic)}" alt="{esc(item["prompt"], quote=True)}" onerror="this.closest(\'figure\').classList.add(\'broken\')">'
    rows = [("seed", item["seed"]), ("attempts", item["attempts"])]
    if item.get("steps") is not None:
        rows.append(("steps", item["steps"]))
    if item["seconds"] is not None:
        rows.append(("seconds", round(item["seconds"], 1)))
    rows += [(k, v) for k, v in sorted(item.get("metrics", {}).items())]
    table = "".join(f"<tr><th>{esc(str(k))}</th><td>{_fmt(v)}</td></tr>" for k, v in rows)
    links = [f'<a href="{_url(path)}">{esc(name)}</a>' for name, path in item["models"].items()]
    links.append(f'<a href="{_url(item["run_dir"])}/">run folder</a>')
    if item.get("log"):
        links.append(f'<a href="{_url(item["log"])}">log</a>')
    error = f'<pre class="error">{esc(item["error"])}</pre>' if item["status"] == "failed" and item["error"] else ""
    return (f'<figure class="item {esc(item["status"])}" id="item-{i}" data-status="{esc(item["status"])}">'
            f'{media}<figcaption><span class="status">{esc(item["status"])}</span> <q class="prompt">{esc(item["prompt"])}</q>'
            f'<table>{table}</table>{error}<p class="links">{" · ".join(links)}</p></figcaption></figure>')


def render_html(summary: dict) -> str:
    c = summary["counts"]
    head = f'{summary["total"]} prompt{"" if summary["total"] == 1 else "s"}: {c["done"]} done, {c["failed"]} failed, {c["running"]} running, {c["pending"]} pending'
    refresh = '<meta http-equiv="refresh" content="30">' if summary["active"] else ""  # watch a live batch
    cards = "\n".join(_card(i, item) for i, item in enumerate(summary["items"]))
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">{refresh}
<title>steindreamer batch: {html.escape(head)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5rem; background: #fafafa; color: #222; }}
main {{ display: grid; grid-template-columns: repeat(auto-fill, minmax(280px, 1fr)); gap: 1rem; }}
figure {{ margin: 0; background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: .6rem; }}
figure img, figure video {{ width: 100%; image-rendering: pixelated; background: #eee; }}
figure.failed {{ border-color: #c33; }} figure.broken img {{ display: none; }}
.status {{ font-weight: bold; text-transform: uppercase; font-size: .75rem; }}
.done .status {{ color: #2a7; }} .failed .status {{ color: #c33; }} .running .status {{ color: #c80; }}
.nopic {{ height: 120px; display: flex; align-items: center; justify-content: center; background: #eee; color: #888; }}
table {{ font-size: .8rem; border-collapse: collapse; margin: .4rem 0; }} th {{ text-align: left; padding-right: 1em; font-weight: normal; color: #666; }}
pre.error {{ white-space: pre-wrap; color: #c33; font-size: .8rem; }}
</style></head>
<body><h1>steindreamer batch</h1>
<p id="counts">{html.escape(head)} · updated {html.escape(summary["updated"])}</p>
<main>
{cards}
</main></body></html>
"""
