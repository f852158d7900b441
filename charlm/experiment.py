"""MLflow lineage of a pipeline run: the parent run, one child run per architecture (per seed
where an architecture is trained with several), and the seeds' ensembles on the parent.

:func:`train_in_child_run` wraps one :class:`~charlm.job.TrainJob` in a child run: the
corpus as a dataset input, the vocabulary and statistics as artifacts, then the job —
in this process (:func:`charlm.job.run_job`) or as a DDP job
(:func:`charlm.distributed.launch_training`) whose rank 0 logs to the same run. The
run ends FINISHED only when training finished; an error marks it FAILED with the
error as a tag, and is raised again.
"""

from __future__ import annotations

import os
import socket
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from urllib.parse import urlparse

import mlflow
import psutil
from mlflow.data.dataset_source import DatasetSource
from mlflow.data.dataset_source_registry import _dataset_source_registry, resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import DatasetInput, InputTag, Run
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

from charlm import stopping
from charlm.distributed import DistributedConfig, launch_training
from charlm.job import TrackingTarget, TrainJob, TrainResult, run_job
from charlm.prepared import CorpusRef, PreparedRef
from charlm.provenance import fingerprint, source_tags
from charlm.training import Callback

ENTRY_POINT = "flows/pipeline.py"


def dataset_source(corpus: CorpusRef) -> DatasetSource:
    """The corpus's MLflow dataset source, of the type its URI says (local file, S3, HTTP)."""
    scheme = urlparse(corpus.uri).scheme
    kind = {"": "local", "file": "local", "s3": "s3", "http": "http", "https": "http"}.get(scheme, scheme)
    candidates = [s for s in _dataset_source_registry.sources if s._get_source_type() == kind][:1]
    return resolve_dataset_source(corpus.resolved_uri, candidate_sources=candidates or None)


def log_corpus_input(client: MlflowClient, run_id: str, corpus: CorpusRef) -> None:
    """The corpus as the run's dataset input. MLflow merges datasets by name and digest, so the
    name is the whole resolved URI (with the endpoint of an S3-compatible store): the same bytes
    read from two places stay two datasets."""
    name = corpus.resolved_uri + (f" @ {corpus.endpoint_url}" if corpus.endpoint_url else "")
    dataset = MetaDataset(  # type: ignore[abstract]  # concrete at run time; MLflow's stub says otherwise
        source=dataset_source(corpus), name=name, digest=corpus.sha256[:36]
    )
    tags = [
        InputTag(MLFLOW_DATASET_CONTEXT, "training"),
        InputTag("sha256", corpus.sha256),
        InputTag("size", str(corpus.size)),
    ]
    client.log_inputs(run_id, datasets=[DatasetInput(dataset._to_mlflow_entity(), tags=tags)])


def corpus_tags(corpus: CorpusRef) -> dict[str, str]:
    tags = {"charlm.corpus_sha256": corpus.sha256, "charlm.corpus_uri": corpus.resolved_uri}
    if corpus.endpoint_url:
        tags["charlm.s3_endpoint"] = corpus.endpoint_url
    return tags


def process_tags() -> dict[str, str]:
    """Which process owns a run (so a later pipeline can tell that it died)."""
    me = psutil.Process()
    return {
        "charlm.host": socket.gethostname(),
        "charlm.pid": str(me.pid),
        "charlm.pid_started": repr(me.create_time()),
    }


def owner_gone(run: Run) -> str | None:
    """Why the process that owns ``run`` is known to be dead (it ran on this host), else None."""
    tags = run.data.tags
    if tags.get("charlm.host") != socket.gethostname() or "charlm.pid" not in tags:
        return None
    pid = int(tags["charlm.pid"])
    try:
        alive = repr(psutil.Process(pid).create_time()) == tags.get("charlm.pid_started")
    except psutil.Error:
        alive = False
    return None if alive else f"its process {pid} on {tags['charlm.host']} is gone"


