"""Stopping on request: a signal (SIGTERM from `docker stop`, Kubernetes or Prefect's
cancellation; Ctrl-C) asks every training in the process to stop at its next step.

A single-process training then writes ``last.pt`` where it stands (the mid-epoch checkpoint a
resumed run continues from exactly) and raises :class:`TrainingStopped`; the MLflow run of a
stopped training ends KILLED with the reason. Nothing here installs signal handlers: the entry
points (the pipeline's command line, Prefect's engine) turn signals into :func:`request`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

_event = threading.Event()
_reason: list[str] = []
_hooks: list[Callable[[str], None]] = []


class TrainingStopped(Exception):
    """Training stopped because a stop was requested; the message says why."""


def on_request(hook: Callable[[str], None]) -> None:
    """Call ``hook(reason)`` when a stop is requested (DDP launchers pass it on to their workers)."""
    _hooks.append(hook)


def request(reason: str) -> None:
    """Ask every training in this process to stop at its next step (the first reason is kept)."""
    if not _event.is_set():
        _reason.append(reason)
        _event.set()
        for hook in list(_hooks):
            hook(reason)


def requested() -> str | None:
    """Why a stop was requested, or None."""
    return _reason[0] if _event.is_set() else None


def reset() -> None:
    """Forget a request (tests, or a process that trains again)."""
    _event.clear()
    _reason.clear()
