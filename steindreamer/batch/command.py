"""The `batch` command: its arguments and `main` (the CLI's entry)."""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import UserError
from ..fsio import slugify
from .executors import _make_executor
from .ledger import LEDGER, BatchLock, Ledger
from .prompts import DEFAULT_PRESET, check_runnable, read_prompts
from .runner import Runner


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
        check_runnable(args.preset, config_file, overrides)
    except BaseException:
        executor.close()
        raise

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