def close_orphaned_runs(experiment_id: str, why_dead: Callable[[Run], str | None]) -> list[str]:
    """Mark FAILED, with the reason as ``charlm.error``, every RUNNING run of ``experiment_id`` that
    ``why_dead`` says belongs to a dead pipeline (killed, crashed, its machine lost); their ids."""
    client = MlflowClient()
    closed = []
    for run in client.search_runs([experiment_id], filter_string="attributes.status = 'RUNNING'", max_results=1000):
        reason = why_dead(run)
        if reason:
            client.set_tag(run.info.run_id, "charlm.error", f"the pipeline died: {reason}")
            client.set_terminated(run.info.run_id, status="FAILED")
            closed.append(run.info.run_id)
    return closed


def placement_tags(devices: list[int] | None) -> dict[str, str]:
    """Where a training ran: the GPUs it was allotted and what the process was shown."""
    tags = {}
    if devices is not None:
        tags["charlm.devices"] = ",".join(map(str, devices))
    if os.environ.get("CUDA_VISIBLE_DEVICES") is not None:  # set by Ray (num_gpus) or the operator
        tags["charlm.cuda_visible_devices"] = os.environ["CUDA_VISIBLE_DEVICES"]
    return tags


def start_parent_run(experiment_name: str, run_name: str, corpus: CorpusRef, tags: dict[str, str]) -> tuple[str, str]:
    """The pipeline's parent run (RUNNING until :func:`end_run`), with the corpus as its input:
    ``(experiment_id, run_id)``."""
    client = MlflowClient()
    experiment = mlflow.set_experiment(experiment_name)
    run = client.create_run(
        experiment.experiment_id,
        run_name=run_name,
        tags={
            **corpus_tags(corpus),
            **source_tags(ENTRY_POINT),
            **process_tags(),
            "charlm.kind": "pipeline",
            **tags,
        },
    )
    log_corpus_input(client, run.info.run_id, corpus)
    return experiment.experiment_id, run.info.run_id


def end_run(run_id: str, error: BaseException | None = None) -> None:
    """FINISHED; KILLED when a stop was requested (a signal, a cancellation), the reason as the
    ``charlm.stopped`` tag; else FAILED with the error as the ``charlm.error`` tag."""
    client = MlflowClient()
    if error is None:
        client.set_terminated(run_id, status="FINISHED")
    elif stopping.requested() is not None or isinstance(error, stopping.TrainingStopped | KeyboardInterrupt):
        client.set_tag(run_id, "charlm.stopped", stopping.requested() or type(error).__name__)
        client.set_terminated(run_id, status="KILLED")
    else:
        client.set_tag(run_id, "charlm.error", "".join(traceback.format_exception_only(type(error), error))[:5000])
        client.set_terminated(run_id, status="FAILED")


def train_in_child_run(
    job: TrainJob,
    *,
    experiment_id: str,
    parent_run_id: str,
    distributed: DistributedConfig | None = None,
    devices: list[int] | None = None,
    tags: dict[str, str] | None = None,
    callbacks: Sequence[Callback] = (),
) -> TrainResult:
    """Run ``job`` in a new child run of ``parent_run_id``; see the module docstring.

    ``distributed`` makes it a DDP job on ``devices`` (GPU indices; None on CPU); ``callbacks``
    (in this process only) go to the trainer.
    """
    client = MlflowClient()
    arch, corpus = job.architecture, job.data.corpus
    run = client.create_run(
        experiment_id,
        run_name=job.name,
        tags={
            "mlflow.parentRunId": parent_run_id,
            "charlm.architecture": arch,
            "charlm.seed": str(job.config.seed),
            **({"charlm.teachers": str(len(job.config.distill.teachers))} if job.config.distill else {}),
            "charlm.task": job.data.settings.task,
            "charlm.fingerprint": job.fingerprint(),
            **corpus_tags(corpus),
            **source_tags(ENTRY_POINT),
            **process_tags(),
            **placement_tags(devices),
            **(tags or {}),
        },
    )
    run_id = run.info.run_id
    job = job.model_copy(update={"tracking": TrackingTarget(tracking_uri=mlflow.get_tracking_uri(), run_id=run_id)})
    try:
        log_corpus_input(client, run_id, corpus)
        for name in ("vocab.json", "stats.json"):
            client.log_artifact(run_id, str(Path(job.data.dir) / name), artifact_path="data")
        started = time.perf_counter()
        if distributed is None:
            result = run_job(job, callbacks=callbacks)
        else:
            result = launch_training(job, dist=distributed, devices=devices)
        wall = time.perf_counter() - started
    except BaseException as err:
        end_run(run_id, err)
        raise
    end_run(run_id)
    return result.model_copy(update={"wall_time_s": wall, "run_id": run_id})


