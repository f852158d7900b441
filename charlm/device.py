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

import logging
import os
import statistics
import time
from collections.abc import Callable
from typing import Any, Literal

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


# --------------------------------------------------------------------------- precision

Precision = Literal["auto", "fp32", "bf16", "fp16"]
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class PrecisionError(DeviceError):
    """A precision this device cannot train in; the message names the request and the device."""


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: the CPUs on which bf16 matrix work is faster than fp32. (Without them
    oneDNN emulates bf16: the GRU ran ~12x slower here and its LSTM refused bf16 altogether.)"""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def _trains_in(dtype: torch.dtype, device: torch.device, cell: type[torch.nn.Module]) -> bool:
    """Whether this build's kernels for ``cell`` (cuDNN's or oneDNN's fused RNNs, or a linear layer)
    run forward and backward under autocast to ``dtype``: a two-character probe, not a version table."""
    make: Any = cell  # nn.LSTM/GRU/RNN(input, hidden, …) or nn.Linear(in, out)
    probe = (make(4, 8, batch_first=True) if issubclass(cell, torch.nn.RNNBase) else make(4, 8)).to(device)
    try:
        with torch.autocast(device.type, dtype=dtype):
            out = probe(torch.zeros(1, 2, 4, device=device))
        (out[0] if isinstance(out, tuple) else out).float().sum().backward()
    except RuntimeError:
        return False
    return True


def resolve_precision(requested: str, device: torch.device, cell: type[torch.nn.Module] = torch.nn.LSTM) -> str:
    """``fp32``, ``bf16`` or ``fp16``: what a model trains in on ``device`` for ``requested``.

    ``auto``: on a GPU, fp32 — measured on an H200 (``bench/gpu_check.sh``), bf16 autocast ran
    the notebook's GRU and LSTM at 0.84x their fp32 speed: a char-RNN step there is bound by
    kernel launches, and autocast adds casts (``bf16``/``fp16`` are there to ask for); on a
    CPU, bf16 only where it is native (:func:`cpu_has_native_bf16`) — a candidate, which the
    :class:`~charlm.training.Trainer` keeps only if it measures it faster than fp32 for the model
    it trains (:func:`measure_precisions`, :func:`faster_precision`) — else fp32. An explicit
    request for bf16 or fp16 on a GPU is probed: bf16 where its RNN kernels run it, fp16 with a
    gradient scaler. An explicit request the device cannot honour for ``cell`` (the model's recurrent
    layer) raises :class:`PrecisionError`; explicit bf16 on a CPU without native bf16 is honoured
    where it runs at all, with a warning that it is emulated and slow.
    Weights, the loss and the optimizer state stay fp32 in every mode (autocast).
    """
    if requested not in ("auto", "fp32", "bf16", "fp16"):
        raise PrecisionError(f"precision {requested!r}: expected auto, fp32, bf16 or fp16")
    if requested == "fp32":
        return "fp32"
    if device.type == "cuda":
        if requested == "auto":
            return "fp32"
        if _trains_in(_DTYPES[requested], device, cell):
            return requested
        raise PrecisionError(f"precision {requested!r}: this GPU's cuDNN build does not train RNNs in {requested}")
    if requested == "fp16":
        raise PrecisionError("precision 'fp16' is for CUDA devices; on the CPU use bf16 (where native) or fp32")
    if requested == "auto":
        return "bf16" if cpu_has_native_bf16() and _trains_in(torch.bfloat16, device, cell) else "fp32"
    if cpu_has_native_bf16():
        return "bf16"
    capability = torch.backends.cpu.get_cpu_capability()
    if not _trains_in(torch.bfloat16, device, cell):
        raise PrecisionError(
            f"precision 'bf16': this CPU ({capability}, no AVX512-BF16 or AMX) cannot train a {cell.__name__} "
            "in bf16; use precision=fp32 (or auto, which picks bf16 only where it is native)"
        )
    logging.getLogger(__name__).warning(
        "precision bf16 on a CPU without AVX512-BF16 or AMX (%s): emulated, many times slower than fp32", capability
    )
    return "bf16"


def flush_denormals() -> bool:
    """Flush denormal floats to zero on the CPU (FTZ/DAZ) for the rest of this process, unless
    ``CHARLM_KEEP_DENORMALS=1``; returns whether it is on.

    An fp32 LSTM's training drifts into denormal numbers within tens of steps, and the CPU
    computes with them many times slower: on an Intel Xeon of this project's machines, the
    notebook's 2 x 512 LSTM trained at 2,444 chars/s in fp32 without flushing and 4,756 with
    (``bench/precision.py --denormals``). Values below ~1.2e-38 become zero, far below
    what a loss in nats can see. The setting is per thread and a thread inherits it when it is
    created, so call this before torch starts its thread pool (charlm's CLI and its DDP workers
    do, first thing); called later, the pool's existing threads keep denormals."""
    if os.environ.get("CHARLM_KEEP_DENORMALS", "") in ("1", "true", "yes"):
        return False
    return bool(torch.set_flush_denormal(True))


