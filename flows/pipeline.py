"""The nightly pipeline as a recipe: fetch → prepare → train each architecture → compare → promote.

    python -m flows.pipeline --quick --corpus-uri ../shared/data/nietzsche.txt    # see flows/cli.py

The steps are :mod:`charlm` functions; this module only makes them Prefect tasks and
orders them. Parameters: :class:`flows.params.PipelineParams`.
"""

from __future__ import annotations

import os

os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

import sys
from pathlib import Path
from typing import Any

import mlflow
from mlflow.tracking import MlflowClient
from prefect import flow, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.runtime import flow_run, task_run
from prefect.task_runners import ThreadPoolTaskRunner

from charlm import compare, prepared, registry
from charlm.device import uses_cuda
from charlm.distributed import DistributedConfig, GpuAllocator
from charlm.experiment import start_parent_run, train_in_child_run
from charlm.job import TrainJob, TrainResult
from charlm.prepared import CorpusRef, PreparedRef, PrepSettings
from charlm.storage import CorpusFetchError, fetch_corpus
from charlm.tracking import check_tracking_server
from flows.nodes import cancel_pending, start_joining_nodes
from flows.params import PipelineParams
from flows.report import format_summary, logger, promotion_markdown
from flows.runners import gpu_request, run_queued

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
    corpus = prepared.store_corpus(fetch_corpus(uri, endpoint_url=endpoint_url), root)
    logger().info("fetched %s: %d bytes, sha256 %s, ETag %s", uri, corpus.size, corpus.sha256, corpus.etag)
    return corpus


@task(name="prepare-corpus")
def prepare(corpus: CorpusRef, settings: PrepSettings, root: str) -> PreparedRef:
    """Split + vocabulary + encoded arrays, once per (corpus, settings): a prepared directory is reused."""
    data = prepared.write(corpus, settings, root)
    logger().info("prepared %s: %s", data.dir, data.stats)
    return data


def _train_run_name() -> str:
    return f"train-{task_run.parameters['job'].architecture}"


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
    run = {"experiment_id": experiment_id, "parent_run_id": parent_run_id, "distributed": distributed}
    if distributed is None:
        return train_in_child_run(job, **run)
    nodes = start_joining_nodes(distributed, node_deployment, gpus_per_task) if distributed.nnodes > 1 else []
    try:
        if gpus_per_task and distributed.backend != "gloo" and uses_cuda(job.config.device):
            with GpuAllocator().acquire(gpus_per_task) as devices:  # waits for a free, disjoint set
                logger().info("%s: GPUs %s", job.architecture, devices)
                return train_in_child_run(job, devices=devices, **run)
        return train_in_child_run(job, **run)
    except BaseException:
        cancel_pending(nodes)
        raise


@task(name="compare-architectures")
def compare_architectures(results: list[TrainResult], parent_run_id: str, output_dir: str) -> list[dict[str, Any]]:
    """The ranked table (Prefect artifact, CSV) and the validation curves, on the parent run."""
    table = compare.comparison_table(results)
    csv_path, png_path = Path(output_dir) / "comparison.csv", Path(output_dir) / "val_loss_curves.png"
    table.to_csv(csv_path, index=False)
    compare.plot_validation_curves(results, png_path)
    for path in (csv_path, png_path):
        MlflowClient().log_artifact(parent_run_id, str(path), artifact_path="comparison")
    records: list[dict[str, Any]] = table.round(4).to_dict("records")
    create_table_artifact(records, key="charlm-comparison", description="Architectures by best val loss (nats/char)")
    return records


@task(name="promote-best", retries=2, retry_delay_seconds=[10, 60])
def promote(parent_run_id: str, model_name: str, margin: float, corpus: CorpusRef) -> dict[str, Any]:
    """Register the run's best model; champion only if it beats the champion (decision logged).
    Safe to retry: a candidate already registered keeps its version."""
    decision = registry.promote_run(parent_run_id, model_name=model_name, margin=margin, read_corpus=corpus.read_text)
    create_markdown_artifact(promotion_markdown(decision.as_dict()), key="charlm-promotion", description="Registry")
    logger().info("promotion: %s v%s — %s", model_name, decision.version, decision.reason)
    return decision.as_dict()


