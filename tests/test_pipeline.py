"""End to end: a real S3 server (moto), a real `mlflow server` (PostgreSQL backend,
artifacts in that S3) and a real `prefect server` (its state in PostgreSQL too, as in
production); the flow trains three architectures with the tiny preset."""

from __future__ import annotations

import os
import time
from pathlib import Path

import boto3
import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import generated_text
from tests.services import CREDENTIALS, mlflow_server, moto_server, postgres_database, prefect_server

pytestmark = pytest.mark.integration

ARCHS = ["char3", "stateful_gru", "stateful_lstm"]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    work = tmp_path_factory.mktemp("stack")
    saved = dict(os.environ)
    os.environ.update(CREDENTIALS)
    os.environ["CHARLM_HOME"] = str(work / "home")
    os.environ["PREFECT_LOCAL_STORAGE_PATH"] = str(work / "prefect-results")
    from prefect.settings import PREFECT_API_URL, temporary_settings

    try:
        with moto_server() as s3_url, postgres_database() as db_uri, postgres_database() as prefect_db:
            s3 = boto3.client("s3", endpoint_url=s3_url, region_name="us-east-1")
            for bucket in ("corpora", "mlflow-artifacts"):
                s3.create_bucket(Bucket=bucket)
            s3.put_object(Bucket="corpora", Key="corpus.txt", Body=generated_text(1500, seed=1).encode())
            s3.put_object(Bucket="corpora", Key="copy.txt", Body=generated_text(1500, seed=1).encode())  # same bytes
            s3.put_object(Bucket="corpora", Key="long.txt", Body=generated_text(40000, seed=4).encode())
            s3.put_object(Bucket="corpora", Key="changed.txt", Body=generated_text(1500, seed=2).encode())
            s3.put_object(Bucket="corpora", Key="latin1.txt", Body="déjà vu".encode("latin-1"))
            with mlflow_server(db_uri, "s3://mlflow-artifacts/", work, s3_endpoint=s3_url) as tracking:
                os.environ["MLFLOW_TRACKING_URI"] = tracking
                with prefect_server(prefect_db, work) as api, temporary_settings({PREFECT_API_URL: api}):
                    try:
                        yield {"s3_url": s3_url, "s3": s3, "tracking": tracking, "home": work / "home"}
                    finally:  # send the logs and events still queued before the server stops
                        from prefect.events.worker import EventsWorker
                        from prefect.logging.handlers import APILogWorker

                        APILogWorker.drain_all(timeout=10)
                        EventsWorker.drain_all(timeout=10)
    finally:
        os.environ.clear()
        os.environ.update(saved)


def run_flow(stack, key="corpus.txt", task_runner=None, **kwargs):
    from flows.params import PipelineParams
    from flows.pipeline import charlm_pipeline

    params = {
        "corpus_uri": f"s3://corpora/{key}",
        "architectures": ARCHS,
        "preset_name": "tiny",
        "concurrency": 2,
        "experiment_name": "e2e",
        "s3_endpoint_url": stack["s3_url"],
        **kwargs,
    }
    flow_ = charlm_pipeline.with_options(task_runner=task_runner) if task_runner else charlm_pipeline
    return flow_(PipelineParams(**params))


@pytest.fixture(scope="module")
def first_run(stack):
    return run_flow(stack)


