"""The nightly pipeline: fetch → prepare → train every architecture → compare.

    python -m flows.pipeline                                   # the notebook's models, s3://text-datasets/nietzsche.txt
    python -m flows.pipeline --corpus-uri ../shared/data/nietzsche.txt --preset tiny --arch char3 stateful_gru

Runs on Prefect's ephemeral mode and a local MLflow SQLite store unless
PREFECT_API_URL / MLFLOW_TRACKING_URI point at servers.
"""

from __future__ import annotations

import os

os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

import argparse
import contextlib
import hashlib
from pathlib import Path
from typing import Any, Literal

import torch
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.context import FlowRunContext
from prefect.futures import as_completed
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner

from charlm import experiment
from charlm.config import PRESETS, RunConfig, preset
from charlm.distributed import DistributedConfig, GpuAllocator
from charlm.models import ARCHITECTURES
from charlm.storage import DEFAULT_CORPUS_URI, FetchedCorpus, fetch_corpus
from charlm.tracking import check_tracking_server

CORPUS_URI_ENV = "CHARLM_CORPUS_URI"
HOME_ENV = "CHARLM_HOME"


def charlm_home() -> Path:
    return Path(os.environ.get(HOME_ENV, ".charlm")).resolve()


# --------------------------------------------------------------------------- tasks


@task(name="fetch-corpus")
def fetch(uri: str, endpoint_url: str | None = None) -> FetchedCorpus:
    """Download the corpus (boto3/urllib retry transient errors; bad input fails at once)."""
    corpus = fetch_corpus(uri, endpoint_url=endpoint_url)
    get_run_logger().info("fetched %s: %d bytes, sha256 %s, ETag %s", uri, corpus.size, corpus.sha256, corpus.etag)
    return corpus


def _prepare_key(context, parameters: dict[str, Any]) -> str:
    """Corpus digest + preparation settings (+ where the artifacts live): unchanged corpus → cache hit."""
    root = hashlib.sha256(str(parameters["root"]).encode()).hexdigest()[:8]
    return f"charlm-prepare-{experiment.preparation_key(parameters['sha256'], parameters['settings'])}-{root}"


@task(name="prepare-corpus", cache_key_fn=_prepare_key, persist_result=True)
def prepare(text: str, sha256: str, settings: dict[str, Any], root: str) -> dict[str, Any]:
    """Split + vocabulary + encoded arrays, cached on (corpus sha256, settings) across flow runs."""
    out = Path(root) / "prepared" / experiment.preparation_key(sha256, settings)
    prepared = experiment.prepare_artifacts(text, settings, out)
    get_run_logger().info("prepared %s: %s", out, prepared["stats"])
    return prepared


def start_joining_nodes(dist: DistributedConfig, node_deployment: str | None, gpus: int | None) -> list[Any]:
    """Ask the work pool behind ``node_deployment`` for the job's other ``nnodes - 1`` nodes
    (runs of :func:`flows.ddp_node.charlm_ddp_node`); without one, log what to run by hand."""
    logger = get_run_logger()
    parameters = {
        "nnodes": dist.nnodes,
        "rdzv_endpoint": dist.rdzv_endpoint,
        "rdzv_id": dist.rdzv_id,
        "nproc_per_node": dist.nproc_per_node,
        "max_restarts": dist.max_restarts,
        "join_timeout": dist.join_timeout,
        "gpus": gpus,
        "threads_per_rank": dist.threads_per_rank,
    }
    if not node_deployment:
        logger.info(
            "waiting up to %.0f s for %d more node(s): on each run  charlm join --nnodes %d --rdzv-endpoint %s "
            "--rdzv-id %s",
            dist.join_timeout,
            dist.nnodes - 1,
            dist.nnodes,
            dist.rdzv_endpoint,
            dist.rdzv_id,
        )
        return []
    from prefect.deployments import run_deployment

    runs = [
        run_deployment(node_deployment, parameters=parameters, timeout=0, as_subflow=True)
        for _ in range(dist.nnodes - 1)
    ]
    logger.info("%s: %d node run(s) of %s requested", dist.rdzv_id, len(runs), node_deployment)
    return runs