# --------------------------------------------------------------------------- flow


def unchanged_champion(corpus: CorpusRef, model_name: str) -> str | None:
    """The champion's version when it was trained on exactly this corpus."""
    champion = registry.alias_version(MlflowClient(), model_name, registry.CHAMPION)
    if champion is not None and champion.tags.get("charlm.corpus_sha256") == corpus.sha256:
        return str(champion.version)
    return None


@flow(name="charlm-pipeline", task_runner=ThreadPoolTaskRunner(max_workers=16), log_prints=True)
def charlm_pipeline(params: PipelineParams | None = None) -> dict[str, Any]:
    """Train and compare architectures on a corpus, promote the best; see :class:`PipelineParams`."""
    params = params or PipelineParams()
    configs = params.run_configs()  # validated before any work
    run_id = str(flow_run.get_id() or "local")
    distributed = params.distribution(run_id)
    tracking_uri = check_tracking_server()  # an unreachable tracking server fails here, before any work
    mlflow.set_tracking_uri(tracking_uri)
    root = str(prepared.store_root())

    corpus = fetch(params.corpus_uri, params.s3_endpoint_url, root)
    if params.skip_if_unchanged and (version := unchanged_champion(corpus, params.model_name)):
        print(f"corpus {corpus.sha256[:12]} unchanged and {params.model_name} v{version} (champion) was trained on it")
        return {"skipped": True, "corpus": corpus.model_dump(), "champion_version": version}

    settings = {PrepSettings.of(c) for c in configs}
    data = {s: prepare(corpus, s, root) for s in sorted(settings, key=lambda s: s.key(corpus.sha256))}
    output_dir = Path(root) / "runs" / run_id
    output_dir.mkdir(parents=True, exist_ok=True)
    run_name = f"pipeline-{flow_run.get_name() or 'local'}"
    experiment_id, parent_id = start_parent_run(
        params.experiment_name, run_name, corpus, {"prefect.flow_run_id": run_id}
    )
    client = MlflowClient()
    try:
        client.log_param(parent_id, "architectures", ",".join(params.architectures))
        client.log_param(parent_id, "preset", params.preset_name)
        jobs = [
            TrainJob(config=c, data=data[PrepSettings.of(c)], checkpoint_dir=str(output_dir / c.architecture))
            for c in configs
        ]

        def submit(index: int, job: TrainJob) -> Any:
            job_dist = distributed.for_job(job.architecture, index) if distributed else None
            with gpu_request(params.gpus_per_task):
                return train.submit(
                    job, experiment_id, parent_id, job_dist, params.gpus_per_task, params.node_deployment
                )

        results, failures = run_queued(jobs, submit, params.concurrency)
        if failures:
            raise RuntimeError(f"{len(failures)} architecture(s) failed: " + "; ".join(failures))
        table = compare_architectures(results, parent_id, str(output_dir))
        promotion = (
            promote(parent_id, params.model_name, params.promotion_margin, corpus) if params.promote_best else None
        )
    except BaseException:
        client.set_terminated(parent_id, status="FAILED")
        raise
    client.set_tag(parent_id, "charlm.best_architecture", table[0]["architecture"])
    client.log_metric(parent_id, "best_val_loss", table[0]["best_val_loss"])
    client.set_terminated(parent_id, status="FINISHED")
    summary = {
        "parent_run_id": parent_id,
        "experiment_id": experiment_id,
        "tracking_uri": tracking_uri,
        "corpus": corpus.model_dump(),
        "best": table[0],
        "table": table,
        "results": [compare.row(r) | r.model_dump(exclude={"history"}) for r in results],
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
