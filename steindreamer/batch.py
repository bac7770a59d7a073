"""`steindreamer batch PROMPTS`: one run per prompt (and seed), each in its own subprocess, tracked by
a durable SQLite ledger in the batch folder.

Batch folder layout::

    ledger.sqlite     one row per (prompt, seed): status, run folder, times, attempts, error line
    runs/<slug>-<seed>/   each item's run folder (what `steindreamer generate` writes)
    logs/<slug>-<seed>.log  the child's output, one section per attempt
    summary.json, index.html   rebuilt atomically after every item

Every item runs as `python -m steindreamer generate PROMPT --out RUN --resume --quiet ...`, so one bad
item (unknown model, bad word, divergence, export error) is a failed row with its one-line reason and
the others go on; and re-running the same command skips done items, continues the ones a killed
batch left `running` from their last checkpoint, and retries failed ones only with --retry-failed.
"""
from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from .errors import UserError
from .fsio import slugify

LEDGER = "ledger.sqlite"
SCHEMA_VERSION = 1
POLL_S = 0.5
DEFAULT_PRESET = "steindreamer"  # what `generate` uses when given neither --preset nor --config
ERROR_MAX = 500  # characters of an error line kept in the ledger


# --- the command --------------------------------------------------------------------------------

def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "batch", help="run many prompts, resumably, with a ledger and a gallery",
        description="Run `generate` for every prompt in PROMPTS (a text file, one prompt a line, or JSONL with "
        '{"prompt": ..., "seed": ..., "overrides": {...}}), each in its own subprocess. Re-running the same command '
        "skips finished prompts and continues interrupted ones from their last checkpoint.")
    p.add_argument("prompts", metavar="PROMPTS", help="prompts file: .txt (one a line, # comments) or .jsonl")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", help="a preset from configs/ for every item (default: steindreamer)")
    src.add_argument("--config", help="a YAML config file for every item")
    p.add_argument("--out", help="batch folder (default: outputs/batch-<PROMPTS file name>)")
    p.add_argument("--executor", choices=("local", "ray"), default="local",
                   help="local: one item at a time, or one per GPU; ray: one Ray task per item")
    p.add_argument("--ray-address", help="address of a running Ray cluster (default: start a local one)")
    p.add_argument("--retry-failed", action="store_true", help="run failed items again (they resume from their last checkpoint)")
    p.add_argument("--quiet", action="store_true", help="no progress bars; one line per finished item")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for every item, e.g. steps=200")


@dataclass
class Item:
    line: int  # line number in PROMPTS, for messages
    prompt: str
    seed: int
    overrides: list[str]  # the item's own key=value list (from JSONL), applied after the batch's
    steps: int  # the item's steps over all stages, for the progress display
    key: tuple = field(init=False)

    def __post_init__(self):
        self.key = (self.prompt, self.seed)


def main(args) -> int:
    if args.ray_address and args.executor != "ray":
        raise UserError("--ray-address needs --executor ray")
    prompts_path = Path(args.prompts)
    config_file = str(Path(args.config).resolve()) if args.config else None
    # Always name the config source: a child resuming without one would take its run folder's saved
    # config, so a fixed override in PROMPTS would never reach an item that failed before.
    source = ["--config", config_file] if config_file else ["--preset", args.preset or DEFAULT_PRESET]
    overrides = list(args.overrides)
    items = read_prompts(prompts_path, args.preset, config_file, overrides)
    batch_dir = Path(args.out) if args.out else Path("outputs") / f"batch-{slugify(prompts_path.stem)}"
    executor = _make_executor(args.executor, args.ray_address)  # before any folder is made: a missing ray is exit 2

    try:
        with BatchLock(batch_dir) as lock, Ledger(batch_dir / LEDGER) as ledger:
            executor.lock_fd = lock.fd
            ledger.sync(items)
            settings = {"prompts_file": str(prompts_path.resolve()), "source": source, "overrides": overrides}
            previous = ledger.get_meta("settings")
            ledger.set_meta("settings", json.dumps(settings))
            runner = Runner(batch_dir, ledger, items, settings, executor, args.retry_failed, args.quiet)
            before = json.loads(previous) if previous else settings
            changed = [k for k in ("source", "overrides") if before.get(k) != settings[k]]
            if changed:
                runner.say(f"note: the {' and '.join('--preset/--config' if k == 'source' else 'overrides' for k in changed)} "
                           f"differ from this batch folder's last run (was: {' '.join(before['source'] + before['overrides'])}); "
                           "finished items are kept as they are")
            return runner.run()
    finally:
        executor.close()


