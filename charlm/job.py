"""One training job, whoever runs it.

``charlm train``, the pipeline's in-process task and every rank of a DDP job all
build a :class:`TrainJob` and call :func:`run_job`; the DDP launcher ships the job
to its workers as JSON. A job says what to train (a :class:`~charlm.config.RunConfig`),
on what (a :class:`~charlm.prepared.PreparedRef`), where its checkpoints go, where it
logs (an MLflow run, optional) and whether it continues from a checkpoint. The
answer is a :class:`TrainResult`.

In a distributed job the main rank reads the prepared data and the checkpoint and
the others receive them over the process group, so a joining node needs no disk
of the driver's.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, computed_field

from charlm import faults, prepared
from charlm.checkpoint import CheckpointError, first_line, load_checkpoint, remove_partial_writes
from charlm.config import RunConfig
from charlm.prepared import PreparedRef, PrepSettings
from charlm.provenance import fingerprint
from charlm.training import Callback, DistInfo, EpochLogger, FitResult, Trainer, bits_per_char, time_to_targets

RESUME_LAST = "last"  # TrainJob.resume: continue from checkpoint_dir/last.pt when there is one


class TrackingTarget(BaseModel):
    """The MLflow run a job logs to (its main rank only)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tracking_uri: str
    run_id: str