def cancel_pending(runs: list[Any]) -> None:
    """Node runs no worker picked up must not start after their job failed."""
    from prefect.client.orchestration import get_client
    from prefect.states import Cancelled

    try:
        with get_client(sync_client=True) as client:
            for run in runs:
                if not client.read_flow_run(run.id).state.is_final():
                    client.set_flow_run_state(run.id, Cancelled(message="the DDP job's driver failed"), force=True)
    except Exception as err:  # never hide the driver's own error behind this one
        get_run_logger().warning("could not cancel the job's pending node runs: %s", err)


@task(name="train-architecture")
def train(
    config: RunConfig,
    prepared_dir: str,
    experiment_id: str,
    parent_run_id: str,
    corpus: FetchedCorpus,
    output_dir: str,
    distributed: DistributedConfig | None = None,
    gpus_per_task: int | None = None,
    node_deployment: str | None = None,
) -> dict[str, Any]:
    """Train one architecture: in this process, or as a DDP job on an allotted set of GPUs —
    across machines when ``distributed.nnodes > 1`` (this task is the job's driver)."""
    kwargs = dict(experiment_id=experiment_id, parent_run_id=parent_run_id, corpus=corpus, output_dir=output_dir)
    if distributed is None:
        return experiment.train_architecture(config, prepared_dir, **kwargs)
    if distributed.nnodes > 1:
        nodes = start_joining_nodes(distributed, node_deployment, gpus_per_task)
        try:
            return _train_ddp(config, prepared_dir, distributed, gpus_per_task, kwargs)
        except BaseException:
            cancel_pending(nodes)
            raise
    return _train_ddp(config, prepared_dir, distributed, gpus_per_task, kwargs)


def _train_ddp(config, prepared_dir, distributed, gpus_per_task, kwargs) -> dict[str, Any]:
    if gpus_per_task and torch.cuda.is_available():
        with GpuAllocator().acquire(gpus_per_task) as devices:  # waits for a free, disjoint set
            get_run_logger().info("%s: GPUs %s", config.architecture, devices)
            return experiment.train_architecture(
                config, prepared_dir, distributed=distributed, devices=devices, **kwargs
            )
    return experiment.train_architecture(config, prepared_dir, distributed=distributed, **kwargs)


@task(name="compare-architectures")
def compare(results: list[dict[str, Any]], parent_run_id: str, output_dir: str) -> list[dict[str, Any]]:
    from mlflow.tracking import MlflowClient

    table = experiment.comparison_table(results)
    out = Path(output_dir)
    csv_path, png_path = out / "comparison.csv", out / "val_loss_curves.png"
    table.to_csv(csv_path, index=False)
    experiment.plot_validation_curves(results, png_path)
    client = MlflowClient()
    client.log_artifact(parent_run_id, str(csv_path), artifact_path="comparison")
    client.log_artifact(parent_run_id, str(png_path), artifact_path="comparison")
    records = table.round(4).to_dict("records")
    create_table_artifact(
        table=records, key="charlm-comparison", description="Architectures ranked by best validation loss (nats/char)"
    )
    return records


@task(name="promote-best")
def promote(parent_run_id: str, model_name: str, margin: float, corpus_text: str) -> dict[str, Any]:
    """Register the run's best model; champion only if it beats the champion (decision logged)."""
    decision = experiment.promote_run(
        parent_run_id, model_name=model_name, margin=margin, corpus_text=corpus_text
    ).as_dict()
    outcome = "**promoted to champion**" if decision["promoted"] else "kept as **challenger**"
    candidate = decision["candidate"]
    create_markdown_artifact(
        key="charlm-promotion",
        markdown=(
            f"### {model_name} v{decision['version']}: {outcome}\n\n"
            f"- candidate: {candidate.get('architecture')} ({candidate.get('kind')}), "
            f"val loss {candidate.get('val_loss', float('nan')):.4f}\n- reason: {decision['reason']}\n"
        ),
        description="Model registry decision",
    )
    get_run_logger().info("promotion: %s v%s — %s", model_name, decision["version"], decision["reason"])
    return decision


