"""Where a model runs: the one place that turns a device request into a ``torch.device``.

Every path asks here — the trainer (one process or one DDP rank), the DDP launcher
(how many processes, which backend), generation and evaluation — so ``RunConfig.device``
means the same thing everywhere:

* ``auto``: CUDA when available, else the CPU;
* ``cpu``: the CPU, even on a GPU host (a DDP job then uses gloo);
* ``cuda`` / ``cuda:N``: that GPU; an error naming the request when CUDA is absent.

In a DDP job, local rank ``r`` takes the ``r``-th of the GPUs allotted to the job
(``devices``, physical indices), or GPU ``r`` when none were allotted.
"""

from __future__ import annotations

from typing import Literal

import torch

Backend = Literal["gloo", "nccl"]


class DeviceError(ValueError):
    """A device request this host cannot satisfy; the message names the request."""


def uses_cuda(requested: str = "auto") -> bool:
    """Whether ``requested`` resolves to a GPU on this host (no error for a bad request)."""
    if requested == "auto":
        return torch.cuda.is_available()
    return requested.startswith("cuda")


def resolve_device(requested: str = "auto", local_rank: int = 0, devices: list[int] | None = None) -> torch.device:
    """The device for ``requested`` (``auto``, ``cpu``, ``cuda`` or ``cuda:N``) on this host.

    ``local_rank`` and ``devices`` place one rank of a DDP job: the rank's GPU is
    ``devices[local_rank]`` (or ``local_rank`` when no GPUs were allotted).
    """
    if requested == "cpu":
        return torch.device("cpu")
    if requested not in ("auto", "cuda") and not requested.startswith("cuda:"):
        raise DeviceError(f"device {requested!r}: expected auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        if requested == "auto":
            return torch.device("cpu")
        raise DeviceError(f"device {requested!r} requested but CUDA is not available on this host")
    if requested.startswith("cuda:"):
        index = int(requested.removeprefix("cuda:"))
    else:
        index = devices[local_rank] if devices else local_rank
    if index >= torch.cuda.device_count():
        raise DeviceError(f"device cuda:{index}: this host has {torch.cuda.device_count()} GPU(s)")
    return torch.device("cuda", index)


def placement(
    requested: str = "auto", backend: str = "auto", local_rank: int = 0, devices: list[int] | None = None
) -> tuple[torch.device, Backend]:
    """Device and process-group backend of one DDP rank: NCCL on its GPU, gloo on the CPU.

    ``backend="gloo"`` asks for CPU ranks; ``backend="nccl"`` on a CPU job is an error.
    """
    if backend == "gloo":
        return torch.device("cpu"), "gloo"
    device = resolve_device(requested, local_rank, devices)
    if device.type != "cuda":
        if backend == "nccl":
            raise DeviceError("backend 'nccl' requested but the job runs on the CPU (no CUDA, or device=cpu)")
        return device, "gloo"
    return device, "nccl"


def processes_per_node(requested: str, devices: list[int] | None, backend: str = "auto") -> int:
    """Default DDP workers on this node: one per allotted (or visible) GPU, one on the CPU."""
    if devices:
        return len(devices)
    if backend != "gloo" and uses_cuda(requested) and torch.cuda.is_available():
        return torch.cuda.device_count()
    return 1
