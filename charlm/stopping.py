"""Stopping on request: a signal (SIGTERM from `docker stop`, Kubernetes or Prefect's
cancellation; Ctrl-C) asks every training in the process to stop at its next step.

A single-process training then writes ``last.pt`` where it stands (the mid-epoch checkpoint a
resumed run continues from exactly) and raises :class:`TrainingStopped`; the MLflow run of a
stopped training ends KILLED with the reason. Nothing here installs signal handlers: the entry
points (the pipeline's command line, Prefect's engine) turn signals into :func:`request`.
"""

from __future__ import annotations

import threading

_event = threading.Event()
_reason: list[str] = []


class TrainingStopped(Exception):
    """Training stopped because a stop was requested; the message says why."""


def request(reason: str) -> None:
    """Ask every training in this process to stop at its next step (the first reason is kept)."""
    if not _event.is_set():
        _reason.append(reason)
        _event.set()


def requested() -> str | None:
    """Why a stop was requested, or None."""
    return _reason[0] if _event.is_set() else None


def reset() -> None:
    """Forget a request (tests, or a process that trains again)."""
    _event.clear()
    _reason.clear()