# --------------------------------------------------------------------------- flow


def build_configs(
    architectures: list[str], preset_name: str, overrides: dict[str, dict[str, Any]] | None
) -> list[RunConfig]:
    """Validate the flow's parameters into one RunConfig per architecture (before any work)."""
    if not architectures:
        raise ValueError("architectures: give at least one")
    unknown = [a for a in architectures if a not in ARCHITECTURES]
    if unknown:
        raise ValueError(f"architectures: unknown {unknown}; known: {', '.join(ARCHITECTURES)}")
    overrides = overrides or {}
    stray = set(overrides) - set(architectures) - {"*"}
    if stray:
        raise ValueError(f"overrides: for architectures not requested: {sorted(stray)}")
    configs = []
    for arch in architectures:
        config = preset(preset_name, arch).override({"progress": False})
        config = config.override({**overrides.get("*", {}), **overrides.get(arch, {})})
        configs.append(config)
    return configs


@flow(name="charlm-pipeline", task_runner=ThreadPoolTaskRunner(max_workers=16), log_prints=True)
def charlm_pipeline(
    corpus_uri: str = DEFAULT_CORPUS_URI,
    architectures: list[str] = list(ARCHITECTURES),  # noqa: B006 - Prefect parameters are copied
    preset_name: Literal["notebook", "tiny"] = "notebook",
    overrides: dict[str, dict[str, Any]] | None = None,
    concurrency: int = 2,
    experiment_name: str = "charlm",
    s3_endpoint_url: str | None = None,
    promote_best: bool = True,
    model_name: str = "charlm",
    promotion_margin: float = 0.0,
    skip_if_unchanged: bool = False,
    distributed: DistributedConfig | None = None,
    gpus_per_task: int | None = None,
    node_deployment: str | None = None,
) -> dict[str, Any]:
    """Train and compare architectures on a corpus; see the module docstring.

    ``distributed`` makes each architecture a DDP job; with ``nnodes > 1`` the job's
    other nodes are runs of ``node_deployment`` (a :mod:`flows.ddp_node` deployment on a
    work pool), or ``charlm join`` started by hand.
    """
    import mlflow
    from mlflow.tracking import MlflowClient

    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    configs = build_configs(architectures, preset_name, overrides)
    if distributed is not None and distributed.nnodes > 1:
        if distributed.rdzv_id is None:  # each architecture's job gets "<id>-<architecture>"
            distributed = distributed.model_copy(update={"rdzv_id": f"charlm-{str(flow_run.get_id())[:8]}"})
        distributed.check_multinode()
    uri = check_tracking_server()  # an unreachable tracking server fails here, before any work
    mlflow.set_tracking_uri(uri)
    corpus = fetch(corpus_uri, s3_endpoint_url)
    if skip_if_unchanged:
        from charlm.registry import CHAMPION, alias_version

        champion = alias_version(MlflowClient(), model_name, CHAMPION)
        if champion is not None and champion.tags.get("charlm.corpus_sha256") == corpus.sha256:
            print(
                f"corpus {corpus.sha256[:12]} unchanged and {model_name} v{champion.version} (champion) "
                "was trained on it: skipping training"
            )
            return {"skipped": True, "corpus": corpus.describe(), "champion_version": champion.version}

    home = charlm_home()
    run_id = str(flow_run.get_id() or "local")
    output_dir = home / "runs" / run_id
    output_dir.mkdir(parents=True, exist_ok=True)
    prepared: dict[str, dict[str, Any]] = {}
    for config in configs:
        settings = experiment.preparation_settings(config)
        key = experiment.preparation_key(corpus.sha256, settings)
        if key not in prepared:
            prepared[key] = prepare(corpus.text, corpus.sha256, settings, str(home))
            missing = [f for f in experiment.PREPARED_FILES if not (Path(prepared[key]["dir"]) / f).is_file()]
            if missing:  # a cached result whose files were deleted since: prepare again
                print(f"cached preparation {prepared[key]['dir']} lacks {', '.join(missing)}: preparing again")
                refresh = prepare.with_options(refresh_cache=True)
                prepared[key] = refresh(corpus.text, corpus.sha256, settings, str(home))

    client = MlflowClient()
    exp = mlflow.set_experiment(experiment_name)
    parent = client.create_run(
        exp.experiment_id,
        run_name=f"pipeline-{flow_run.get_name() or 'local'}",
        tags={
            "prefect.flow_run_id": run_id,
            "charlm.corpus_sha256": corpus.sha256,
            "charlm.corpus_uri": corpus.uri,
            "charlm.kind": "pipeline",
        },
    )
    parent_id = parent.info.run_id
    try:
        experiment.log_corpus_input(parent_id, corpus)
        client.log_param(parent_id, "architectures", ",".join(architectures))
        client.log_param(parent_id, "preset", preset_name)
        results, failures = _train_all(
            configs,
            prepared,
            corpus,
            exp.experiment_id,
            parent_id,
            output_dir,
            concurrency,
            distributed,
            gpus_per_task,
            node_deployment,
        )
        if failures:
            raise RuntimeError(f"{len(failures)} architecture(s) failed: " + "; ".join(failures))
        table = compare(results, parent_id, str(output_dir))
        decision = promote(parent_id, model_name, promotion_margin, corpus.text) if promote_best else None
    except BaseException:
        client.set_terminated(parent_id, status="FAILED")
        raise
    best = table[0]
    client.set_tag(parent_id, "charlm.best_architecture", best["architecture"])
    client.log_metric(parent_id, "best_val_loss", best["best_val_loss"])
    client.set_terminated(parent_id, status="FINISHED")
    summary = {
        "parent_run_id": parent_id,
        "experiment_id": exp.experiment_id,
        "tracking_uri": uri,
        "corpus": corpus.describe(),
        "best": best,
        "table": table,
        "results": results,
        "output_dir": str(output_dir),
        "prepared": prepared,
        "promotion": decision,
        "skipped": False,
    }
    print(format_summary(summary))
    return summary


