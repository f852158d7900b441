"""Checkpoints: plain dicts of tensors and primitives, written atomically, read with
``weights_only=True``.

A checkpoint says how to rebuild itself: it carries the run configuration and the
vocabulary beside the model and optimizer state, the position in the schedule,
the step, the RNG states and (mid-epoch) the carried hidden state — and the sha256 of
the model's weights, checked on load, so a damaged file is refused by name instead of
loading wrong weights.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

FORMAT = "charlm-checkpoint"
VERSION = 1


class CheckpointError(ValueError):
    """The file is missing, truncated or not a charlm checkpoint; the message names it."""


def weights_digest(state: dict[str, torch.Tensor]) -> str:
    """sha256 of a state dict's names, shapes, dtypes and values."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def remove_partial_writes(directory: str | os.PathLike[str]) -> list[Path]:
    """Delete the temporary files of writes that a kill interrupted (``.NAME.pt.*.tmp``)."""
    leftovers = sorted(Path(directory).glob(".*.pt.*.tmp"))
    for path in leftovers:
        path.unlink(missing_ok=True)
    return leftovers


def save_checkpoint(payload: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write ``payload`` to ``path`` atomically: a crash leaves the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": FORMAT, "version": VERSION, **payload}
    if isinstance(payload.get("model"), dict):
        payload["checksum"] = weights_digest(payload["model"])
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass
    return path


def load_checkpoint(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises several types for corrupt or foreign files
        raise CheckpointError(f"{path}: cannot read checkpoint: {_reason(err)}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a charlm checkpoint")
    if payload.get("version") != VERSION:
        raise CheckpointError(f"{path}: checkpoint version {payload.get('version')} is not supported (want {VERSION})")
    missing = [key for key in ("config", "vocab", "model") if not isinstance(payload.get(key), dict)]
    if missing:
        raise CheckpointError(f"{path}: not a complete charlm checkpoint (no {', '.join(missing)})")
    if "checksum" in payload and weights_digest(payload["model"]) != payload["checksum"]:
        raise CheckpointError(f"{path}: the weights do not match their checksum: the file is damaged")
    return payload


def first_line(err: BaseException) -> str:
    """An error's message, first line only (its type's name when it has none)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _reason(err: Exception) -> str:
    """torch's message, first line only, without its advice to load with ``weights_only=False``
    (which would run arbitrary code from the file)."""
    first = first_line(err)
    if "weights_only" in first or "Weights only load failed" in first:
        return "it holds objects other than tensors and plain data (not a charlm checkpoint)"
    return f"{type(err).__name__}: {first}"
