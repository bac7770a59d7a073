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

Modules: `prompts` (reading PROMPTS), `ledger` (the ledger and the folder lock), `jobs` (one item's
subprocess), `executors` (local or Ray), `runner` (the driver loop and progress), `gallery`
(summary.json and index.html), `command` (the arguments and `main`).
"""
from .command import add_parser, main
from .executors import LocalExecutor, RayExecutor
from .jobs import ERROR_MAX, Job, ended, failure_line, latest_checkpoint_step, run_job_blocking, spawn
from .ledger import LEDGER, SCHEMA_VERSION, BatchLock, Ledger
from .prompts import DEFAULT_PRESET, Item, read_prompts
from .runner import POLL_S, Runner

__all__ = ["DEFAULT_PRESET", "ERROR_MAX", "LEDGER", "POLL_S", "SCHEMA_VERSION", "BatchLock", "Item", "Job", "Ledger",
           "LocalExecutor", "RayExecutor", "Runner", "add_parser", "ended", "failure_line", "latest_checkpoint_step", "main",
           "read_prompts", "run_job_blocking", "spawn"]