def submit_with_resources(task_, gpus: int | None, *args: Any):
    """Submit ``task_``, declaring its GPUs to a distributed task runner's resource model:
    Ray's ``num_gpus`` (prefect-ray) or a Dask worker resource ``GPU`` (prefect-dask)."""
    runner = type(FlowRunContext.get().task_runner).__name__ if FlowRunContext.get() else ""
    context: Any = contextlib.nullcontext()
    if gpus and runner == "RayTaskRunner":
        from prefect_ray.context import remote_options

        context = remote_options(num_gpus=gpus)
    elif gpus and runner == "DaskTaskRunner":
        import dask

        context = dask.annotate(resources={"GPU": gpus})
    with context:
        return task_.submit(*args)


def make_task_runner(kind: str, address: str | None = None, concurrency: int = 16, **options: Any):
    """``thread`` (default, one host), ``dask`` (prefect-dask) or ``ray`` (prefect-ray); ``address``
    names an existing cluster (``tcp://scheduler:8786``, ``ray://head:10001``), else a local one starts
    (``options`` go to the runner: Ray's ``init_kwargs``, Dask's ``cluster_kwargs`` such as
    ``resources={"GPU": 8}`` for the local cluster's workers)."""
    if kind == "thread":
        return ThreadPoolTaskRunner(max_workers=concurrency)
    if kind == "dask":
        # Dask workers are daemonic by default and could not start the DDP workers.
        os.environ.setdefault("DASK_DISTRIBUTED__WORKER__DAEMON", "False")
        from prefect_dask import DaskTaskRunner

        if address:
            return DaskTaskRunner(address=address, **options)
        local = {"n_workers": concurrency, "threads_per_worker": 1, "processes": True}
        return DaskTaskRunner(**{**options, "cluster_kwargs": {**local, **options.get("cluster_kwargs", {})}})
    if kind == "ray":
        from prefect_ray import RayTaskRunner

        return RayTaskRunner(address=address, **options)
    raise ValueError(f"task runner {kind!r}: expected thread, dask or ray")


