"""The driver: hands the ledger's unfinished items to an executor, records each result, rebuilds
the gallery and shows progress."""
from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path

from .executors import LocalExecutor
from .jobs import Job, latest_checkpoint_step
from .ledger import Ledger
from .prompts import Item

POLL_S = 0.5


class Runner:
    def __init__(self, batch_dir: Path, ledger: Ledger, items: list[Item], settings: dict, executor, retry_failed: bool, quiet: bool):
        self.batch_dir = Path(batch_dir).resolve()
        self.ledger, self.items, self.settings = ledger, items, settings
        self.source, self.overrides = settings["source"], settings["overrides"]
        self.executor, self.retry_failed, self.quiet = executor, retry_failed, quiet
        self.progress = None
        self.durations: list[float] = []
        self.active = True
        self.gallery_cache: dict = {}

    def say(self, text: str) -> None:
        if self.progress is not None:
            self.progress.console.print(text, markup=False, highlight=False, soft_wrap=True)
        else:
            print(text, flush=True)

    def job(self, item: Item, row: dict) -> Job:
        run_dir = self.batch_dir / row["run_dir"]
        # `--` so a prompt that starts with "-" is not read as an option.
        cmd = [sys.executable, "-m", "steindreamer", "generate", "--out", str(run_dir), "--resume", "--quiet", *self.source,
               "--", item.prompt, *self.overrides, *json.loads(row["overrides"])]
        return Job(item.key, item.prompt, item.seed, run_dir, self.batch_dir / "logs" / f"{Path(row['run_dir']).name}.log",
                   cmd, item.steps)

    def write_summary(self) -> None:
        from . import gallery

        order = {item.key: n for n, item in enumerate(self.items)}
        rows = []
        for row in self.ledger.rows():
            log = f"logs/{Path(row['run_dir']).name}.log"
            row["log"] = log if (self.batch_dir / log).exists() else None
            row["in_prompts_file"] = (row["prompt"], row["seed"]) in order
            rows.append(row)
        # This file's items in file order; rows from an earlier version of the file after them.
        rows.sort(key=lambda r: order.get((r["prompt"], r["seed"]), len(order) + r["id"]))
        meta = {"prompts_file": self.settings["prompts_file"], "settings": self.settings}
        try:
            gallery.write(self.batch_dir, gallery.build_summary(self.batch_dir, rows, meta, self.active, self.gallery_cache))
        except OSError as err:
            self.say(f"warning: cannot write summary: {err}")  # the gallery is a view; the batch goes on

    def todo(self) -> list[tuple[Item, dict]]:
        wanted = ("pending", "running", "failed") if self.retry_failed else ("pending", "running")
        rows = {(r["prompt"], r["seed"]): r for r in self.ledger.rows()}
        return [(item, rows[item.key]) for item in self.items if rows[item.key]["status"] in wanted]

    def run(self) -> int:
        todo = self.todo()
        rows = {(r["prompt"], r["seed"]): r for r in self.ledger.rows()}
        counts = {s: sum(1 for i in self.items if rows[i.key]["status"] == s) for s in ("done", "failed", "running")}
        stale = counts["running"]
        skipped_failed = 0 if self.retry_failed else counts["failed"]
        intro = f"batch {self.batch_dir}: {len(self.items)} prompts, {counts['done']} done, {len(todo)} to run"
        if stale:
            intro += f" ({stale} interrupted, resuming from checkpoints)"
        if skipped_failed:
            intro += f", {skipped_failed} failed (use --retry-failed to run them again)"
        self.say(intro)
        self.write_summary()
        try:
            with self._display(len(self.items), counts["done"], counts["failed"] if not self.retry_failed else 0):
                self._loop(todo)
        except KeyboardInterrupt:
            for job in self.executor.stop():
                self.ledger.requeue(job.key)
            self.active = False
            self.write_summary()
            self.say("interrupted; run the same command again to continue")
            return 130
        self.active = False
        self.write_summary()
        final = {(r["prompt"], r["seed"]): r["status"] for r in self.ledger.rows()}
        done = sum(1 for i in self.items if final[i.key] == "done")
        failed = [i for i in self.items if final[i.key] == "failed"]
        self.say(f"batch finished: {done} done, {len(failed)} failed of {len(self.items)} -> {self.batch_dir / 'index.html'}")
        return 1 if failed or done < len(self.items) else 0

    def _loop(self, todo: list[tuple[Item, dict]]) -> None:
        queue = list(todo)
        in_flight: dict[tuple, Job] = {}
        while queue or in_flight:
            while queue and self.executor.free() > 0:
                item, row = queue.pop(0)
                job = self.job(item, row)
                resumed = latest_checkpoint_step(job.run_dir)
                # Pending and running items run the same command (--resume), so dying between these
                # two lines costs nothing; the row says `running` from here until the result is in.
                worker = self.executor.submit(job)
                self.ledger.start(job.key, worker, resumed)
                in_flight[job.key] = job
                self._track(job, resumed)
            for job, result in self.executor.wait(POLL_S):
                in_flight.pop(job.key, None)
                ok = result["returncode"] == 0
                self.ledger.finish(job.key, ok, result["error"], result["seconds"], result.get("started_at"), result.get("worker"))
                self.durations.append(result["seconds"])
                self._finished(job, ok, result)
                self.write_summary()
            self._refresh(in_flight)

    # --- progress display ---------------------------------------------------------------------
    @contextlib.contextmanager
    def _display(self, total: int, done: int, failed: int):
        self.n_done, self.n_failed, self.total = done, failed, total
        self.tasks: dict[tuple, int] = {}
        self.submitted: dict[tuple, tuple] = {}
        if self.quiet:
            yield
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[info]}"), TimeElapsedColumn())
        self.batch_task = self.progress.add_task("batch", total=total, completed=done + failed, info=self._batch_info())
        try:
            with self.progress:
                yield
        finally:
            self.progress = None

    def _batch_info(self) -> str:
        left = self.total - self.n_done - self.n_failed
        eta = "-"
        if self.durations and left > 0:
            slots = max(1, min(self.executor.capacity, left))
            eta = _hms(sum(self.durations) / len(self.durations) * left / slots)
        return f"done {self.n_done}  failed {self.n_failed}  ETA {eta}"

    def _track(self, job: Job, resumed: int | None) -> None:
        self.submitted[job.key] = (time.time(), resumed)

    def _refresh(self, in_flight: dict) -> None:
        """Per-item bars from each run's metrics.jsonl (the children are --quiet). Ray queues tasks, so
        an item gets its bar once its run writes metrics after submission, i.e. once it really runs."""
        if self.progress is None:
            return
        for key, job in in_flight.items():
            metrics = job.run_dir / "metrics.jsonl"
            submitted, resumed = self.submitted[key]
            if key not in self.tasks:
                try:
                    started = isinstance(self.executor, LocalExecutor) or metrics.stat().st_mtime >= submitted
                except OSError:
                    started = False
                if not started:
                    continue
                label = f"  {job.prompt[:40]} (seed {job.seed})"
                self.tasks[key] = self.progress.add_task(label, total=max(job.steps, 1), completed=resumed or 0, info="starting")
            step, loss, stage = _last_metrics(metrics)
            if step is not None:
                info = f"{stage} loss {loss:.4g}" if isinstance(loss, float) else stage
                self.progress.update(self.tasks[key], completed=step, info=info)
        self.progress.update(self.batch_task, info=self._batch_info())

    def _finished(self, job: Job, ok: bool, result: dict) -> None:
        if ok:
            self.n_done += 1
        else:
            self.n_failed += 1
        if self.progress is not None:
            if job.key in self.tasks:
                self.progress.remove_task(self.tasks.pop(job.key))
            self.progress.update(self.batch_task, completed=self.n_done + self.n_failed, info=self._batch_info())
        status = "done  " if ok else "failed"
        line = f"{status} {job.prompt!r} seed {job.seed} ({result['seconds']:.1f} s)"
        self.say(line if ok else f"{line}: {result['error']}")


def _last_metrics(path: Path) -> tuple[int | None, float | None, str]:
    """Step, loss and stage of the last complete line of metrics.jsonl (reads only the tail)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 8192))
            tail = f.read().decode(errors="replace").splitlines()
    except OSError:
        return None, None, ""
    for line in reversed(tail):
        try:
            obj = json.loads(line)
            return int(obj["step"]), obj.get("loss"), str(obj.get("stage", "nerf"))
        except (ValueError, KeyError, TypeError):
            continue
    return None, None, ""


def _hms(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
