"""The batch folder's durable state: the SQLite ledger (one row per item) and the lock that allows
one driver per folder."""
from __future__ import annotations

import contextlib
import json
import os
import sqlite3
from datetime import datetime, timezone
from pathlib import Path

from ..errors import UserError
from ..fsio import slugify
from .prompts import Item

LEDGER = "ledger.sqlite"
SCHEMA_VERSION = 1


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
