"""Running one item: its `generate` subprocess, the log it appends to, and its one-line failure reason."""
from __future__ import annotations

import contextlib
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .ledger import _now

ERROR_MAX = 500  # characters of an error line kept in the ledger


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
    """The step of the item's newest NeRF checkpoint (where a resumed item starts), or None."""
    from ..runfolder import RunFolder

    return RunFolder(run_dir).latest_step("nerf")


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
