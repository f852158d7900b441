"""Training as a torch DistributedDataParallel job, launched with torch's elastic launcher.

:func:`launch_training` is torchrun inside a Python call (``elastic_launch`` with a
c10d rendezvous): ``nproc_per_node`` workers on this node — NCCL on GPUs, gloo on
CPU. With ``nnodes > 1`` this node is the job's *driver* and every other node runs
:func:`join_training` (``charlm join``, or ``torchrun … -m charlm.ddp_worker --join``)
with the same rendezvous endpoint and id; joining nodes receive the job, the data
and any checkpoint from the driver. With ``max_restarts > 0`` a failed worker group
is restarted and resumes from its last checkpoint. Workers run
:func:`charlm.ddp_worker.run`, which calls :func:`charlm.job.run_job` (a light
module: spawned workers import it, never Prefect).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

from charlm import ddp_worker, stopping
from charlm.ddp_worker import WorkerSpec
from charlm.device import processes_per_node
from charlm.job import TrainJob, TrainResult

# Read by torch's c10d rendezvous handler: "1" gives each rendezvous round a fresh store.
SHARED_STORE_ENV = "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"


class DistributedConfig(BaseModel):
    """How one architecture's training is distributed. Environment defaults: see :meth:`from_env`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    nproc_per_node: int | None = Field(
        None,
        ge=1,
        description="workers per node (default: the task's GPUs, 1 on CPU)",
        json_schema_extra={"env": "CHARLM_NPROC_PER_NODE"},
    )
    nnodes: int = Field(
        1, ge=1, description="nodes per job, this one included", json_schema_extra={"env": "CHARLM_NNODES"}
    )
    rdzv_endpoint: str = Field(
        "127.0.0.1:0",
        description="host:port of the c10d rendezvous; port 0 = pick one. A multi-node job needs this "
        "machine's address; the i-th architecture's job uses port + i",
        json_schema_extra={"env": "CHARLM_RDZV_ENDPOINT"},
    )
    rdzv_id: str | None = Field(
        None,
        description="shared by every node of one job; architecture A's job uses ID-A (generated when None)",
        json_schema_extra={"env": "CHARLM_RDZV_ID"},
    )
    max_restarts: int = Field(
        0,
        ge=0,
        description="restart a failed worker group this often, from the last checkpoint",
        json_schema_extra={"env": "CHARLM_MAX_RESTARTS"},
    )
    backend: Literal["auto", "gloo", "nccl"] = Field("auto", description="auto: NCCL on GPUs, gloo on the CPU")
    threads_per_rank: int | None = Field(None, ge=1, description="torch threads per worker (CPU)")
    monitor_interval: float = Field(0.5, gt=0, description="seconds between the launcher's checks of its workers")
    join_timeout: float = Field(600.0, gt=0, description="seconds to wait for every node to join the rendezvous")

    def check_multinode(self, require_id: bool = True) -> None:
        """A multi-node job needs an endpoint and an id that every node can be told in advance."""
        if self.nnodes == 1:
            return
        host, _, port = self.rdzv_endpoint.rpartition(":")
        if not host or not port.isdigit() or int(port) == 0:
            raise ValueError(
                f"rdzv_endpoint {self.rdzv_endpoint!r}: a {self.nnodes}-node job needs a fixed host:port "
                "that every node can reach (the driver's address), e.g. node0:29400"
            )
        if require_id and not self.rdzv_id:
            raise ValueError(f"rdzv_id: a {self.nnodes}-node job needs an id shared by every node")

    def for_job(self, name: str, index: int) -> DistributedConfig:
        """The settings of the ``index``-th of several concurrent jobs of one flow run: on one
        node each picks its own port; across nodes each gets its own rendezvous id and port."""
        if self.nnodes == 1:
            return self
        host, _, port = self.rdzv_endpoint.rpartition(":")
        update = {"rdzv_id": f"{self.rdzv_id}-{name}", "rdzv_endpoint": f"{host}:{int(port) + index}"}
        return self.model_copy(update=update)

    @classmethod
    def from_env(cls, **overrides: Any) -> DistributedConfig:
        """Fields with an environment variable (``CHARLM_NPROC_PER_NODE``, ``CHARLM_NNODES``,
        ``CHARLM_RDZV_ENDPOINT``, ``CHARLM_RDZV_ID``, ``CHARLM_MAX_RESTARTS``: what each node's
        worker sets) read it; ``overrides`` (command-line flags) win; a None override is not given."""
        given: dict[str, Any] = {}
        for name, field in cls.model_fields.items():
            extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
            if (env := extra.get("env")) and os.environ.get(str(env)) is not None:
                given[name] = os.environ[str(env)]
        given.update({k: v for k, v in overrides.items() if v is not None})
        return cls.model_validate(given)


