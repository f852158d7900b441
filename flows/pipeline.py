"""The nightly pipeline as a recipe: fetch → prepare → train each architecture → compare → promote.

    python -m flows.pipeline --quick --corpus-uri ../shared/data/nietzsche.txt    # see flows/cli.py

The steps are :mod:`charlm` functions; this module only makes them Prefect tasks and
orders them. Parameters: :class:`flows.params.PipelineParams`.
"""

from __future__ import annotations

import os

os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a bar per logged model is console noise
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "charlm")  # the per-epoch lines, in the task's log

import logging
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any
from uuid import UUID

import mlflow
from mlflow.entities import Run
from mlflow.tracking import MlflowClient
from prefect import flow, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.exceptions import TerminationSignal
from prefect.runtime import flow_run, task_run
from prefect.task_runners import ThreadPoolTaskRunner

from charlm import compare, prepared, registry, stopping
from charlm.device import uses_cuda
from charlm.distributed import DistributedConfig, GpuAllocator
from charlm.experiment import (
    close_orphaned_runs,
    end_run,
    log_seed_ensembles,
    owner_gone,
    seed_groups,
    start_parent_run,
    train_in_child_run,
)
from charlm.job import TrainJob, TrainResult, run_fingerprint
from charlm.prepared import CorpusRef, PreparedRef, PrepSettings
from charlm.provenance import fingerprint as provenance_fingerprint
from charlm.storage import CorpusFetchError, fetch_corpus
from charlm.tracking import check_tracking_server
from flows.nodes import cancel_pending, start_joining_nodes
from flows.params import PipelineParams
from flows.report import ProgressArtifact, format_summary, logger, promotion_markdown
from flows.runners import gpu_request, run_queued

logging.getLogger("charlm").setLevel(logging.INFO)  # the per-epoch lines of charlm.progress

# --------------------------------------------------------------------------- tasks


def _transient(task: Any, run: Any, state: Any) -> bool:
    """Retry a fetch only for what may pass (a dropped connection, a 5xx), never for bad input."""
    try:
        state.result()
    except CorpusFetchError as err:
        return err.transient
    except Exception:
        return False
    return False


@task(name="fetch-corpus", retries=2, retry_delay_seconds=[10, 60], retry_condition_fn=_transient)
def fetch(uri: str, endpoint_url: str | None, root: str) -> CorpusRef:
    """Download the corpus and keep its bytes in the store (the clients retry single requests;
    this task retries a failed fetch twice more, minutes apart, only when the failure may pass)."""
    corpus = prepared.store_corpus(fetch_corpus(uri, endpoint_url=endpoint_url), root, endpoint_url)
    logger().info("fetched %s: %d bytes, sha256 %s, ETag %s", uri, corpus.size, corpus.sha256, corpus.etag)
    return corpus


@task(name="prepare-corpus")
def prepare(corpus: CorpusRef, settings: PrepSettings, root: str) -> PreparedRef:
    """Split + vocabulary + encoded arrays, once per (corpus, settings): a prepared directory is reused."""
    data = prepared.write(corpus, settings, root)
    logger().info("prepared %s: %s", data.dir, data.stats)
    return data


def _train_run_name() -> str:
    return f"train-{task_run.parameters['job'].name}"


@task(name="train", task_run_name=_train_run_name)
def train(
    job: TrainJob,
    experiment_id: str,
    parent_run_id: str,
    distributed: DistributedConfig | None = None,
    gpus_per_task: int | None = None,
    node_deployment: str | None = None,
) -> TrainResult:
    """Train one architecture in its MLflow child run: here, or as a DDP job on an allotted set of
    GPUs — across machines when ``distributed.nnodes > 1`` (this task is the job's driver)."""
    run = {
        "experiment_id": experiment_id,
        "parent_run_id": parent_run_id,
        "distributed": distributed,
        "tags": {"prefect.flow_run_id": str(flow_run.get_id())},  # a later pipeline can tell if it died
    }
    if distributed is None:
        return train_in_child_run(job, callbacks=[ProgressArtifact(job.name)], **run)
    nodes = start_joining_nodes(distributed, node_deployment, gpus_per_task) if distributed.nnodes > 1 else []
    try:
        if gpus_per_task and distributed.backend != "gloo" and uses_cuda(job.config.device):
            with GpuAllocator().acquire(gpus_per_task) as devices:  # waits for a free, disjoint set
                logger().info("%s: GPUs %s", job.name, devices)
                return train_in_child_run(job, devices=devices, **run)
        return train_in_child_run(job, **run)
    except BaseException:
        cancel_pending(nodes)
        raise