def test_parent_and_child_runs(stack, first_run):
    client = MlflowClient(stack["tracking"])
    parent = client.get_run(first_run["parent_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["charlm.corpus_sha256"] == first_run["corpus"]["sha256"]
    assert parent.data.tags["charlm.corpus_uri"] == "s3://corpora/corpus.txt"
    assert parent.data.tags["charlm.s3_endpoint"] == stack["s3_url"]
    assert parent.data.tags["prefect.flow_run_id"]
    assert parent.data.tags["mlflow.source.name"] == "flows/pipeline.py"  # the run page's "Source"
    assert parent.data.tags["charlm.code_version"] and parent.data.tags["charlm.fingerprint"]
    (dataset,) = parent.inputs.dataset_inputs
    assert dataset.dataset.digest == first_run["corpus"]["sha256"][:36]
    assert dataset.dataset.name == f"s3://corpora/corpus.txt @ {stack['s3_url']}"
    assert dataset.dataset.source_type == "s3"
    assert "| rank | architecture | candidate | best_val_loss |" in parent.data.tags["mlflow.note.content"]
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    assert sorted(c.data.tags["charlm.architecture"] for c in children) == sorted(ARCHS)
    assert all(c.info.status == "FINISHED" for c in children)
    # Concurrency 2: the three child runs never all overlap.
    spans = sorted((c.info.start_time, c.info.end_time) for c in children)
    assert spans[2][0] >= min(spans[0][1], spans[1][1])


def test_metrics_at_steps_and_artifacts_in_s3(stack, first_run):
    client = MlflowClient(stack["tracking"])
    for result in first_run["results"]:
        run_id = result["run_id"]
        val = client.get_metric_history(run_id, "val_loss")
        assert [m.step for m in val] == [1, 2, 3]
        steps = [m.step for m in client.get_metric_history(run_id, "train_loss_step")]
        assert len(steps) > 3 and steps == sorted(steps)
        assert len(client.get_metric_history(run_id, "lr")) == len(steps)
        run = client.get_run(run_id)
        assert run.data.params["model.architecture"] == result["architecture"]
        assert run.data.params["schedule.0.lr"] == "0.01" and "schedule.0.cycle_mult" not in run.data.params
        assert run.data.params["schedule.1.cycle_mult"] == "1"  # the SGDR phase has its fields
        names = {a.path for a in client.list_artifacts(run_id, "checkpoints")} | {
            a.path for a in client.list_artifacts(run_id, "data")
        }
        assert {"checkpoints/best.pt", "checkpoints/last.pt", "data/vocab.json"} <= names
    keys = [o["Key"] for o in stack["s3"].list_objects_v2(Bucket="mlflow-artifacts")["Contents"]]
    assert any(k.endswith("checkpoints/best.pt") for k in keys)
    assert any(k.endswith("data/vocab.json") for k in keys)
    parent_files = {a.path for a in client.list_artifacts(first_run["parent_run_id"], "comparison")}
    assert parent_files == {
        "comparison/comparison.csv",
        "comparison/val_loss_curves.png",
        "comparison/val_loss_vs_time.png",
    }
    for name in ("val_loss_curves.png", "val_loss_vs_time.png"):
        local = Path(client.download_artifacts(first_run["parent_run_id"], f"comparison/{name}"))
        assert local.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for result in first_run["results"]:  # time to quality: per epoch, and the targets the run reached
        elapsed = [m.value for m in client.get_metric_history(result["run_id"], "elapsed_s")]
        assert len(elapsed) == 3 and elapsed == sorted(elapsed) and elapsed[0] > 0
        for target, seconds in result["time_to_targets"].items():
            logged = client.get_metric_history(result["run_id"], f"time_to_val_loss_{target}_s")
            assert [m.value for m in logged] == pytest.approx([seconds])


def test_cycle_snapshots_are_logged_models(stack, first_run):
    import mlflow

    mlflow.set_tracking_uri(stack["tracking"])
    exp_id = first_run["experiment_id"]
    models = mlflow.search_logged_models(
        experiment_ids=[exp_id], output_format="list", filter_string="tags.`charlm.kind` = 'sgdr-snapshot'"
    )
    by_arch: dict[str, list] = {}
    for m in models:
        by_arch.setdefault(m.tags["charlm.architecture"], []).append(m)
    assert sorted(by_arch) == sorted(ARCHS)
    for arch, snaps in by_arch.items():
        assert sorted(m.tags["charlm.cycle"] for m in snaps) == ["0", "1"], arch
        for m in snaps:
            assert {x.key for x in m.metrics} >= {"val_loss"}
    model = mlflow.pyfunc.load_model(f"models:/{models[0].model_id}")
    out = model.predict([{"prime": "the spirit ", "length": 30, "seed": 0}])
    assert len(out[0]) == 30


def test_comparison_table(first_run):
    table = [r for r in first_run["table"] if r["candidate"] == "best checkpoint"]
    assert [r["architecture"] for r in table] == sorted(
        ARCHS, key=lambda a: next(r["best_val_loss"] for r in first_run["results"] if r["architecture"] == a)
    )
    assert first_run["best"] == first_run["table"][0]
    assert all(r["parameters"] > 0 and r["epochs"] == 3 for r in table)
    combined = {(r["architecture"], r["candidate"]) for r in first_run["table"]} - {
        (r["architecture"], r["candidate"]) for r in table
    }
    assert combined == {
        (arch, f"{kind} of the last 2 snapshots") for arch in ARCHS for kind in ("ensemble", "weight average")
    }  # two SGDR snapshots each: an ensemble and a weight average of both, with rows of their own


def test_rerun_reuses_prepared_artifacts_and_changed_corpus_does_not(stack, first_run):
    second = run_flow(stack, architectures=["char3", "stateful_gru"])
    prepared = first_run["prepared"]
    assert second["prepared"] == {k: v for k, v in prepared.items() if k in second["prepared"]}  # cached: same stamp
    changed = run_flow(stack, key="changed.txt", architectures=["char3"])
    assert changed["corpus"]["sha256"] != first_run["corpus"]["sha256"]
    assert set(changed["prepared"]).isdisjoint(prepared)


def test_a_cached_preparation_whose_files_were_deleted_is_prepared_again(stack, first_run):
    import shutil

    from charlm.config import tiny
    from charlm.prepared import FILES, PrepSettings

    key = PrepSettings.of(tiny("char3")).key(first_run["corpus"]["sha256"])
    entry = first_run["prepared"][key]
    shutil.rmtree(entry["dir"])
    again = run_flow(stack, architectures=["char3"], promote_best=False)
    (redone,) = again["prepared"].values()
    assert redone["dir"] == entry["dir"] and all((Path(entry["dir"]) / f).is_file() for f in FILES)
    assert again["results"][0]["epochs"] == 3


def process_worker(pool: str, workdir: Path, pythonpath: str | None = None):
    """A real `prefect worker` serving a process work pool, as its own process: (Popen, log path)."""
    import subprocess
    import sys

    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PREFECT_WORKER_QUERY_SECONDS": "1"}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    log = workdir / "worker.log"
    command = [sys.executable, "-m", "prefect", "worker", "start", "--pool", pool, "--type", "process"]
    return subprocess.Popen(command, cwd=workdir, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT), log


def stop_process(proc) -> None:
    import subprocess

    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


def training_child(stack, experiment: str, alive=lambda: True, log: Path | None = None):
    """Wait until the experiment's child run has logged training steps; that run."""
    client = MlflowClient(stack["tracking"])
    for _ in range(600):
        assert alive(), log.read_text()[-3000:] if log else "the process ended"
        runs = [r for r in _runs_in(stack, experiment) if "charlm.architecture" in r.data.tags]
        if runs and client.get_metric_history(runs[0].info.run_id, "train_loss_step"):
            return runs[0]
        time.sleep(0.5)
    raise AssertionError(log.read_text()[-3000:] if log else "no training step was logged")


def _runs_in(stack, experiment="e2e"):
    client = MlflowClient(stack["tracking"])
    exp = client.get_experiment_by_name(experiment)
    return [] if exp is None else client.search_runs([exp.experiment_id])


@pytest.mark.parametrize(
    ("key", "message"),
    [
        ("missing.txt", "s3://corpora/missing.txt: key 'missing.txt' not found"),
        ("latin1.txt", "s3://corpora/latin1.txt: not UTF-8"),
    ],
)
def test_bad_corpus_fails_clearly_and_logs_nothing(stack, first_run, key, message):
    from charlm.data import CorpusError

    before = len(_runs_in(stack))
    with pytest.raises(CorpusError, match=message):
        run_flow(stack, key=key)
    assert len(_runs_in(stack)) == before


def test_unreachable_tracking_server_fails_before_training(stack, monkeypatch):
    from charlm.tracking import TrackingUnavailable
    from tests.s3server import free_port

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    runs_dir = stack["home"] / "runs"
    before = set(runs_dir.iterdir()) if runs_dir.exists() else set()
    with pytest.raises(TrackingUnavailable, match="unreachable"):
        run_flow(stack)
    after = set(runs_dir.iterdir()) if runs_dir.exists() else set()
    assert after == before  # nothing trained, nothing written


def test_promotion_and_skipping_an_unchanged_corpus(stack, first_run):
    client = MlflowClient(stack["tracking"])
    decision = first_run["promotion"]
    version = client.get_model_version("charlm", decision["version"])
    assert decision["promoted"] and decision["reason"] == "no champion yet"  # the first run of the registry
    assert version.tags["charlm.decision"] == "promoted to champion"
    assert version.tags["charlm.corpus_sha256"] == first_run["corpus"]["sha256"]
    every = [r["best_val_loss"] for r in first_run["results"]]  # best checkpoints, ensembles and averages
    every += [c["val_loss"] for r in first_run["results"] for c in r["candidates"] if len(c["members"]) <= 3]
    assert float(version.tags["charlm.val_loss"]) == pytest.approx(min(every), abs=1e-6)  # a snapshot never wins
    assert client.get_run(first_run["parent_run_id"]).data.tags["charlm.decision"] == "promoted to champion"

    # Later runs may have moved the champion: skip a run the same as the one it came from.
    champion = client.get_model_version_by_alias("charlm", "champion")
    parent = client.get_run(champion.tags["charlm.parent_run_id"])
    key = parent.data.tags["charlm.corpus_uri"].rsplit("/", 1)[1]
    architectures = parent.data.params["architectures"].split(",")
    before = len(_runs_in(stack))
    skipped = run_flow(stack, key=key, architectures=architectures, skip_if_unchanged=True)
    assert skipped["skipped"] and skipped["champion_version"] == champion.version
    assert len(_runs_in(stack)) == before


def test_nightly_deployment_is_created_with_its_schedule(stack):
    from prefect.client.orchestration import get_client

    from flows.deploy import nightly_deployment

    deployment_id = nightly_deployment().apply()
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment(deployment_id)
    assert deployment.name == "nightly"
    assert [s.schedule.cron for s in deployment.schedules] == ["0 2 * * *"]
    assert deployment.schedules[0].schedule.timezone == "UTC"
    limit = deployment.global_concurrency_limit  # the deployment's limit lives in a global concurrency limit
    assert limit is not None and limit.limit == 1
    assert deployment.concurrency_options.collision_strategy == "CANCEL_NEW"
    assert deployment.parameters["params"]["skip_if_unchanged"] is True


def test_two_ddp_architecture_tasks_at_once(stack, tmp_path, monkeypatch):
    from charlm.distributed import DistributedConfig

    # Each job's rank 0 waits, before its first step, until both jobs are there: proof they ran at once.
    # One rank each: two jobs of two ranks would oversubscribe this 2-core host, and the flow would run
    # them one at a time (the barrier catches that: it failed when this test still asked for two ranks).
    monkeypatch.setenv("CHARLM_TEST_BARRIER", f"{tmp_path / 'barrier'}:2")
    summary = run_flow(
        stack,
        architectures=["stateful_gru", "seq_rnn"],
        concurrency=2,
        promote_best=False,
        distributed=DistributedConfig(nproc_per_node=1, threads_per_rank=1),
    )
    client = MlflowClient(stack["tracking"])
    runs = [client.get_run(r["run_id"]) for r in summary["results"]]
    assert sorted(r.data.tags["charlm.architecture"] for r in runs) == ["seq_rnn", "stateful_gru"]
    assert all(r.info.status == "FINISHED" and r.data.tags["charlm.world_size"] == "1" for r in runs)
    assert len(list((tmp_path / "barrier").iterdir())) == 2
    assert all(len(client.get_metric_history(r.info.run_id, "val_loss")) == 3 for r in runs)


def test_the_task_runner_swaps_for_dask_with_ddp_inside(stack):
    from charlm.distributed import DistributedConfig
    from flows.runners import make_task_runner

    summary = run_flow(
        stack,
        task_runner=make_task_runner("dask", concurrency=2),
        architectures=["seq_rnn"],
        concurrency=1,
        experiment_name="e2e-dask",
        promote_best=False,
        distributed=DistributedConfig(nproc_per_node=2, threads_per_rank=1),
    )
    (result,) = summary["results"]
    assert result["world_size"] == 2 and result["epochs"] == 3
    assert MlflowClient(stack["tracking"]).get_run(result["run_id"]).info.status == "FINISHED"


def runs_of_two_gpu_tasks(stack, runner, experiment_name):
    """Two architectures, one (declared) GPU each, DDP inside, through ``runner``: their MLflow runs."""
    from charlm.distributed import DistributedConfig

    summary = run_flow(
        stack,
        task_runner=runner,
        architectures=["seq_rnn", "char3"],
        concurrency=2,
        experiment_name=experiment_name,
        promote_best=False,
        distributed=DistributedConfig(nproc_per_node=1),
        gpus_per_task=1,
    )
    client = MlflowClient(stack["tracking"])
    runs = sorted((client.get_run(r["run_id"]) for r in summary["results"]), key=lambda r: r.info.start_time)
    assert all(r.info.status == "FINISHED" and r.data.tags["charlm.world_size"] == "1" for r in runs)
    return runs


def deploy_node_flow(pool: str, name: str) -> None:
    """A process work pool, and the DDP node flow deployed to it from this checkout."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate

    from flows.ddp_node import charlm_ddp_node

    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
    root = Path(__file__).resolve().parents[1]
    charlm_ddp_node.from_source(source=str(root), entrypoint="flows/ddp_node.py:charlm_ddp_node").deploy(
        name=name, work_pool_name=pool
    )


@pytest.fixture(scope="module")
def node_pool(stack, tmp_path_factory):
    """A Prefect process work pool with a real worker (`prefect worker start`) polling it, and the
    DDP node flow deployed to it: the second "machine" of a two-node job, here on loopback."""
    deploy_node_flow("loopback-nodes", "loopback")
    worker, log = process_worker("loopback-nodes", tmp_path_factory.mktemp("node-worker"))
    try:
        yield {"deployment": "charlm-ddp-node/loopback", "log": log}
    finally:
        stop_process(worker)


def test_a_two_node_ddp_job_whose_second_node_comes_from_a_work_pool(stack, node_pool):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    from charlm.distributed import DistributedConfig
    from tests.s3server import free_port

    dist = DistributedConfig(nnodes=2, rdzv_endpoint=f"127.0.0.1:{free_port()}", threads_per_rank=1, join_timeout=240)
    summary = run_flow(
        stack,
        architectures=["stateful_gru"],
        promote_best=False,
        distributed=dist,
        node_deployment=node_pool["deployment"],
    )
    (result,) = summary["results"]
    run = MlflowClient(stack["tracking"]).get_run(result["run_id"])
    assert run.info.status == "FINISHED" and result["epochs"] == 3
    assert run.data.tags["charlm.world_size"] == "2" and run.data.tags["charlm.nnodes"] == "2"
    with get_client(sync_client=True) as client:
        node_runs = client.read_flow_runs(
            deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["loopback"]))
        )
    assert len(node_runs) == 1, node_pool["log"].read_text()[-3000:]
    node = node_runs[0]
    assert node.state.is_completed(), node_pool["log"].read_text()[-3000:]
    assert node.parameters["dist"]["rdzv_id"].endswith("-stateful_gru") and node.parameters["dist"]["nnodes"] == 2
    assert node.parent_task_run_id is not None  # a subflow of the driver's training task


def test_the_task_runner_swaps_for_ray_and_gpus_per_task_become_ray_num_gpus(stack):
    """A local Ray cluster declaring two (logical) GPUs: two architecture tasks asking for one GPU each
    are placed by Ray, which gives each its own CUDA_VISIBLE_DEVICES; DDP runs inside each task."""
    from flows.runners import make_task_runner

    runner = make_task_runner(
        "ray", concurrency=2, init_kwargs={"num_cpus": 2, "num_gpus": 2, "include_dashboard": False}
    )
    assert type(runner).__name__ == "RayTaskRunner"
    runs = runs_of_two_gpu_tasks(stack, runner, "e2e-ray")
    assert sorted(r.data.tags["charlm.cuda_visible_devices"] for r in runs) == ["0", "1"]  # disjoint GPUs


def test_a_ddp_worker_error_fails_its_task_with_that_error_and_the_run_is_marked_failed(stack, monkeypatch):
    from charlm.distributed import DistributedConfig

    monkeypatch.setenv("CHARLM_FAULT_INJECT", "rank=1,step=5,mode=raise")
    with pytest.raises(
        RuntimeError,
        match=r"(?s)1 training task\(s\) failed: DistributedJobError: ChildFailedError.*"
        r"RuntimeError: \[charlm fault injection\] rank 1 raised at step 5",
    ):
        run_flow(
            stack,
            architectures=["seq_rnn"],
            experiment_name="e2e-ddp-failure",
            promote_best=False,
            distributed=DistributedConfig(nproc_per_node=2, threads_per_rank=1),  # no restarts left
        )
    (child,) = [r for r in _runs_in(stack, "e2e-ddp-failure") if r.data.tags.get("charlm.architecture") == "seq_rnn"]
    assert child.info.status == "FAILED" and "rank 1 raised at step 5" in child.data.tags["charlm.error"]
    (parent,) = [r for r in _runs_in(stack, "e2e-ddp-failure") if r.data.tags.get("charlm.kind") == "pipeline"]
    assert parent.info.status == "FAILED" and "1 training task(s) failed" in parent.data.tags["charlm.error"]


def test_a_multinode_job_whose_nodes_never_come_fails_and_cancels_their_runs(stack):
    """The node pool has no worker: the driver's rendezvous times out, the task fails with that
    error (no hang) and the node run nobody picked up is cancelled rather than left to start later."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    from charlm.distributed import DistributedConfig
    from tests.s3server import free_port

    deploy_node_flow("no-workers", "unserved")
    dist = DistributedConfig(nnodes=2, rdzv_endpoint=f"127.0.0.1:{free_port()}", join_timeout=15)
    with pytest.raises(RuntimeError, match=r"1 training task\(s\) failed: .*Timeout"):
        run_flow(
            stack,
            architectures=["char3"],
            experiment_name="e2e-no-nodes",
            promote_best=False,
            distributed=dist,
            node_deployment="charlm-ddp-node/unserved",
        )
    with get_client(sync_client=True) as client:
        unserved = DeploymentFilter(name=DeploymentFilterName(any_=["unserved"]))
        (node,) = client.read_flow_runs(deployment_filter=unserved)
    assert node.state.is_cancelled()


def test_with_dask_gpus_per_task_become_a_worker_resource(stack):
    """One Dask worker with two threads but one (declared) GPU: two tasks asking for a GPU each
    must run one after the other, though a thread is free."""
    from flows.runners import make_task_runner

    runner = make_task_runner(
        "dask", concurrency=2, cluster_kwargs={"n_workers": 1, "threads_per_worker": 2, "resources": {"GPU": 1}}
    )
    runs = runs_of_two_gpu_tasks(stack, runner, "e2e-dask-gpu")
    assert runs[1].info.start_time >= runs[0].info.end_time  # the GPU resource serialized them


def test_two_uris_with_the_same_bytes_stay_two_datasets(stack, first_run):
    copy = run_flow(stack, key="copy.txt", architectures=["char3"], promote_best=False)
    assert copy["corpus"]["sha256"] == first_run["corpus"]["sha256"]
    client = MlflowClient(stack["tracking"])
    for summary, key in ((first_run, "corpus.txt"), (copy, "copy.txt")):
        for run_id in [summary["parent_run_id"], *(r["run_id"] for r in summary["results"])]:
            (dataset,) = client.get_run(run_id).inputs.dataset_inputs
            assert dataset.dataset.name.startswith(f"s3://corpora/{key} @ ")  # never the other URI


def test_an_identical_rerun_registers_no_new_version_and_skip_if_unchanged_compares_the_fingerprint(stack):
    client = MlflowClient(stack["tracking"])
    params = {"architectures": ["seq_rnn"], "experiment_name": "e2e-fingerprint", "model_name": "charlm-fp"}
    first = run_flow(stack, **params)
    assert first["promotion"]["promoted"] and first["promotion"]["registered"]
    again = run_flow(stack, **params)
    assert again["promotion"]["registered"] is False and "identical to v1" in again["promotion"]["reason"]
    assert [v.version for v in client.search_model_versions("name = 'charlm-fp'")] == ["1"]
    champion = client.get_model_version_by_alias("charlm-fp", "champion")
    logged = client.get_logged_model(champion.tags["charlm.model_id"])
    assert "charlm-fp" in logged.tags["mlflow.modelVersions"]  # the logged model knows its version
    assert run_flow(stack, skip_if_unchanged=True, **params)["skipped"]
    changed = run_flow(stack, skip_if_unchanged=True, overrides={"*": {"seed": 1}}, **params)
    assert not changed["skipped"]  # another setting: another fingerprint, trained again


def test_a_killed_pipeline_leaves_failed_runs_and_the_next_one_completes(stack, tmp_path):
    """SIGKILL mid-training: nothing the dead pipeline left may look like a success, at the latest
    once the next pipeline has started; the next one runs normally."""
    import signal
    import subprocess
    import sys

    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    experiment = "e2e-killed"
    command = [sys.executable, "-m", "flows.pipeline", "--corpus-uri", "s3://corpora/long.txt", "--preset", "tiny"]
    command += ["--arch", "stateful_lstm", "--experiment", experiment, "--s3-endpoint-url", stack["s3_url"]]
    command += ["--no-promote", "--set", "model.hidden_size=128"]
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PYTHONPATH": str(Path(__file__).parents[1])}
    log = tmp_path / "killed.log"
    proc = subprocess.Popen(command, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)
    client = MlflowClient(stack["tracking"])
    try:
        child = training_child(stack, experiment, lambda: proc.poll() is None, log)
        assert client.get_run(child.info.run_id).info.status == "RUNNING"  # RUNNING while it trains
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    killed = _runs_in(stack, experiment)
    assert {r.info.status for r in killed} == {"RUNNING"}  # what the dead process left behind
    flow_run_id = killed[0].data.tags["prefect.flow_run_id"]

    after = run_flow(stack, architectures=["char3"], experiment_name=experiment, promote_best=False)
    assert client.get_run(after["parent_run_id"]).info.status == "FINISHED"
    reasons = []
    for run in killed:
        again = client.get_run(run.info.run_id)
        assert again.info.status == "FAILED", run.data.tags.get("mlflow.runName")
        reasons.append(again.data.tags["charlm.error"])
    assert all(r.startswith("the pipeline died: its ") for r in reasons)
    assert any(f"its process {proc.pid} on " in r for r in reasons)  # how the first was found out
    with get_client(sync_client=True) as prefect:
        assert not prefect.read_flow_run(flow_run_id).state.is_running()  # Crashed, no longer Running


def test_a_pipeline_whose_corpus_is_missing_ends_in_one_line(stack, tmp_path):
    """An input error found at run time (here, by S3): the error once, as the last line, exit 1."""
    import subprocess
    import sys

    from prefect.settings import PREFECT_API_URL

    command = [sys.executable, "-m", "flows.pipeline", "--corpus-uri", "s3://corpora/missing.txt"]
    command += ["--s3-endpoint-url", stack["s3_url"], "--quick", "--experiment", "e2e-missing"]
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PYTHONPATH": str(Path(__file__).parents[1])}
    done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode == 1, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    last = output.strip().splitlines()[-1]
    assert (
        last
        == "python -m flows.pipeline: error: s3://corpora/missing.txt: key 'missing.txt' not found in bucket 'corpora'"
    )


def test_each_training_task_shows_its_progress_in_prefect(stack, first_run):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    keys = ["train-char3", "train-stateful-gru", "train-stateful-lstm"]
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=keys)))
    assert {a.key for a in artifacts} == set(keys)
    assert all(a.type == "progress" for a in artifacts)
    assert {a.key: a.data for a in artifacts if a.data == 100.0}.keys() >= set(keys)  # every run reached the end


