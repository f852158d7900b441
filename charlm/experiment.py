"""MLflow lineage of a pipeline run: the parent run, one child run per architecture.

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
from pathlib import Path

import mlflow
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset
from mlflow.tracking import MlflowClient

from charlm.distributed import DistributedConfig, launch_training
from charlm.job import TrackingTarget, TrainJob, TrainResult, run_job
from charlm.prepared import CorpusRef


def log_corpus_input(run_id: str, corpus: CorpusRef) -> None:
    """The corpus as an MLflow dataset input, with its digest (lineage)."""
    dataset = MetaDataset(  # type: ignore[abstract]  # concrete at run time; MLflow's stub says otherwise
        source=resolve_dataset_source(corpus.uri), name=Path(corpus.uri).name or corpus.uri, digest=corpus.sha256[:36]
    )
    with mlflow.start_run(run_id=run_id, nested=True):
        mlflow.log_input(dataset, context="training", tags={"sha256": corpus.sha256, "size": str(corpus.size)})


def placement_tags(devices: list[int] | None) -> dict[str, str]:
    """Where a training ran: the GPUs it was allotted and what the process was shown."""
    tags = {}
    if devices is not None:
        tags["charlm.devices"] = ",".join(map(str, devices))
    if os.environ.get("CUDA_VISIBLE_DEVICES") is not None:  # set by Ray (num_gpus) or the operator
        tags["charlm.cuda_visible_devices"] = os.environ["CUDA_VISIBLE_DEVICES"]
    return tags


def start_parent_run(experiment_name: str, run_name: str, corpus: CorpusRef, tags: dict[str, str]) -> tuple[str, str]:
    """The pipeline's parent run, with the corpus as its input: ``(experiment_id, run_id)``."""
    client = MlflowClient()
    experiment = mlflow.set_experiment(experiment_name)
    run = client.create_run(
        experiment.experiment_id,
        run_name=run_name,
        tags={
            "charlm.corpus_sha256": corpus.sha256,
            "charlm.corpus_uri": corpus.uri,
            "charlm.kind": "pipeline",
            **tags,
        },
    )
    log_corpus_input(run.info.run_id, corpus)
    return experiment.experiment_id, run.info.run_id


def train_in_child_run(
    job: TrainJob,
    *,
    experiment_id: str,
    parent_run_id: str,
    distributed: DistributedConfig | None = None,
    devices: list[int] | None = None,
    tags: dict[str, str] | None = None,
) -> TrainResult:
    """Run ``job`` in a new child run of ``parent_run_id``; see the module docstring.

    ``distributed`` makes it a DDP job on ``devices`` (GPU indices; None on CPU).
    """
    client = MlflowClient()
    arch, corpus = job.architecture, job.data.corpus
    run = client.create_run(
        experiment_id,
        run_name=arch,
        tags={
            "mlflow.parentRunId": parent_run_id,
            "charlm.architecture": arch,
            "charlm.corpus_sha256": corpus.sha256,
            "charlm.host": socket.gethostname(),
            **placement_tags(devices),
            **(tags or {}),
        },
    )
    run_id = run.info.run_id
    job = job.model_copy(update={"tracking": TrackingTarget(tracking_uri=mlflow.get_tracking_uri(), run_id=run_id)})
    try:
        log_corpus_input(run_id, corpus)
        for name in ("vocab.json", "stats.json"):
            client.log_artifact(run_id, str(Path(job.data.dir) / name), artifact_path="data")
        started = time.perf_counter()
        result = run_job(job) if distributed is None else launch_training(job, dist=distributed, devices=devices)
        wall = time.perf_counter() - started
    except BaseException as err:
        client.set_tag(run_id, "charlm.error", "".join(traceback.format_exception_only(type(err), err))[:5000])
        client.set_terminated(run_id, status="FAILED")
        raise
    client.set_terminated(run_id, status="FINISHED")
    return result.model_copy(update={"wall_time_s": wall, "run_id": run_id})
