"""Test hooks, switched on by environment variables, that every training path honours.

``CHARLM_FAULT_INJECT="rank=R,step=S[,mode=exit|raise]"``: rank R exits (as a killed
worker would) or raises at step S, on the first attempt only — a restarted worker group
then runs through. ``checkpoint=KIND`` in place of ``step=S``: right after the first
checkpoint of that kind (``best``, ``cycle-0``, ``last``) is written.

``CHARLM_TEST_BARRIER="DIR:N"``: each job's main rank, before its first step, leaves a
file in DIR and waits until N jobs have done so — a test's proof that N jobs really
run at the same time, whatever the machine's speed (it fails after five minutes).
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

from charlm.training import Callback, DistInfo, Trainer

FAULT_ENV = "CHARLM_FAULT_INJECT"
BARRIER_ENV = "CHARLM_TEST_BARRIER"


class FaultInjector(Callback):
    """Kill this worker mid-training, or make it raise (only before the first restart)."""

    all_ranks = True

    def __init__(self, spec: str, rank: int, restart_count: int) -> None:
        try:
            fields = dict(part.split("=") for part in spec.split(","))
            self.rank = int(fields.get("rank", 0))
            self.step = int(fields["step"]) if "step" in fields else None
            self.checkpoint = fields.get("checkpoint")
            self.mode = fields.get("mode", "exit")
            if self.mode not in ("exit", "raise") or (self.step is None) == (self.checkpoint is None):
                raise ValueError("give step=S or checkpoint=KIND, and mode exit or raise")
        except (ValueError, KeyError) as err:
            raise ValueError(
                f"{FAULT_ENV}={spec!r}: expected rank=R,step=S|checkpoint=KIND[,mode=exit|raise] ({err})"
            ) from None
        self.armed = restart_count == 0 and rank == self.rank

    def on_step_end(self, trainer: Trainer, step: int, loss: float, lr: float) -> None:
        if self.armed and self.step is not None and step >= self.step:
            self._fail(f"at step {step}")

    def on_checkpoint(self, trainer: Trainer, kind: str, path: Path, metrics: dict[str, float]) -> None:
        if self.armed and kind == self.checkpoint:
            self._fail(f"after writing {path.name}")

    def _fail(self, where: str) -> None:
        if self.mode == "raise":
            raise RuntimeError(f"[charlm fault injection] rank {self.rank} raised {where}")
        print(f"[charlm fault injection] rank {self.rank} exits {where}", flush=True)
        os._exit(17)


class Barrier(Callback):
    """Wait at the start of training until ``parties`` jobs have arrived in ``directory``."""

    def __init__(self, spec: str, timeout: float = 300.0) -> None:
        directory, _, parties = spec.rpartition(":")
        if not directory or not parties.isdigit():
            raise ValueError(f"{BARRIER_ENV}={spec!r}: expected DIR:N")
        self.directory, self.parties, self.timeout = Path(directory), int(parties), timeout

    def on_fit_start(self, trainer: Trainer) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / f"{trainer.config.architecture}-{uuid.uuid4().hex[:8]}").touch()
        deadline = time.monotonic() + self.timeout
        while len(list(self.directory.iterdir())) < self.parties:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{BARRIER_ENV}: {self.parties} jobs never ran at the same time")
            time.sleep(0.1)


def from_env(dist: DistInfo) -> list[Callback]:
    hooks: list[Callback] = []
    if os.environ.get(FAULT_ENV):
        hooks.append(FaultInjector(os.environ[FAULT_ENV], dist.rank, dist.restarts))
    if os.environ.get(BARRIER_ENV) and dist.is_main:
        hooks.append(Barrier(os.environ[BARRIER_ENV]))
    return hooks