@task(name="ensemble-seeds")
def ensemble_seeds(parent_run_id: str, results: list[TrainResult], data: list[PreparedRef]) -> list[dict[str, Any]]:
    """Each architecture trained with several seeds: the ensemble of their best checkpoints,
    evaluated and logged on the parent run as a promotion candidate."""
    rows = log_seed_ensembles(parent_run_id, results, data)
    for row in rows:
        logger().info(
            "%s: %s %.4f (seeds %s: %s)", row["architecture"], row["label"], row["val_loss"],
            ", ".join(map(str, row["seeds"])), ", ".join(f"{v:.4f}" for v in row["member_best"]),
        )  # fmt: skip
    return rows


@task(name="compare-architectures")
def compare_architectures(
    results: list[TrainResult],
    parent_run_id: str,
    output_dir: str,
    primary_task: str,
    title: str,
    seed_ensembles: list[dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """The table, ranked within each task (Prefect artifact, CSV, the parent run's description),
    and the validation curves against epochs and against wall-clock time, on the parent run."""
    table = compare.comparison_table(results, primary_task, seed_ensembles or [])
    out = Path(output_dir)
    csv_path, png_path, time_path = out / "comparison.csv", out / "val_loss_curves.png", out / "val_loss_vs_time.png"
    compare.rounded(table).to_csv(csv_path, index=False)
    compare.plot_validation_curves(results, png_path, title)
    compare.plot_loss_against_time(results, time_path, title)
    client = MlflowClient()
    for path in (csv_path, png_path, time_path):
        client.log_artifact(parent_run_id, str(path), artifact_path="comparison")
    description = f"**{title}** — ranked within each task; the best of *{primary_task}* is promoted.\n\n"
    client.set_tag(parent_run_id, "mlflow.note.content", description + compare.markdown(table))
    records: list[dict[str, Any]] = compare.rounded(table).to_dict("records")
    create_table_artifact(records, key="charlm-comparison", description="Ranked by best val loss within each task")
    return table.to_dict("records")


@task(name="promote-best", retries=2, retry_delay_seconds=[10, 60])
def promote(
    parent_run_id: str, model_name: str, margin: float, corpus: CorpusRef, max_ensemble: int = 3
) -> dict[str, Any]:
    """Register the run's best model; champion only if it beats the champion (decision logged).
    Safe to retry: a candidate already registered keeps its version."""
    decision = registry.promote_run(
        parent_run_id, model_name=model_name, margin=margin, read_corpus=corpus.read_text, max_ensemble=max_ensemble
    )
    create_markdown_artifact(promotion_markdown(decision.as_dict()), key="charlm-promotion", description="Registry")
    logger().info("promotion: %s v%s — %s", model_name, decision.version, decision.reason)
    return decision.as_dict()


# --------------------------------------------------------------------------- flow


def stop_reason(err: BaseException) -> str | None:
    """Why the flow is being stopped, when ``err`` says it is: a signal or a cancellation."""
    if isinstance(err, KeyboardInterrupt):
        return "SIGINT (Ctrl-C)"
    if isinstance(err, TerminationSignal):
        return f"{signal.Signals(err.signal).name} (a stop or a cancellation)"
    if isinstance(err, stopping.TrainingStopped):
        return stopping.requested() or str(err)
    return None


def unchanged_champion(fingerprint: str, model_name: str) -> str | None:
    """The champion's version when it came from a run with this fingerprint: the same corpus,
    architectures, settings and code."""
    champion = registry.alias_version(MlflowClient(), model_name, registry.CHAMPION)
    if champion is not None and champion.tags.get("charlm.run_fingerprint") == fingerprint:
        return str(champion.version)
    return None


def why_dead(current_flow_run: str) -> Callable[[Run], str | None]:
    """How to tell that a RUNNING MLflow run belongs to a dead pipeline: its process is gone from
    this host, or its Prefect flow run has ended (then marked Crashed if it still says Running)."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound
    from prefect.states import Crashed

    def check(run: Run) -> str | None:
        flow_run_id = run.data.tags.get("prefect.flow_run_id")
        if flow_run_id == current_flow_run:
            return None
        gone = owner_gone(run)
        if flow_run_id in (None, "local"):
            return gone
        with get_client(sync_client=True) as client:
            try:
                state = client.read_flow_run(UUID(flow_run_id)).state
            except (ObjectNotFound, ValueError):
                return gone or f"its flow run {flow_run_id} no longer exists"
            if state is not None and state.is_final():
                return f"its flow run {flow_run_id} ended {state.name}"
            if gone and state is not None and state.is_running():
                client.set_flow_run_state(UUID(flow_run_id), Crashed(message=f"charlm: {gone}"), force=True)
        return gone

    return check


def student_jobs(
    params: PipelineParams, jobs: list[TrainJob], results: list[TrainResult], output_dir: Path
) -> list[TrainJob]:
    """``--distill``: for each architecture, a job that trains one more model (the seed after its
    seeds') toward the ensemble of its seeds' best checkpoints; named ``<architecture>-distilled``."""
    students = []
    for members in seed_groups(results):
        arch = members[0].architecture
        job = next(j for j in jobs if j.architecture == arch and j.data.settings.task == members[0].task)
        config = params.student_config(
            job.config, [r.checkpoints["best"] for r in members], max(r.seed for r in members) + 1
        )
        name = params.student_name(arch)
        students.append(
            job.model_copy(update={"config": config, "checkpoint_dir": str(output_dir / name), "label": name})
        )
    return students


@flow(name="charlm-pipeline", task_runner=ThreadPoolTaskRunner(max_workers=16), log_prints=True)
def charlm_pipeline(params: PipelineParams | None = None) -> dict[str, Any]:
    """Train and compare architectures on a corpus, promote the best; see :class:`PipelineParams`."""
    params = params or PipelineParams()
    configs = params.run_configs()  # validated before any work
    run_id = str(flow_run.get_id() or "local")
    requested, cores = params, len(os.sched_getaffinity(0))
    concurrency, cpu_dist, note = params.cpu_plan(cores)
    if note:
        print(note)
    params = params.model_copy(update={"concurrency": concurrency, "distributed": cpu_dist})
    distributed = params.distribution(run_id)
    tracking_uri = check_tracking_server()  # an unreachable tracking server fails here, before any work
    mlflow.set_tracking_uri(tracking_uri)
    experiment_id = mlflow.set_experiment(params.experiment_name).experiment_id
    for closed in close_orphaned_runs(experiment_id, why_dead(run_id)):
        print(f"MLflow run {closed} belonged to a pipeline that died: marked FAILED")
    root = str(prepared.store_root())

    corpus = fetch(params.corpus_uri, params.s3_endpoint_url, root)
    fingerprint = run_fingerprint(corpus.sha256, configs)
    if params.distill:  # the students' teachers are trained by this run: the flag and weight stand for them
        fingerprint = provenance_fingerprint(fingerprint, "distill", params.distill_weight)
    if params.skip_if_unchanged and (version := unchanged_champion(fingerprint, params.model_name)):
        print(f"{params.model_name} v{version} (champion) came from this corpus, settings and code: nothing to do")
        return {"skipped": True, "corpus": corpus.model_dump(), "champion_version": version}

    settings = {PrepSettings.of(c) for c in configs}
    data = {s: prepare(corpus, s, root) for s in sorted(settings, key=lambda s: s.key(corpus.sha256))}
    output_dir = Path(root) / "runs" / run_id
    output_dir.mkdir(parents=True, exist_ok=True)
    run_name = f"pipeline-{flow_run.get_name() or 'local'}"
    tags = {"prefect.flow_run_id": run_id, "charlm.fingerprint": fingerprint}
    experiment_id, parent_id = start_parent_run(params.experiment_name, run_name, corpus, tags)
    client = MlflowClient()
    try:
        client.log_param(parent_id, "architectures", ",".join(params.architectures))
        client.log_param(parent_id, "preset", params.preset_name)
        client.log_param(parent_id, "seeds", str(params.seeds))
        if params.distill:
            client.log_param(parent_id, "distill_weight", str(params.distill_weight))
        jobs = [
            TrainJob(
                config=c,
                data=data[PrepSettings.of(c)],
                checkpoint_dir=str(output_dir / (params.job_name(c) or c.architecture)),
                log_epochs=True,
                label=params.job_name(c),
            )
            for c in configs
        ]

        def submit(index: int, job: TrainJob, distributed: DistributedConfig | None = distributed) -> Any:
            job_dist = distributed.for_job(job.name, index) if distributed else None
            with gpu_request(params.gpus_per_task):
                return train.submit(
                    job, experiment_id, parent_id, job_dist, params.gpus_per_task, params.node_deployment
                )

        results, failures = run_queued(jobs, submit, params.concurrency)
        if failures:
            raise RuntimeError(f"{len(failures)} training task(s) failed: " + "; ".join(failures))
        ensembles = ensemble_seeds(parent_id, results, list(data.values())) if params.seeds > 1 else []
        if params.distill:  # one student per architecture, taught by its seeds' best checkpoints
            students = student_jobs(params, jobs, results, output_dir)
            # fewer tasks than the seeds' wave: each student's ranks get the cores the seeds shared
            _, student_cpu, _ = requested.cpu_plan(cores, tasks=len(students))
            dist = requested.model_copy(update={"distributed": student_cpu}).distribution(run_id)
            taught, failures = run_queued(students, lambda i, job: submit(len(jobs) + i, job, dist), params.concurrency)
            if failures:
                raise RuntimeError(f"{len(failures)} distillation task(s) failed: " + "; ".join(failures))
            results = results + taught
        champion = registry.alias_version(client, params.model_name, registry.CHAMPION)
        primary = compare.primary_task(results, champion.tags.get("charlm.task") if champion else None)
        title = f"{corpus.uri}, preset {params.preset_name}" + (f", {params.seeds} seeds" if params.seeds > 1 else "")
        title += ", a student of each architecture's seeds" if params.distill else ""
        table = compare_architectures(results, parent_id, str(output_dir), primary, title, ensembles)
        promotion = (
            promote(parent_id, params.model_name, params.promotion_margin, corpus, params.max_ensemble)
            if params.promote_best
            else None
        )
        client.set_tag(parent_id, "charlm.best_architecture", table[0]["architecture"])
        client.log_metric(parent_id, "best_val_loss", table[0]["best_val_loss"])
    except BaseException as err:
        if (reason := stop_reason(err)) is not None:  # every training thread stops at its next step
            stopping.request(reason)
        end_run(parent_id, err)
        raise
    end_run(parent_id)
    summary = {
        "parent_run_id": parent_id,
        "experiment_id": experiment_id,
        "tracking_uri": tracking_uri,
        "corpus": corpus.model_dump(),
        "best": table[0],
        "primary_task": primary,
        "table": table,
        "seed_ensembles": ensembles,
        "results": [r.model_dump(exclude={"history"}) for r in results],
        "output_dir": str(output_dir),
        "prepared": {d.key: d.model_dump() for d in data.values()},
        "promotion": promotion,
        "skipped": False,
    }
    print(format_summary(summary))
    return summary


if __name__ == "__main__":
    from flows.cli import main

    main(charlm_pipeline, sys.argv[1:])