class TrainJob(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    config: RunConfig
    data: PreparedRef
    checkpoint_dir: str | None = None
    tracking: TrackingTarget | None = None
    resume: str | None = Field(
        None, description=f"a checkpoint to continue from, or {RESUME_LAST!r}: checkpoint_dir/last.pt if it exists"
    )
    max_steps: int | None = Field(None, ge=1, description="stop after this many optimizer steps (saving last.pt)")
    overwrite: bool = Field(False, description="replace another run's checkpoints in checkpoint_dir")
    log_epochs: bool = Field(False, description="one line per epoch on the charlm.progress logger")
    label: str | None = Field(
        None, description="the job's name where one architecture is trained more than once (its seed)"
    )

    @property
    def architecture(self) -> str:
        return self.config.architecture

    @property
    def name(self) -> str:
        """What the job's run, task and checkpoint directory are called: its label, else its architecture."""
        return self.label or self.config.architecture

    def fingerprint(self) -> str:
        """What determines this job's result: corpus, preparation settings, configuration, code."""
        return fingerprint(self.data.corpus.sha256, self.data.settings.model_dump(), config_identity(self.config))

    def model_tags(self) -> dict[str, str]:
        """Tags of every model the job logs: what it was trained and validated on, and its fingerprint."""
        return {
            "charlm.task": self.data.settings.task,
            "charlm.vocab_size": str(self.data.stats["vocab_size"]),
            "charlm.corpus_sha256": self.data.corpus.sha256,
            "charlm.fingerprint": self.fingerprint(),
        }

    def resume_path(self) -> Path | None:
        """The checkpoint this job continues from, if any (read on the main rank only)."""
        if self.resume is None:
            return None
        if self.resume == RESUME_LAST:
            if self.checkpoint_dir is None:
                return None
            last = Path(self.checkpoint_dir) / "last.pt"
            return last if last.is_file() else None
        return Path(self.resume)


def config_identity(config: RunConfig) -> dict[str, Any]:
    """``config`` as its fingerprint reads it: a student's teachers by their weights' digests, not
    by where their files lie (a rerun writes the same teachers elsewhere)."""
    dump = config.model_dump(mode="json")
    if config.distill is not None:
        from charlm.distill import teacher_digests

        dump["distill"]["teachers"] = teacher_digests(config.distill.teachers)
    return dump


def config_fingerprint(corpus_sha256: str, config: RunConfig) -> str:
    """The fingerprint of training ``config`` on the corpus with that digest (see :mod:`charlm.provenance`)."""
    return fingerprint(corpus_sha256, PrepSettings.of(config).model_dump(), config_identity(config))


def run_fingerprint(corpus_sha256: str, configs: Sequence[RunConfig]) -> str:
    """The fingerprint of a pipeline run: every architecture's, in any order."""
    return fingerprint(sorted(config_fingerprint(corpus_sha256, c) for c in configs))


class TrainResult(BaseModel):
    """What one job reports, the same from every path (a DDP job: its main rank's)."""

    model_config = ConfigDict(extra="ignore")  # the computed fields of a dump are not inputs

    architecture: str
    history: list[dict[str, float]]
    name: str = ""  # the job's (TrainJob.name): its architecture, or e.g. "stateful_lstm-seed1"
    seed: int = 0
    best_val_loss: float
    best_epoch: int
    steps: int
    parameters: int
    wall_time_s: float
    checkpoints: dict[str, str] = {}
    stopped_early: bool = False
    best_model_id: str | None = None
    snapshot_model_ids: dict[str, str] = {}
    restarts: int = 0
    world_size: int = 1
    nnodes: int = 1
    node_rank: int = 0
    device: str = "cpu"
    run_id: str | None = None
    task: str = ""
    vocab_size: int = 0
    valid_chars: int = 0
    fingerprint: str = ""
    gen_chars_per_sec: float = 0.0  # greedy generation of the best checkpoint, one request
    candidates: list[dict[str, Any]] = []  # ensembles and weight averages of the last snapshots
    teachers: list[str] = []  # a distilled model's teachers (checkpoint files)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def epochs(self) -> int:
        return len(self.history)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def best_val_bpc(self) -> float:
        return bits_per_char(self.best_val_loss) if math.isfinite(self.best_val_loss) else math.inf

    @computed_field  # type: ignore[prop-decorator]
    @property
    def chars_per_sec(self) -> float:
        return sum(h["chars_per_sec"] for h in self.history) / len(self.history) if self.history else 0.0

    @computed_field  # type: ignore[prop-decorator]
    @property
    def val_loss_curve(self) -> list[float]:
        return [h["val_loss"] for h in self.history]

    @computed_field  # type: ignore[prop-decorator]
    @property
    def elapsed_curve(self) -> list[float]:
        """Wall-clock seconds at the end of each epoch (validation included)."""
        return [h.get("elapsed_s", math.nan) for h in self.history]

    @computed_field  # type: ignore[prop-decorator]
    @property
    def time_to_targets(self) -> dict[str, float]:
        """Seconds to first reach each of :data:`charlm.training.QUALITY_TARGETS` (reached ones only)."""
        return time_to_targets(self.history)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def best_checkpoint(self) -> str | None:
        return self.checkpoints.get("best")


class CheckpointDirError(ValueError):
    """The checkpoint directory cannot be used as asked; the message names it."""


def claim_checkpoint_dir(job: TrainJob) -> TrainJob:
    """Make ``job.checkpoint_dir`` ready before any training: created (or an error naming it), the
    debris of interrupted writes removed, and never another run's checkpoints replaced silently.
    A directory holding this same run (same corpus, configuration and code) is resumed from its
    ``last.pt``; another run's needs ``overwrite``. Returns the job, set to resume when it should."""
    if job.checkpoint_dir is None:
        return job
    directory = Path(job.checkpoint_dir)
    if directory.exists() and not directory.is_dir():
        raise CheckpointDirError(f"{directory}: is a file, not a checkpoint directory")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CheckpointDirError(f"{directory}: cannot create the checkpoint directory ({err.strerror})") from None
    if not os.access(directory, os.W_OK):
        raise CheckpointDirError(f"{directory}: the checkpoint directory is not writable")
    remove_partial_writes(directory)
    existing = sorted(directory.glob("*.pt"))
    if not existing or job.resume is not None or job.overwrite:
        return job
    last = directory / "last.pt"
    arch, same = "unreadable", False
    try:
        held = RunConfig.model_validate(load_checkpoint(last if last.is_file() else existing[0])["config"])
        arch, same = held.architecture, config_fingerprint(job.data.corpus.sha256, held) == job.fingerprint()
    except (CheckpointError, ValueError):
        pass
    if same and last.is_file():
        return job.model_copy(update={"resume": str(last)})
    raise CheckpointDirError(
        f"{directory}: holds the checkpoints of another run ({arch}, {len(existing)} files): "
        "choose another --out, or pass --overwrite to replace them"
    )


def run_job(job: TrainJob, dist: DistInfo | None = None, *, callbacks: Sequence[Callback] = ()) -> TrainResult:
    """Train ``job`` in this process — the whole job, or this rank's part of a DDP job."""
    dist = dist or DistInfo()
    if dist.is_main:
        job = claim_checkpoint_dir(job)
    resume = job.resume_path() if dist.is_main else None
    local = (prepared.load(job.data.dir), load_checkpoint(resume) if resume else None) if dist.is_main else None
    shared = dist.share(local)
    assert shared is not None  # the main rank's, on every rank
    corpus, payload = shared
    hooks: list[Callback] = list(callbacks)
    tracker = None
    if job.tracking is not None and dist.is_main:
        from charlm.tracking import MLflowTracker

        tracker = MLflowTracker.for_job(job.tracking.tracking_uri, job.tracking.run_id, dist, job.model_tags())
        hooks.append(tracker)
    if job.log_epochs and dist.is_main:
        hooks.append(EpochLogger(job.name))
    hooks += faults.from_env(dist)
    trainer = Trainer(
        job.config,
        corpus,
        callbacks=hooks,
        checkpoint_dir=job.checkpoint_dir,
        device=dist.device,
        dist=dist,
    )
    if payload is not None:
        try:
            trainer.load_state_dict(payload)
        except (KeyError, RuntimeError, ValueError) as err:
            raise CheckpointError(f"{resume or 'checkpoint'}: cannot resume from it: {first_line(err)}") from None
    fit = trainer.fit(max_steps=job.max_steps)
    if fit.stopped_early:
        trainer.checkpoint()  # last.pt where the run stopped, to resume from
        fit.checkpoints.update(trainer.checkpoints)
    return _result(job, fit, trainer, tracker)


def _result(job: TrainJob, fit: FitResult, trainer: Trainer, tracker: Any) -> TrainResult:
    dist = trainer.dist
    return TrainResult(
        architecture=job.architecture,
        history=fit.history,
        name=job.name,
        seed=job.config.seed,
        best_val_loss=fit.best_val_loss,
        best_epoch=fit.best_epoch,
        steps=fit.steps,
        parameters=fit.parameters,
        wall_time_s=fit.wall_time,
        checkpoints=fit.checkpoints,
        stopped_early=fit.stopped_early,
        best_model_id=tracker.best_model_id if tracker else None,
        snapshot_model_ids={str(k): v for k, v in (tracker.snapshot_model_ids if tracker else {}).items()},
        restarts=dist.restarts,
        world_size=dist.world_size,
        nnodes=dist.nnodes,
        node_rank=dist.node_rank,
        device=str(trainer.device),
        run_id=job.tracking.run_id if job.tracking else None,
        task=job.data.settings.task,
        vocab_size=len(trainer.vocab),
        valid_chars=int(job.data.stats["valid_chars"]),
        fingerprint=job.fingerprint(),
        gen_chars_per_sec=tracker.gen_chars_per_sec if tracker else 0.0,
        candidates=list(tracker.candidates) if tracker else [],
        teachers=list(job.config.distill.teachers) if job.config.distill else [],
    )
