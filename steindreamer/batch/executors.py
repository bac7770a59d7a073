"""Where items run: LocalExecutor (children of the driver, one per visible GPU) or RayExecutor
(one Ray task per item). `_ray_item` is what a Ray task runs; it stays a module-level function so
Ray ships it by reference."""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time

from ..errors import UserError
from .jobs import ERROR_MAX, Job, ended, run_job_blocking, spawn
from .ledger import _now


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
        """Nothing to release (child processes are reaped as they end); RayExecutor's shuts Ray down."""


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
