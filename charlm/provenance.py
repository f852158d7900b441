"""What a result depends on, for the records: the code's version and a run's fingerprint.

A fingerprint is the sha256 of what determines a training's result — the corpus
digest, the preparation settings, the resolved run configuration and the code — so
two runs with the same fingerprint are the same experiment, and the registry never
takes a second version of one.
"""

from __future__ import annotations

import functools
import hashlib
import json
import subprocess
from pathlib import Path
from typing import Any

import torch

PACKAGE = Path(__file__).resolve().parent


@functools.cache
def code_version() -> str:
    """sha256 (16 hex) of the library's sources and the torch version: changes whenever the code does."""
    digest = hashlib.sha256(torch.__version__.encode())
    for path in sorted(PACKAGE.glob("*.py")):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


@functools.cache
def git_commit() -> str | None:
    """The commit of the checkout the library runs from, if it runs from one."""
    try:
        done = subprocess.run(
            ["git", "-C", str(PACKAGE), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    commit = done.stdout.strip()
    return commit if done.returncode == 0 and len(commit) == 40 else None


def fingerprint(*parts: Any) -> str:
    """sha256 (24 hex) of ``parts`` (JSON-serialisable) and the code version."""
    payload = json.dumps([*parts, code_version()], sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


def source_tags(entry_point: str) -> dict[str, str]:
    """MLflow's source tags (the run page's "Source"), naming the entry point and the git commit."""
    tags = {"mlflow.source.name": entry_point, "mlflow.source.type": "LOCAL", "charlm.code_version": code_version()}
    if (commit := git_commit()) is not None:
        tags["mlflow.source.git.commit"] = commit
    return tags