# --- reading PROMPTS ----------------------------------------------------------------------------

JSONL_KEYS = ("prompt", "seed", "overrides")


def _override_text(value) -> str:
    """A JSON value as the right-hand side of an OmegaConf `key=value` override."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value)


def _parse_jsonl_line(text: str, where: str) -> tuple[str, int | None, list[str]]:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(obj, dict):
        raise UserError(f"{where}: expected a JSON object like {{\"prompt\": \"a red cube\"}}")
    unknown = sorted(set(obj) - set(JSONL_KEYS))
    if unknown:
        raise UserError(f"{where}: unknown key '{unknown[0]}' (allowed: {', '.join(JSONL_KEYS)})")
    prompt = obj.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise UserError(f"{where}: 'prompt' must be a non-empty string")
    seed = obj.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise UserError(f"{where}: 'seed' must be a non-negative integer")
    raw = obj.get("overrides", {})
    if isinstance(raw, dict):
        item_overrides = [f"{k}={_override_text(v)}" for k, v in raw.items()]
    elif isinstance(raw, list) and all(isinstance(x, str) and "=" in x for x in raw):
        item_overrides = list(raw)
    else:
        raise UserError(f"{where}: 'overrides' must be an object like {{\"steps\": 500}} or a list of \"key=value\" strings")
    if seed is not None:
        item_overrides.append(f"seed={seed}")
    return prompt.strip(), seed, item_overrides


def read_prompts(path: Path, preset: str | None, config_file: str | None, overrides: list[str]) -> list[Item]:
    """Parse and validate every line before anything runs: a typo on line 900 is exit 2 now, not a
    failure hours later. Per-item configs are checked too (cheap: no model is loaded)."""
    from .config import load_config
    from .train import check_prompt

    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"prompts file not found: {path}") from None
    except IsADirectoryError:
        raise UserError(f"prompts file is a folder: {path}") from None
    except UnicodeDecodeError:
        raise UserError(f"prompts file {path} is not UTF-8 text") from None
    except OSError as err:
        raise UserError(f"cannot read prompts file {path}: {err.strerror or err}") from None
    lines = [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1)]
    lines = [(n, line) for n, line in lines if line and not line.startswith("#")]
    if not lines:
        raise UserError(f"prompts file {path} has no prompts (blank lines and # comments are ignored)")
    jsonl = path.suffix.lower() in (".jsonl", ".ndjson") or lines[0][1].startswith("{")

    # The batch-wide config, checked once (a bad --preset or override is the batch's error, not the item's).
    preset = None if config_file else preset or DEFAULT_PRESET
    base = load_config(preset, config_file, overrides)
    items: list[Item] = []
    seen: dict[tuple, int] = {}
    for n, line in lines:
        where = f"{path.name} line {n}"
        if jsonl:
            prompt, seed, item_overrides = _parse_jsonl_line(line, where)
        else:
            prompt, seed, item_overrides = line, None, []
        try:
            check_prompt(prompt, builtin=False)  # the built-in model's vocabulary is the child's to check
            cfg = load_config(preset, config_file, overrides + item_overrides) if item_overrides else base
        except UserError as err:
            raise UserError(f"{where}: {err}") from None
        mesh = getattr(cfg, "mesh", None)  # the mesh stage's steps follow the NeRF's in metrics.jsonl
        steps = cfg.train.steps + (mesh.steps if mesh is not None and mesh.enabled else 0)
        item = Item(n, prompt, cfg.train.seed, item_overrides, steps)
        if item.key in seen:
            raise UserError(f"{where}: same prompt and seed as line {seen[item.key]}")
        seen[item.key] = n
        items.append(item)
    return items


# --- the ledger ---------------------------------------------------------------------------------

def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class Ledger:
    """SQLite, default rollback journal (safe on network file systems, which WAL is not), FULL sync:
    every state change is one committed transaction, so a SIGKILL at any moment leaves the last
    committed state. Only the driver process writes it."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def __enter__(self) -> "Ledger":
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            self.db.row_factory = sqlite3.Row
            self.db.execute("PRAGMA synchronous=FULL")
            with self.tx():
                version = self.db.execute("PRAGMA user_version").fetchone()[0]
                if version > SCHEMA_VERSION:
                    raise UserError(f"ledger {self.path} was written by a newer steindreamer (schema {version})")
                self.db.execute("""CREATE TABLE IF NOT EXISTS items (
                    id INTEGER PRIMARY KEY,
                    prompt TEXT NOT NULL,
                    seed INTEGER NOT NULL,
                    overrides TEXT NOT NULL,            -- JSON list of the item's own key=value
                    run_dir TEXT NOT NULL UNIQUE,       -- relative to the batch folder
                    status TEXT NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'running', 'done', 'failed')),
                    attempts INTEGER NOT NULL DEFAULT 0,
                    started_at TEXT, ended_at TEXT,     -- UTC, ISO 8601, of the last attempt
                    seconds REAL,                       -- wall time of the last attempt
                    error TEXT,                         -- the failure's one line
                    resumed_from INTEGER,               -- checkpoint step the last attempt started from
                    worker TEXT,                        -- where it ran (cpu, gpu N, ray node)
                    UNIQUE (prompt, seed))""")
                self.db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
                self.db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except sqlite3.DatabaseError as err:
            raise UserError(f"ledger {self.path} cannot be opened: {err}") from None
        return self

    def __exit__(self, *exc) -> None:
        self.db.close()

    @contextlib.contextmanager
    def tx(self):
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def get_meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return row[0] if row else None

    def set_meta(self, key: str, value: str) -> None:
        with self.tx():
            self.db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, value))

    def sync(self, items: list[Item]) -> None:
        """Add new items as pending; refresh the overrides of unfinished ones (the file may have been fixed)."""
        with self.tx():
            taken = {r[0] for r in self.db.execute("SELECT run_dir FROM items")}
            for item in items:
                row = self.db.execute("SELECT id, status FROM items WHERE prompt=? AND seed=?", item.key).fetchone()
                if row is None:
                    # Prompts that slugify alike ("A cube!" / "a cube") get distinct run folders.
                    base = f"runs/{slugify(item.prompt)}-{item.seed}"
                    run_dir, k = base, 2
                    while run_dir in taken:
                        run_dir, k = f"{base}-{k}", k + 1
                    taken.add(run_dir)
                    self.db.execute("INSERT INTO items(prompt, seed, overrides, run_dir) VALUES (?, ?, ?, ?)",
                                    (*item.key, json.dumps(item.overrides), run_dir))
                elif row["status"] != "done":
                    self.db.execute("UPDATE items SET overrides=? WHERE id=?", (json.dumps(item.overrides), row["id"]))

    def rows(self) -> list[dict]:
        return [dict(r) for r in self.db.execute("SELECT * FROM items ORDER BY id")]

    def start(self, key: tuple, worker: str, resumed_from: int | None) -> None:
        with self.tx():
            self.db.execute("UPDATE items SET status='running', attempts=attempts+1, started_at=?, ended_at=NULL, seconds=NULL, "
                            "error=NULL, resumed_from=?, worker=? WHERE prompt=? AND seed=?", (_now(), resumed_from, worker, *key))

    def finish(self, key: tuple, ok: bool, error: str | None, seconds: float, started_at: str | None = None,
               worker: str | None = None) -> None:
        """The attempt's outcome; a Ray task also reports when and where it really started."""
        with self.tx():
            self.db.execute("UPDATE items SET status=?, ended_at=?, seconds=?, error=?, started_at=COALESCE(?, started_at), "
                            "worker=COALESCE(?, worker) WHERE prompt=? AND seed=?",
                            ("done" if ok else "failed", _now(), seconds, error, started_at, worker, *key))

    def requeue(self, key: tuple) -> None:
        with self.tx():
            self.db.execute("UPDATE items SET status='pending' WHERE prompt=? AND seed=? AND status='running'", key)