def launch_training(
    job: TrainJob, *, dist: DistributedConfig | None = None, devices: list[int] | None = None
) -> TrainResult:
    """Run ``job`` as a DDP job from this node (the driver) and return rank 0's result.

    ``devices``: the GPU indices this job may use (see :class:`GpuAllocator`). The launcher
    runs in a process of its own (:mod:`charlm.launch`). A worker failure with no restarts
    left raises :class:`DistributedJobError` with torch's report; a stop (a signal, or
    :func:`charlm.stopping.request` in this process) stops the workers without a restart
    and raises :class:`charlm.stopping.TrainingStopped`.
    """
    dist = dist or DistributedConfig()
    dist.check_multinode()
    nproc = dist.nproc_per_node or processes_per_node(job.config.device, devices, dist.backend)
    if devices is not None and nproc > len(devices):
        raise ValueError(f"{nproc} processes per node but only {len(devices)} GPU(s) allotted: {devices}")
    spec = WorkerSpec(job=job, devices=devices, backend=dist.backend, threads_per_rank=dist.threads_per_rank)
    with tempfile.TemporaryDirectory(prefix="charlm-launch-") as tmp:
        request, answer = Path(tmp) / "request.json", Path(tmp) / "answer.json"
        request.write_text(
            json.dumps({"dist": dist.model_dump(mode="json"), "nproc": nproc, "worker": spec.model_dump_json()})
        )
        # The launcher gets a process of its own (charlm.launch): there torch handles SIGTERM and Ctrl-C.
        proc = subprocess.Popen([sys.executable, "-m", "charlm.launch", str(request), str(answer)])
        with _LAUNCHERS_LOCK:
            _LAUNCHERS.add(proc)
        try:
            code = proc.wait()
        except BaseException:  # this thread was interrupted: the job must not outlive it
            proc.terminate()
            proc.wait()
            raise
        finally:
            with _LAUNCHERS_LOCK:
                _LAUNCHERS.discard(proc)
        outcome = json.loads(answer.read_text()) if answer.is_file() else {}
    if "result" in outcome:
        return TrainResult.model_validate(outcome["result"])
    if "stopped" in outcome:
        raise stopping.TrainingStopped(f"{job.architecture}: the DDP job was stopped ({outcome['stopped']})")
    raise DistributedJobError(outcome.get("error") or f"{job.architecture}: the DDP launcher exited with {code}")


class DistributedJobError(RuntimeError):
    """A DDP job failed; the message is the workers' error (torch's ``ChildFailedError`` report,
    with each failed rank's traceback) or the launcher's."""


_LAUNCHERS: set[subprocess.Popen[bytes]] = set()
_LAUNCHERS_LOCK = threading.Lock()


def _stop_launchers(reason: str) -> None:
    """A stop was requested: each running job's launcher stops its workers (SIGTERM)."""
    with _LAUNCHERS_LOCK:
        for proc in _LAUNCHERS:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)


stopping.on_request(_stop_launchers)