@pytest.mark.parametrize(
    ("signame", "ddp"), [("SIGTERM", False), ("SIGINT", False), ("SIGTERM", True), ("SIGINT", True)]
)
def test_a_signal_stops_the_pipeline_and_leaves_a_resumable_checkpoint(stack, tmp_path, signame, ddp):
    """SIGTERM (docker stop, a pod eviction, Prefect's cancel) or Ctrl-C while training: the process
    and its children end, the runs end KILLED with the reason, the flow run is no longer Running,
    and last.pt is where training stood."""
    import signal
    import subprocess
    import sys

    import psutil
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    from charlm.checkpoint import load_checkpoint

    experiment = f"e2e-{signame.lower()}{'-ddp' if ddp else ''}"
    command = [sys.executable, "-m", "flows.pipeline", "--corpus-uri", "s3://corpora/long.txt", "--preset", "tiny"]
    command += ["--arch", "stateful_lstm", "--experiment", experiment, "--s3-endpoint-url", stack["s3_url"]]
    command += ["--no-promote", "--set", "model.hidden_size=128"]
    if ddp:  # two ranks, and a restart the stop must not spend
        command += ["--ddp", "--nproc-per-node", "2", "--max-restarts", "1"]
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PYTHONPATH": str(Path(__file__).parents[1])}
    log = tmp_path / "stopped.log"
    proc = subprocess.Popen(command, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    client = MlflowClient(stack["tracking"])
    try:
        training_child(stack, experiment, lambda: proc.poll() is None, log)
        family = [proc.pid] + [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
        proc.send_signal(getattr(signal, signame))
        code = proc.wait(timeout=60)  # bounded: the trainings stop at their next step
    finally:
        if proc.poll() is None:
            proc.kill()
    output = log.read_text()
    # Ctrl-C: our one line and 130; SIGTERM: Prefect marks the flow run Crashed and ends the process by
    # the signal itself (a shell shows 143).
    assert code in ((130, -2) if signame == "SIGINT" else (143, -15)), output[-3000:]
    if ddp:  # the launcher runs in a main thread of its own: torch's signal handlers are there
        assert "Failed to register signal handlers" not in output and "the DDP job was stopped" in output
        (child,) = [r for r in _runs_in(stack, experiment) if "charlm.architecture" in r.data.tags]
        assert child.data.tags["charlm.restarts"] == "0"  # no restart spent on a stop from outside
    else:
        assert "stopped at step" in output  # the training stopped at its next step, not at the epoch's end
    assert not [pid for pid in family if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"]
    runs = _runs_in(stack, experiment)
    assert {r.info.status for r in runs} == {"KILLED"}, [(r.info.status, r.data.tags.get("charlm.error")) for r in runs]
    assert all(signame in r.data.tags["charlm.stopped"] for r in runs)
    flow_run_id = runs[0].data.tags["prefect.flow_run_id"]
    with get_client(sync_client=True) as prefect:
        assert not prefect.read_flow_run(flow_run_id).state.is_running()
    if not ddp:  # a DDP rank's last.pt is its last epoch or mid-epoch checkpoint (tested elsewhere)
        last = load_checkpoint(stack["home"] / "runs" / flow_run_id / "stateful_lstm" / "last.pt")
        assert last["progress"]["step"] > 0  # where training stood: a resumed run continues from here
    again = run_flow(stack, architectures=["char3"], experiment_name=experiment, promote_best=False)
    assert client.get_run(again["parent_run_id"]).info.status == "FINISHED"


def test_cancelling_a_flow_run_in_prefect_stops_its_training(stack, tmp_path):
    """Prefect's Cancel (the UI's button, `prefect flow-run cancel`): the worker stops the flow run's
    process; its training stops at the next step, its runs end KILLED, the flow run Cancelled."""
    import psutil
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.deployments import run_deployment
    from prefect.states import Cancelling

    from flows.pipeline import charlm_pipeline

    with get_client(sync_client=True) as prefect:
        prefect.create_work_pool(WorkPoolCreate(name="cancel-pool", type="process"))
    root = Path(__file__).resolve().parents[1]
    charlm_pipeline.from_source(source=str(root), entrypoint="flows/pipeline.py:charlm_pipeline").deploy(
        name="cancel", work_pool_name="cancel-pool"
    )
    worker, log = process_worker("cancel-pool", tmp_path, pythonpath=str(root))
    experiment = "e2e-cancel"
    params = {"corpus_uri": "s3://corpora/long.txt", "preset_name": "tiny", "architectures": ["stateful_lstm"]}
    params |= {"experiment_name": experiment, "s3_endpoint_url": stack["s3_url"], "promote_best": False}
    params |= {"overrides": {"*": {"model.hidden_size": 128}}}
    try:
        flow_run = run_deployment("charlm-pipeline/cancel", parameters={"params": params}, timeout=0)
        child = training_child(stack, experiment, log=log)
        pid = int(child.data.tags["charlm.pid"])
        with get_client(sync_client=True) as prefect:
            prefect.set_flow_run_state(flow_run.id, Cancelling(message="cancelled by the test"), force=True)
            for _ in range(240):
                state = prefect.read_flow_run(flow_run.id).state
                if state.is_final():
                    break
                time.sleep(0.5)
        assert state.is_cancelled(), (state, log.read_text()[-3000:])
        for _ in range(120):  # the flow run's process ends
            if not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie":
                break
            time.sleep(0.5)
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie"
        runs = _runs_in(stack, experiment)
        assert {r.info.status for r in runs} == {"KILLED"}, [(r.info.status, r.data.tags) for r in runs]
    finally:
        stop_process(worker)


def test_seeds_train_as_tasks_of_their_own_and_their_ensemble_is_a_candidate(stack):
    run = run_flow(
        stack, architectures=["char3", "stateful_gru"], seeds=2, experiment_name="seeds", model_name="charlm-seeds"
    )
    client = MlflowClient(stack["tracking"])
    children = client.search_runs(
        [run["experiment_id"]], filter_string=f"tags.mlflow.parentRunId = '{run['parent_run_id']}'"
    )
    names = ["char3-seed0", "char3-seed1", "stateful_gru-seed0", "stateful_gru-seed1"]
    assert sorted(c.info.run_name for c in children) == names
    assert sorted(c.data.tags["charlm.seed"] for c in children) == ["0", "0", "1", "1"]
    assert sorted(Path(r["checkpoints"]["best"]).parent.name for r in run["results"]) == names  # a directory each
    ensembles = {e["architecture"]: e for e in run["seed_ensembles"]}
    assert sorted(ensembles) == ["char3", "stateful_gru"]
    gru = ensembles["stateful_gru"]
    seeds = sorted((r for r in run["results"] if r["architecture"] == "stateful_gru"), key=lambda r: r["seed"])
    assert gru["members"] == [r["checkpoints"]["best"] for r in seeds]
    rows = {(r["architecture"], r["candidate"]): r for r in run["table"]}
    for arch, ensemble in ensembles.items():
        assert {(arch, "best checkpoint, seed 0"), (arch, "best checkpoint, seed 1")} <= set(rows)
        assert rows[arch, "ensemble of 2 seeds' best"]["best_val_loss"] == pytest.approx(ensemble["val_loss"])
    parent = client.get_run(run["parent_run_id"])
    assert parent.data.params["seeds"] == "2"
    assert parent.data.metrics["stateful_gru_seed_ensemble_val_loss"] == pytest.approx(gru["val_loss"])
    assert "ensemble of 2 seeds' best" in parent.data.tags["mlflow.note.content"]
    import mlflow

    mlflow.set_tracking_uri(stack["tracking"])
    for arch, ensemble in ensembles.items():  # each model of the parent shows its own loss, not another's
        model = mlflow.get_logged_model(ensemble["model_id"])
        assert model.source_run_id == run["parent_run_id"] and model.tags["charlm.kind"] == "seed_ensemble"
        assert [(m.key, m.value) for m in model.metrics] == [(f"{arch}_seed_ensemble_val_loss", ensemble["val_loss"])]
    for result in run["results"]:  # and so does each run's ensemble and average of its snapshots, not the last epoch's
        for candidate in result["candidates"]:
            model = mlflow.get_logged_model(candidate["model_id"])
            own = f"{candidate['kind']}_{len(candidate['members'])}_val_loss"
            assert [(m.key, m.value) for m in model.metrics] == [(own, pytest.approx(candidate["val_loss"]))]
    promoted = run["promotion"]["candidate"]  # the best of every candidate, the seeds' ensemble among them
    assert promoted["val_loss"] <= min(r["best_val_loss"] for r in run["table"]) + 1e-9


def test_distill_trains_a_student_of_the_seeds_that_competes_as_one_model(stack, tmp_path):
    import shutil

    from charlm.checkpoint import load_checkpoint
    from charlm.config import RunConfig
    from charlm.job import config_fingerprint

    run = run_flow(
        stack, architectures=["stateful_gru"], seeds=2, distill=True, experiment_name="distill", model_name="charlm-d"
    )
    client = MlflowClient(stack["tracking"])
    children = {
        c.info.run_name: c
        for c in client.search_runs(
            [run["experiment_id"]], filter_string=f"tags.mlflow.parentRunId = '{run['parent_run_id']}'"
        )
    }
    assert sorted(children) == ["stateful_gru-distilled", "stateful_gru-seed0", "stateful_gru-seed1"]
    seeds = sorted((r for r in run["results"] if r["name"] != "stateful_gru-distilled"), key=lambda r: r["seed"])
    (student,) = [r for r in run["results"] if r["name"] == "stateful_gru-distilled"]
    teachers = [r["checkpoints"]["best"] for r in seeds]
    assert student["teachers"] == teachers and student["seed"] == 2  # the seed after the teachers'
    child = children["stateful_gru-distilled"]
    assert child.info.status == "FINISHED"
    assert child.data.params["distill.teachers"] == ",".join(teachers)
    assert child.data.params["distill.weight"] == "0.9"
    assert child.data.tags["charlm.teachers"] == "2" and child.data.tags["charlm.seed"] == "2"
    assert client.get_run(run["parent_run_id"]).data.params["distill_weight"] == "0.9"
    rows = {r["candidate"]: r for r in run["table"]}
    row = rows["best checkpoint, distilled from 2 (seed 2)"]
    assert row["best_val_loss"] == pytest.approx(student["best_val_loss"]) and row["run_id"] == child.info.run_id
    # Its fingerprint follows its teachers' weights, not where their files lie: a rerun that trains the
    # same teachers into other directories gives the same one (and registers nothing new).
    config = RunConfig.model_validate(load_checkpoint(student["checkpoints"]["best"])["config"])
    moved = [shutil.copy(path, tmp_path / f"teacher{i}.pt") for i, path in enumerate(teachers)]
    assert config_fingerprint(run["corpus"]["sha256"], config) == student["fingerprint"]
    moved_config = config.override({"distill.teachers": [str(p) for p in moved]})
    assert config_fingerprint(run["corpus"]["sha256"], moved_config) == student["fingerprint"]
    other = config.override({"distill.teachers": [str(moved[0])]})
    assert config_fingerprint(run["corpus"]["sha256"], other) != student["fingerprint"]