# A CPU's bf16 must beat fp32's step time by this much to be chosen by ``auto``: fp32 is exact,
# and a smaller gain is within what two timings of the same step differ by on a busy machine.
BF16_STEP_RATIO = 0.9


def measure_precisions(
    step: Callable[[torch.dtype | None], object],
    trials: int = 3,
    min_seconds: float = 1.0,
    max_trials: int = 25,
) -> dict[str, float]:
    """Median seconds of ``step`` in fp32 (``None``) and in bf16: one forward and backward pass of
    the model being trained, at its batch's shape, on a copy. A warm-up of each first (oneDNN
    builds its primitives), then at least ``trials`` of each, alternating which goes first, so
    noise from the rest of the machine falls on both alike; more pairs follow, up to
    ``max_trials``, until each precision has run for ``min_seconds`` in all. Three timings of a
    step put a 2 x 768 LSTM's bf16 at 0.91x fp32's on an AMD Zen 5, one point over
    :data:`BF16_STEP_RATIO`, minutes after the same probe in ``bench/step_costs.py`` had picked
    bf16 for the same model; a second of each is 5 timings of that model's step of about 0.2 s, tens of a
    small model's."""
    dtypes: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16}
    seconds: dict[str, list[float]] = {name: [] for name in dtypes}
    for dtype in dtypes.values():
        step(dtype)
    trial = 0
    while trial < trials or (trial < max_trials and min(sum(times) for times in seconds.values()) < min_seconds):
        for name in list(dtypes)[:: 1 if trial % 2 == 0 else -1]:
            started = time.perf_counter()
            step(dtypes[name])
            seconds[name].append(time.perf_counter() - started)
        trial += 1
    return {name: statistics.median(times) for name, times in seconds.items()}


def faster_precision(seconds: dict[str, float]) -> str:
    """``bf16`` where its measured step took at most :data:`BF16_STEP_RATIO` of fp32's, else ``fp32``.

    Why measure rather than trust the CPU's flags: with AVX512-BF16 and no AMX (an Intel Xeon
    of this project's machines, denormals flushed), bf16 autocast ran the notebook's GRU at 0.70x
    its fp32 speed, its LSTM at 0.94x and ``awd_sgdr``'s at 0.69x, while an AMD CPU with the same
    flags ran the GRU 1.42x faster in bf16 and an Intel one with AMX the LSTM 3.88x
    (``bench/precision.py``). Which precision is faster depends on the CPU, the layer and the shapes."""
    return "bf16" if seconds["bf16"] <= BF16_STEP_RATIO * seconds["fp32"] else "fp32"


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of a resolved precision (None: fp32, autocast off)."""
    return _DTYPES.get(precision)