class BatchLock:
    """One driver per batch folder (flock, released by the kernel however the holder dies). Local
    children inherit the lock, so a child orphaned by a killed driver still holds it and a new
    driver refuses to start rather than write into the same run folder twice."""

    def __init__(self, batch_dir: Path):
        self.path = Path(batch_dir) / ".lock"
        self.fd: int | None = None

    def __enter__(self) -> "BatchLock":
        try:
            import fcntl
        except ImportError:  # not POSIX: no locking
            return self
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise UserError(f"cannot write to batch folder {self.path.parent}: {err.strerror or err}") from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(self.fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(self.fd)
            raise UserError(f"batch folder {self.path.parent} is in use by another batch (pid {holder}, or a run it started)") from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.close(self.fd)


# --- running one item ---------------------------------------------------------------------------

@dataclass
class Job:
    key: tuple
    prompt: str
    seed: int
    run_dir: Path  # absolute
    log: Path  # absolute
    cmd: list[str]
    steps: int


def latest_checkpoint_step(run_dir: Path) -> int | None:
    from .train import CKPT_PREFIX

    found = sorted((run_dir / "checkpoints").glob(f"{CKPT_PREFIX}*.pt")) if (run_dir / "checkpoints").is_dir() else []
    try:
        return int(found[-1].stem[len(CKPT_PREFIX):]) if found else None
    except ValueError:
        return None


def _pdeathsig_setter():
    """Linux: a function for Popen's preexec_fn that makes the child get SIGKILL when the driver
    dies, so a killed batch leaves no orphan still training into a run folder the next run resumes.
    Resolved here, in the parent: the child only makes the C call (no imports between fork and exec)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    sig = int(signal.SIGKILL)
    return lambda: prctl(1, sig)  # PR_SET_PDEATHSIG = 1


_PDEATHSIG = _pdeathsig_setter()


def spawn(job: Job, env: dict | None = None, pass_fds: tuple = ()) -> tuple[subprocess.Popen, int]:
    """Start the child with its output appended to the item's log; returns (process, log offset of this attempt)."""
    job.log.parent.mkdir(parents=True, exist_ok=True)
    with open(job.log, "ab") as log:
        log.write(f"=== {_now()} start: {shlex.join(job.cmd)}\n".encode())
        offset = log.tell()
        proc = subprocess.Popen(job.cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                                pass_fds=pass_fds, preexec_fn=_PDEATHSIG)
    return proc, offset


def failure_line(log: Path, offset: int, returncode: int) -> str:
    """The child's one-line reason: its last `error: ...` line, else its last line (a traceback's
    exception), else how it ended."""
    try:
        with open(log, "rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
    except OSError:
        text = ""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    if errors:
        line = errors[-1]
    elif returncode < 0:
        try:
            line = f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            line = f"killed by signal {-returncode}"
    elif lines:
        line = lines[-1]
    else:
        line = f"exit status {returncode}"
    return line[:ERROR_MAX]


def ended(job: Job, offset: int, code: int, seconds: float) -> dict:
    """The result of an attempt, with an end marker in the log."""
    error = None if code == 0 else failure_line(job.log, offset, code)
    with contextlib.suppress(OSError), open(job.log, "ab") as log:
        log.write(f"=== {_now()} end: {'done' if code == 0 else f'failed (exit status {code})'} after {seconds:.1f} s\n".encode())
    return {"returncode": code, "error": error, "seconds": seconds}


def run_job_blocking(job: Job) -> dict:
    """One item start to end (what a Ray task runs): the same subprocess as the local executor."""
    started, t0 = _now(), time.perf_counter()
    proc, offset = spawn(job)
    code = proc.wait()
    return {**ended(job, offset, code, time.perf_counter() - t0), "started_at": started}


# --- executors ----------------------------------------------------------------------------------

class LocalExecutor:
    """Children of this process: one at a time, or one per visible GPU (CUDA_VISIBLE_DEVICES) when
    there are several. Polled from the driver's thread; no threads, so the ledger has one writer."""

    def __init__(self):
        import torch

        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        # Slot i gets the i-th *visible* device, honouring a CUDA_VISIBLE_DEVICES set by the caller.
        visible = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
        devices = [visible[i] if i < len(visible) else str(i) for i in range(n)]
        self.slots = devices if n > 1 else [None]  # one device (or none): the child's own default
        self.single = f"gpu {devices[0]}" if n == 1 else "cpu"
        self.running: dict = {}  # slot -> (job, proc, offset, t0)
        self.lock_fd: int | None = None

    @property
    def capacity(self) -> int:
        return len(self.slots)

    def worker_name(self, slot) -> str:
        return self.single if slot is None else f"gpu {slot}"

    def submit(self, job: Job) -> str:
        slot = next(s for s in self.slots if s not in self.running)
        env = None
        if slot is not None:
            env = {**os.environ, "CUDA_VISIBLE_DEVICES": slot}
        proc, offset = spawn(job, env, (self.lock_fd,) if self.lock_fd is not None else ())
        self.running[slot] = (job, proc, offset, time.perf_counter())
        return self.worker_name(slot)

    def free(self) -> int:
        return self.capacity - len(self.running)

    def wait(self, timeout: float) -> list[tuple[Job, dict]]:
        end = time.monotonic() + timeout
        while True:
            done = []
            for slot, (job, proc, offset, t0) in list(self.running.items()):
                code = proc.poll()
                if code is not None:
                    del self.running[slot]
                    done.append((job, ended(job, offset, code, time.perf_counter() - t0)))
            if done or time.monotonic() >= end:
                return done
            time.sleep(0.05)

    def stop(self) -> list[Job]:
        """Ctrl-C: ask the children to stop (a terminal's Ctrl-C reached them already), then end them."""
        jobs = []
        for job, proc, _, _ in self.running.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=2)
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            with contextlib.suppress(OSError), open(job.log, "ab") as log:
                log.write(f"=== {_now()} end: interrupted (exit status {proc.returncode})\n".encode())
            jobs.append(job)
        self.running.clear()
        return jobs

    def close(self) -> None:
        pass


class RayExecutor:
    """One Ray task per item (num_gpus=1 where the cluster has GPUs, else num_cpus=1). Tasks run the
    same subprocess in the shared batch folder; only the driver touches the ledger."""

    def __init__(self, address: str | None):
        try:
            import ray
        except ImportError:
            raise UserError("the ray executor needs Ray: pip install 'steindreamer[ray]' (or pip install 'ray[default]')") from None
        self.ray = ray
        self.owned = False
        if not ray.is_initialized():  # a caller (a test, a notebook) may have started Ray already
            try:
                ray.init(address=address, include_dashboard=False, logging_level="warning", log_to_driver=False)
            except Exception as err:  # noqa: BLE001 - connection errors come in many types
                raise UserError(f"cannot start or reach Ray{f' at {address}' if address else ''}: {str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__}") from None
            self.owned = True
        self.gpus = int(ray.cluster_resources().get("GPU", 0))
        # Ray sets OMP_NUM_THREADS to the task's num_cpus, so CPU-only items run one thread each.
        opts = {"num_gpus": 1, "num_cpus": 1} if self.gpus else {"num_cpus": 1}
        self.task = ray.remote(max_retries=0)(_ray_item).options(**opts)
        self.running: dict = {}  # ObjectRef -> (job, t0)
        self._slots, self._slots_at = 1, float("-inf")
        self.lock_fd: int | None = None  # unused: Ray workers are not our children

    @property
    def capacity(self) -> int:
        """Items the cluster can run at once (re-read now and then: an autoscaling cluster grows)."""
        if time.monotonic() - self._slots_at > 10:
            resources = self.ray.cluster_resources()
            self._slots = max(int(resources.get("GPU", 0) if self.gpus else resources.get("CPU", 1)), 1)
            self._slots_at = time.monotonic()
        return self._slots

    def free(self) -> int:
        # About one task per slot in flight (Ray places them), so a `running` row is really running
        # and its attempts count real starts.
        return self.capacity - len(self.running)

    def submit(self, job: Job) -> str:
        ref = self.task.remote(job)
        self.running[ref] = (job, time.perf_counter())
        return "ray"

    def wait(self, timeout: float) -> list[tuple[Job, dict]]:
        if not self.running:
            time.sleep(timeout)
            return []
        ready, _ = self.ray.wait(list(self.running), num_returns=len(self.running), timeout=timeout)
        out = []
        for ref in ready:
            job, t0 = self.running.pop(ref)
            try:
                result = self.ray.get(ref)
            except Exception as err:  # noqa: BLE001 - a lost worker or node: the item failed, the batch goes on
                result = {"returncode": 1, "error": f"ray: {type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"[:ERROR_MAX],
                          "seconds": time.perf_counter() - t0}
            out.append((job, result))
        return out

    def stop(self) -> list[Job]:
        for ref in self.running:
            with contextlib.suppress(Exception):
                self.ray.cancel(ref, force=True)
        jobs = [job for job, _ in self.running.values()]
        self.running.clear()
        return jobs

    def close(self) -> None:
        if self.owned:
            self.ray.shutdown()


def _ray_item(job: Job) -> dict:
    result = run_job_blocking(job)
    import socket

    result["worker"] = f"ray {socket.gethostname()}"
    gpu = os.environ.get("CUDA_VISIBLE_DEVICES")
    if gpu:
        result["worker"] += f" gpu {gpu}"
    return result


def _make_executor(kind: str, address: str | None):
    return RayExecutor(address) if kind == "ray" else LocalExecutor()


# --- the driver ---------------------------------------------------------------------------------

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
        from . import batch_gallery

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
            batch_gallery.write(self.batch_dir, batch_gallery.build_summary(self.batch_dir, rows, meta, self.active, self.gallery_cache))
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


# --- standalone entry (before the CLI wires `batch` in; also `python -m steindreamer.batch`) -----

def run_cli(argv: list[str]) -> int:
    """`steindreamer batch ...` exactly as the CLI runs it: parse, one-line errors, exit 2."""
    from .cli import EXIT_USAGE, _Parser

    try:
        parser = _Parser(prog="steindreamer")
        sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
        add_parser(sub)
        args, extra = parser.parse_known_args(["batch", *argv])
        stray = [e for e in extra if e.startswith("-") or "=" not in e]
        if stray:
            raise UserError(f"steindreamer: unrecognized arguments: {' '.join(stray)}")
        args.overrides = list(args.overrides) + extra
        return main(args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    # Run from the importable module, not __main__: Ray pickles __main__'s functions by value.
    from steindreamer.batch import run_cli as _run_cli

    sys.exit(_run_cli(sys.argv[1:]))