def join_training(dist: DistributedConfig, *, devices: list[int] | None = None, backend: str | None = None) -> None:
    """Run this node's workers in a multi-node job whose driver called :func:`launch_training`.

    Blocks until the job ends; raises ``ChildFailedError`` if a worker here fails with
    no restarts left. ``backend`` defaults to the driver's.
    """
    dist.check_multinode()
    nproc = dist.nproc_per_node or processes_per_node("auto", devices, backend or "auto")
    spec = WorkerSpec(devices=devices, backend=backend, threads_per_rank=dist.threads_per_rank)
    elastic_launch(launch_config(dist, nproc), entrypoint=ddp_worker.run)(spec.model_dump_json())


def launch_config(dist: DistributedConfig, nproc: int) -> LaunchConfig:
    # A fresh store for each rendezvous round, hosted by that round's rank 0 (see charlm.ddp_worker),
    # rather than one agent store that outlives restarts. Read by torch's rendezvous handler.
    os.environ[SHARED_STORE_ENV] = "1"
    return LaunchConfig(
        min_nodes=dist.nnodes,
        max_nodes=dist.nnodes,
        nproc_per_node=nproc,
        run_id=dist.rdzv_id or f"charlm-{uuid.uuid4().hex[:12]}",
        rdzv_backend="c10d",
        rdzv_endpoint=dist.rdzv_endpoint,
        rdzv_configs={"join_timeout": dist.join_timeout},
        max_restarts=dist.max_restarts,
        monitor_interval=dist.monitor_interval,
        start_method="spawn",  # forked workers would inherit the orchestrator's signal handlers
    )


# --------------------------------------------------------------------------- GPU placement


class GpuAllocator:
    """Hands out disjoint sets of GPUs to concurrent training tasks on one host.

    Each GPU is an exclusive ``flock`` on a file in ``lock_dir``, so the sets are
    disjoint across threads and across processes (several flow runs on one host),
    and a crashed holder's GPUs are freed by the kernel. ``devices`` defaults to
    the visible CUDA devices; tests pass a simulated list. Lock files are named by
    the physical GPU (its entry in ``CUDA_VISIBLE_DEVICES``), so processes that see
    different subsets — Ray gives each task its own — lock different files.
    """

    def __init__(
        self, devices: list[int] | None = None, lock_dir: str | os.PathLike[str] | None = None, poll: float = 0.5
    ) -> None:
        self.devices = list(range(torch.cuda.device_count())) if devices is None else list(devices)
        self.lock_dir = Path(lock_dir or Path(tempfile.gettempdir()) / "charlm-gpu-locks")
        self.lock_dir.mkdir(parents=True, exist_ok=True)
        self.poll = poll

    @staticmethod
    def physical_id(device: int) -> str:
        """The host-wide name of visible device ``device`` (an index or a GPU UUID)."""
        visible = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
        return visible[device] if device < len(visible) else str(device)

    def _try(self, count: int) -> tuple[list[int], list[Any]] | None:
        taken, handles = [], []
        for device in self.devices:
            lock = self.lock_dir / f"gpu-{self.physical_id(device)}.lock"
            handle = open(lock, "a+")  # noqa: SIM115 - held while allotted
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                continue
            taken.append(device)
            handles.append(handle)
            if len(taken) == count:
                return taken, handles
        for handle in handles:
            handle.close()
        return None

    @contextlib.contextmanager
    def acquire(self, count: int, timeout: float | None = None) -> Iterator[list[int]]:
        """Wait for ``count`` free GPUs, hold them for the ``with`` block, then free them."""
        if count > len(self.devices):
            raise ValueError(f"{count} GPUs requested per task but this host has {len(self.devices)}")
        deadline = None if timeout is None else time.monotonic() + timeout
        while (got := self._try(count)) is None:
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"no {count} free GPU(s) among {self.devices} after {timeout}s")
            time.sleep(self.poll)
        devices, handles = got
        try:
            yield devices
        finally:
            for handle in handles:
                handle.close()