def _train_all(
    configs,
    prepared,
    corpus,
    experiment_id,
    parent_id,
    output_dir,
    concurrency,
    distributed=None,
    gpus_per_task=None,
    node_deployment=None,
):
    """Submit at most ``concurrency`` training tasks at a time; the rest queue here."""
    queue = list(enumerate(configs))
    running, results, failures = [], [], []
    while queue or running:
        while queue and len(running) < concurrency:
            index, config = queue.pop(0)
            job = distributed.for_job(config.architecture, index) if distributed is not None else None
            key = experiment.preparation_key(corpus.sha256, experiment.preparation_settings(config))
            running.append(
                submit_with_resources(
                    train,
                    gpus_per_task,
                    config,
                    prepared[key]["dir"],
                    experiment_id,
                    parent_id,
                    corpus,
                    str(output_dir),
                    job,
                    gpus_per_task,
                    node_deployment,
                )
            )
        done = next(as_completed(running))
        running.remove(done)
        try:
            results.append(done.result())
        except Exception as err:  # the task failed; the other architectures still finish
            failures.append(f"{type(err).__name__}: {err}")
    return results, failures


def format_summary(summary: dict[str, Any]) -> str:
    uri = summary["tracking_uri"]
    ui = f"mlflow ui --backend-store-uri {uri}" if not uri.startswith("http") else f"open {uri}"
    lines = ["", "charlm pipeline finished", ""]
    lines.append(f"{'architecture':<18} {'val_loss':>9} {'val_bpc':>8} {'params':>9} {'epochs':>6} {'chars/s':>9}")
    for row in summary["table"]:
        lines.append(
            f"{row['architecture']:<18} {row['best_val_loss']:>9.4f} {row['best_val_bpc']:>8.4f} "
            f"{row['parameters']:>9,} {row['epochs']:>6} {row['chars_per_sec']:>9,.0f}"
        )
    best = summary["best"]
    lines += [
        "",
        f"best: {best['architecture']} with validation loss {best['best_val_loss']:.4f} nats/char",
        f"MLflow: experiment {summary['experiment_id']}, parent run {summary['parent_run_id']}",
        f"MLflow UI: {ui}",
        f"outputs: {summary['output_dir']}",
    ]
    if summary.get("promotion"):
        d = summary["promotion"]
        verdict = "is the new champion" if d["promoted"] else "stays challenger"
        lines.append(f"registry: {d['model_name']} v{d['version']} {verdict} ({d['reason']})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        prog="python -m flows.pipeline", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--corpus-uri",
        default=os.environ.get(CORPUS_URI_ENV, DEFAULT_CORPUS_URI),
        help=f"s3://, https://, file:// or a path (env {CORPUS_URI_ENV}; default: %(default)s)",
    )
    parser.add_argument(
        "--arch",
        nargs="+",
        default=list(ARCHITECTURES),
        metavar="ARCH",
        help="architectures to train (default: all ten)",
    )
    parser.add_argument("--preset", default="notebook", choices=list(PRESETS))
    parser.add_argument(
        "--quick",
        action="store_true",
        help="the tiny preset on char3, stateful_gru and stateful_lstm: a minute on a CPU",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override for every architecture, e.g. --set data.batch_size=32",
    )
    parser.add_argument("--concurrency", type=int, default=2, help="architectures trained at once")
    parser.add_argument("--experiment", default="charlm", help="MLflow experiment name")
    parser.add_argument("--model-name", default="charlm", help="registered model to promote into")
    parser.add_argument("--margin", type=float, default=0.0, help="improvement needed to replace the champion")
    parser.add_argument("--no-promote", action="store_true", help="train and compare only")
    parser.add_argument(
        "--skip-if-unchanged",
        action="store_true",
        help="skip training when the champion was trained on this exact corpus",
    )
    parser.add_argument(
        "--s3-endpoint-url",
        default=os.environ.get("CHARLM_S3_ENDPOINT_URL"),
        help="S3-compatible endpoint, e.g. MinIO (env CHARLM_S3_ENDPOINT_URL)",
    )
    ddp = parser.add_argument_group("distributed training (torch DDP through torch's elastic launcher)")
    ddp.add_argument("--ddp", action="store_true", help="train each architecture as a DDP job")
    ddp.add_argument("--nproc-per-node", type=int, help="workers per node (default: the task's GPUs, 1 on CPU)")
    ddp.add_argument(
        "--max-restarts", type=int, help="restart a failed worker group this often (env CHARLM_MAX_RESTARTS; default 0)"
    )
    ddp.add_argument("--gpus-per-task", type=int, help="GPUs allotted to each architecture task")
    ddp.add_argument("--nnodes", type=int, help="nodes per job (with --rdzv-endpoint; env CHARLM_NNODES)")
    ddp.add_argument(
        "--rdzv-endpoint",
        help="this machine's host:port for the c10d rendezvous of a multi-node job; architecture i uses port + i "
        "(env CHARLM_RDZV_ENDPOINT)",
    )
    ddp.add_argument("--rdzv-id", help="rendezvous id; architecture A's job uses ID-A (env CHARLM_RDZV_ID)")
    ddp.add_argument(
        "--node-deployment",
        default=os.environ.get("CHARLM_NODE_DEPLOYMENT"),
        help="deployment of flows/ddp_node.py that runs the other nodes, e.g. charlm-ddp-node/gpu "
        "(env CHARLM_NODE_DEPLOYMENT; without it, start them with 'charlm join')",
    )
    ddp.add_argument(
        "--task-runner",
        default=os.environ.get("CHARLM_TASK_RUNNER", "thread"),
        choices=["thread", "dask", "ray"],
        help="Prefect task runner (env CHARLM_TASK_RUNNER)",
    )
    ddp.add_argument(
        "--task-runner-address",
        default=os.environ.get("CHARLM_TASK_RUNNER_ADDRESS"),
        help="an existing Dask scheduler or Ray cluster",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.preset, args.arch = "tiny", ["char3", "stateful_gru", "stateful_lstm"]
    overrides = {"*": RunConfig.parse_overrides(args.set)} if args.set else None
    distributed = None
    if args.ddp or args.nproc_per_node or args.nnodes:
        given = {
            "nproc_per_node": args.nproc_per_node,
            "max_restarts": args.max_restarts,
            "nnodes": args.nnodes,
            "rdzv_endpoint": args.rdzv_endpoint,
            "rdzv_id": args.rdzv_id,
        }
        try:
            distributed = DistributedConfig.from_env(**given)
            distributed.check_multinode(require_id=False)  # before Prefect starts; the flow names the job
        except ValueError as err:  # pydantic's ValidationError included
            parser.error(str(err))
    flow_ = charlm_pipeline.with_options(
        task_runner=make_task_runner(args.task_runner, args.task_runner_address, max(args.concurrency, 1))
    )
    return flow_(
        corpus_uri=args.corpus_uri,
        architectures=args.arch,
        preset_name=args.preset,
        overrides=overrides,
        concurrency=args.concurrency,
        experiment_name=args.experiment,
        s3_endpoint_url=args.s3_endpoint_url,
        promote_best=not args.no_promote,
        model_name=args.model_name,
        promotion_margin=args.margin,
        skip_if_unchanged=args.skip_if_unchanged,
        distributed=distributed,
        gpus_per_task=args.gpus_per_task,
        node_deployment=args.node_deployment,
    )


if __name__ == "__main__":
    main()