def seed_groups(results: Sequence[TrainResult]) -> list[list[TrainResult]]:
    """The results of one architecture and task trained with several seeds (two or more, each with a
    best checkpoint), seed order, one list per architecture and task."""
    groups: dict[tuple[str, str], list[TrainResult]] = {}
    for r in results:
        if r.checkpoints.get("best"):
            groups.setdefault((r.architecture, r.task), []).append(r)
    return [sorted(g, key=lambda r: r.seed) for g in groups.values() if len({r.seed for r in g}) >= 2]


def log_seed_ensembles(
    parent_run_id: str, results: Sequence[TrainResult], data: Sequence[PreparedRef]
) -> list[dict[str, object]]:
    """For each architecture trained with several seeds: the ensemble of their best checkpoints,
    evaluated on the validation split they were trained against and logged as a model of the
    parent run (kind ``seed_ensemble``) — a promotion candidate like a run's snapshot ensembles,
    with its own fingerprint (its members'), so that a rerun registers nothing new. Returns one
    row per ensemble for the comparison (:func:`charlm.compare.comparison_table`)."""
    from charlm import prepared
    from charlm.candidates import SEED_ENSEMBLE, seed_ensemble
    from charlm.tracking import log_checkpoint_model

    by_task = {d.settings.task: d for d in data}
    client = MlflowClient()
    rows: list[dict[str, object]] = []
    for members in seed_groups(results):
        first = members[0]
        ref = by_task[first.task]
        device = "cuda" if first.device.startswith("cuda") else "cpu"
        combined = seed_ensemble([r.checkpoints["best"] for r in members], prepared.load(ref.dir), device=device)
        size = len(members)
        tags = {
            "charlm.architecture": first.architecture,
            "charlm.kind": SEED_ENSEMBLE,
            "charlm.members": size,
            "charlm.seeds": ",".join(str(r.seed) for r in members),
            "charlm.member_runs": ",".join(str(r.run_id) for r in members),
            "charlm.val_loss": combined.val_loss,
            "charlm.gen_chars_per_sec": round(combined.gen_chars_per_sec),
            "charlm.task": first.task,
            "charlm.vocab_size": first.vocab_size,
            "charlm.corpus_sha256": ref.corpus.sha256,
            "charlm.fingerprint": fingerprint(SEED_ENSEMBLE, sorted(r.fingerprint for r in members)),
        }
        name = f"{first.architecture}-seed-ensemble-{size}"
        metrics = {f"{first.architecture}_seed_ensemble_val_loss": combined.val_loss}  # the parent's, and the model's
        model_id = log_checkpoint_model(
            combined.members, name, run_id=parent_run_id, tags=tags, client=client, metrics=metrics
        )
        rows.append(
            {
                **combined.as_dict(),
                "model_id": model_id,
                "architecture": first.architecture,
                "task": first.task,
                "seeds": [r.seed for r in members],
                "member_runs": [r.run_id for r in members],
                "member_best": [r.best_val_loss for r in members],
                "parameters": sum(r.parameters for r in members),
                "epochs": max(r.epochs for r in members),
                "vocab_size": first.vocab_size,
                "valid_chars": first.valid_chars,
                "wall_time_s": sum(r.wall_time_s for r in members),
                "run_id": parent_run_id,
            }
        )
    return rows
