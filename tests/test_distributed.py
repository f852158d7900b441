"""DDP through torch's elastic launcher, gloo on CPU."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from charlm import prepared as store
from charlm.checkpoint import load_checkpoint
from charlm.config import RunConfig, tiny
from charlm.distributed import DistributedConfig, DistributedJobError, GpuAllocator, launch_training
from charlm.job import TrackingTarget, TrainJob, TrainResult
from charlm.prepared import PreparedRef
from charlm.training import Trainer
from tests.conftest import generated_text
from tests.s3server import free_port

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow

# Stated tolerance: 2 ranks and 1 rank compute the same global batches; they differ only in
# the order of floating-point reductions (the all-reduce of gradients): seen here ~1e-5.
TOLERANCE = 2e-4


def even_text(config) -> str:
    """A corpus whose last, partial global batch splits evenly over 2 ranks (an odd example
    would be left out by the 2-rank run only, and the curves would differ by that example)."""
    text = generated_text(1500)
    for cut in range(len(text), len(text) - 2000, -1):
        train = cut - round(cut * config.data.valid_fraction)
        if ((train - 1) // config.data.context) % config.data.batch_size % 2 == 0:
            return text[:cut]
    raise AssertionError("no cut found")


def prepared(tmp_path, config) -> PreparedRef:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(even_text(config), encoding="utf-8")
    return store.prepare(str(corpus), config, tmp_path / "store")


def launch(
    config: RunConfig, data: PreparedRef, out: Path, dist: DistributedConfig, tracking: TrackingTarget | None = None
) -> TrainResult:
    return launch_training(TrainJob(config=config, data=data, checkpoint_dir=str(out), tracking=tracking), dist=dist)


@pytest.mark.parametrize("architecture", ["stateful_gru", "seq_rnn"])
def test_two_ranks_match_one_rank(tmp_path, architecture):
    # fp32: DDP's equivalence to one rank at this tolerance; on a CPU with AMX, precision=auto
    # would train in bf16, whose rounding differs with the batch split by more than that
    config = tiny(architecture).override(["precision=fp32"])
    if architecture == "stateful_gru":  # and a weight average served from epoch 2: every rank keeps the same one
        config = config.override({"average": {"start_epoch": 1}})
    data = prepared(tmp_path, config)
    single = launch(config, data, tmp_path / "one", DistributedConfig(nproc_per_node=1))
    double = launch(config, data, tmp_path / "two", DistributedConfig(nproc_per_node=2, threads_per_rank=1))
    assert double.world_size == 2 and single.world_size == 1
    for a, b in zip(single.history, double.history, strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=TOLERANCE)
        assert a["val_loss"] == pytest.approx(b["val_loss"], abs=TOLERANCE)
        assert a.get("val_loss_raw", 0.0) == pytest.approx(b.get("val_loss_raw", 0.0), abs=TOLERANCE)
    if config.average is not None:
        assert [("val_loss_raw" in h) for h in double.history] == [False, True, True]
    one, two = load_checkpoint(tmp_path / "one" / "best.pt"), load_checkpoint(tmp_path / "two" / "best.pt")
    assert one.keys() == two.keys() and one["vocab"] == two["vocab"]
    assert one["model"].keys() == two["model"].keys()  # saved from the unwrapped module: no "module." prefix
    for name, tensor in one["model"].items():
        assert torch.allclose(tensor, two["model"][name], atol=1e-3), name


def mlflow_run(tmp_path):
    """A run in a local MLflow store, as the pipeline would hand to the DDP job: (client, target)."""
    from mlflow.tracking import MlflowClient

    from charlm.tracking import check_tracking_server

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    check_tracking_server(uri)
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("ddp")).info.run_id
    return client, TrackingTarget(tracking_uri=uri, run_id=run_id)


def middle_of_second_epoch(config, data) -> int:
    layout = Trainer(config, store.load(data.dir)).train_layout
    first, second = (len(layout.plan(epoch, config.seed, True)) for epoch in (0, 1))
    return (first + second // 2) // config.log_every * config.log_every


def assert_one_complete_run(client, run_id, result) -> None:
    """Restarted once, resumed: every epoch once, every step metric once, in the one MLflow run."""
    assert result.restarts == 1
    assert [h["epoch"] for h in result.history] == [1, 2, 3]  # no epoch counted twice
    assert client.get_run(run_id).data.tags["charlm.restarts"] == "1"
    assert [m.step for m in client.get_metric_history(run_id, "val_loss")] == [1, 2, 3]
    steps = [m.step for m in client.get_metric_history(run_id, "train_loss_step")]
    assert len(steps) == len(set(steps)) and max(steps) == result.steps // 5 * 5


def test_killed_worker_is_restarted_and_resumes_in_the_same_mlflow_run(tmp_path, monkeypatch):
    client, tracking = mlflow_run(tmp_path)
    config = tiny("stateful_gru")
    data = prepared(tmp_path, config)
    monkeypatch.setenv("CHARLM_FAULT_INJECT", f"rank=1,step={middle_of_second_epoch(config, data)}")
    result = launch(
        config,
        data,
        tmp_path / "ckpt",
        DistributedConfig(nproc_per_node=2, max_restarts=1, threads_per_rank=1),
        tracking,
    )
    assert_one_complete_run(client, tracking.run_id, result)


def test_a_worker_failure_without_restarts_fails_the_launch(tmp_path, monkeypatch):
    config = tiny("seq_rnn")
    monkeypatch.setenv("CHARLM_FAULT_INJECT", "rank=0,step=5")
    with pytest.raises(DistributedJobError, match=r"ChildFailedError(?s:.*)exitcode\s*: 17"):  # torch's report
        launch(config, prepared(tmp_path, config), tmp_path / "ckpt", DistributedConfig(nproc_per_node=2))


def join_node(workdir: Path, dist: DistributedConfig, log: Path) -> subprocess.Popen:
    """A second "node" on loopback: `charlm join` in its own process and an empty directory,
    with nothing but the rendezvous settings (no corpus, no prepared data, no checkpoints)."""
    workdir.mkdir()
    command = [sys.executable, "-m", "charlm.cli", "join", "--nnodes", str(dist.nnodes)]
    command += ["--rdzv-endpoint", dist.rdzv_endpoint, "--rdzv-id", dist.rdzv_id, "--threads-per-rank", "1"]
    command += ["--max-restarts", str(dist.max_restarts)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(command, cwd=workdir, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)


def two_nodes(name: str, **settings) -> DistributedConfig:
    endpoint = f"127.0.0.1:{free_port()}"
    return DistributedConfig(nnodes=2, rdzv_endpoint=endpoint, rdzv_id=name, threads_per_rank=1, **settings)


DRIVE = """
import sys
from charlm.distributed import DistributedConfig, launch_training
from charlm.job import TrainJob
job, dist, result = sys.argv[1:]
summary = launch_training(TrainJob.model_validate_json(job), dist=DistributedConfig.model_validate_json(dist))
open(result, "w").write(summary.model_dump_json())
"""


def drive_in_a_later_process(tmp_path, config, data, dist) -> TrainResult:
    """The driver in a process started after the joining node's: torchrun orders nodes by (host, pid),
    so the joining node becomes node 0 and the workers must renumber themselves."""
    result = tmp_path / "driver.json"
    job = TrainJob(config=config, data=data, checkpoint_dir=str(tmp_path / "ckpt"))
    args = [job.model_dump_json(), dist.model_dump_json(), str(result)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", DRIVE, *args], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return TrainResult.model_validate_json(result.read_text())


@pytest.mark.parametrize("driver", ["node 0", "node 1"])
def test_two_nodes_over_a_c10d_rendezvous_match_one_node_with_two_ranks(tmp_path, driver):
    config = tiny("stateful_gru").override(["precision=fp32"])  # as test_two_ranks_match_one_rank: bf16 on AMX
    data = prepared(tmp_path, config)
    dist = two_nodes(f"charlm-two-nodes-{driver[-1]}")
    if driver == "node 0":  # the driver's launcher process is older than the joiner's: torchrun makes it node 0
        from charlm import distributed

        outcome: dict[str, object] = {}
        thread = threading.Thread(target=lambda: outcome.update(both=launch(config, data, tmp_path / "ckpt", dist)))
        thread.start()
        deadline = time.monotonic() + 60
        while not distributed._LAUNCHERS and time.monotonic() < deadline:  # its launcher process exists
            time.sleep(0.05)
        joiner = join_node(tmp_path / "node1", dist, tmp_path / "node1.log")
        try:
            thread.join(300)
            assert joiner.wait(60) == 0, (tmp_path / "node1.log").read_text()[-3000:]
        finally:
            joiner.kill()
        both = outcome["both"]
    else:  # the joiner first, the driver in a later process
        joiner = join_node(tmp_path / "node1", dist, tmp_path / "node1.log")
        try:
            both = drive_in_a_later_process(tmp_path, config, data, dist)
            assert joiner.wait(60) == 0, (tmp_path / "node1.log").read_text()[-3000:]
        finally:
            joiner.kill()
    assert both.node_rank == int(driver[-1]) and both.world_size == 2
    one = launch(config, data, tmp_path / "one", DistributedConfig(nproc_per_node=2, threads_per_rank=1))
    for a, b in zip(one.history, both.history, strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=TOLERANCE)
        assert a["val_loss"] == pytest.approx(b["val_loss"], abs=TOLERANCE)
    # rank 0 is the driver's worker: it alone wrote checkpoints, here; the joining node wrote nothing.
    assert {"best.pt", "last.pt"} <= {p.name for p in (tmp_path / "ckpt").iterdir()}
    assert list((tmp_path / "node1").iterdir()) == []


def test_a_killed_worker_on_the_joining_node_restarts_both_nodes_and_resumes(tmp_path, monkeypatch):
    client, tracking = mlflow_run(tmp_path)
    config = tiny("stateful_gru")
    data = prepared(tmp_path, config)
    kill_at = middle_of_second_epoch(config, data)
    monkeypatch.setenv("CHARLM_FAULT_INJECT", f"rank=1,step={kill_at}")  # rank 1 is the joining node's worker
    dist = two_nodes("charlm-two-nodes-fault", max_restarts=1)
    joiner = join_node(tmp_path / "node1", dist, tmp_path / "node1.log")
    try:
        result = launch(config, data, tmp_path / "ckpt", dist, tracking)
        assert joiner.wait(60) == 0, (tmp_path / "node1.log").read_text()[-3000:]
    finally:
        joiner.kill()
    assert f"rank 1 exits at step {kill_at}" in (tmp_path / "node1.log").read_text()
    assert_one_complete_run(client, tracking.run_id, result)
    assert client.get_run(tracking.run_id).data.tags["charlm.nnodes"] == "2"


def test_a_multinode_job_needs_a_fixed_endpoint_and_an_id():
    with pytest.raises(ValueError, match="fixed host:port"):
        DistributedConfig(nnodes=2, rdzv_id="x").check_multinode()
    with pytest.raises(ValueError, match="rdzv_id"):
        DistributedConfig(nnodes=2, rdzv_endpoint="node0:29400").check_multinode()
    base = DistributedConfig(nnodes=2, rdzv_endpoint="node0:29400", rdzv_id="nightly")
    jobs = [base.for_job(arch, i) for i, arch in enumerate(["stateful_gru", "stateful_lstm"])]
    assert [(j.rdzv_endpoint, j.rdzv_id) for j in jobs] == [
        ("node0:29400", "nightly-stateful_gru"),
        ("node0:29401", "nightly-stateful_lstm"),
    ]
    assert DistributedConfig().for_job("x", 3) == DistributedConfig()  # one node: ports are picked per job


def test_gpu_allocator_gives_disjoint_sets_and_queues_the_rest(tmp_path):
    allocator = GpuAllocator(devices=list(range(10)), lock_dir=tmp_path, poll=0.05)  # a simulated 10-GPU host
    holding, lock = [], threading.Lock()
    release = threading.Event()
    fifth_got: list[list[int]] = []

    def task(count, out=None):
        with allocator.acquire(count) as devices:
            with lock:
                holding.append(devices)
            if out is not None:
                out.append(devices)
                return
            release.wait(10)

    workers = [threading.Thread(target=task, args=(2,)) for _ in range(4)]
    for w in workers:
        w.start()
    deadline = time.monotonic() + 10
    while len(holding) < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(holding) == 4
    flat = [d for devices in holding for d in devices]
    assert len(flat) == len(set(flat)) == 8  # disjoint, none oversubscribed
    # Two GPUs are still free: a task asking for 3 waits until a holder releases.
    waiter = threading.Thread(target=task, args=(3, fifth_got))
    waiter.start()
    time.sleep(0.3)
    assert fifth_got == []
    release.set()
    waiter.join(10)
    for w in workers:
        w.join(10)
    assert len(fifth_got[0]) == 3
    with pytest.raises(ValueError, match="11 GPUs requested"), allocator.acquire(11):
        pass


def test_gpu_allocator_locks_physical_gpus_whatever_each_process_sees(tmp_path, monkeypatch):
    """Ray gives each task its own CUDA_VISIBLE_DEVICES: both see "device 0", which are different GPUs."""
    import multiprocessing

    first = GpuAllocator(devices=[0], lock_dir=tmp_path)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    with first.acquire(1, timeout=1) as held:
        assert held == [0] and (tmp_path / "gpu-3.lock").exists()
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5")
        with GpuAllocator(devices=[0], lock_dir=tmp_path).acquire(1, timeout=1) as other:
            assert other == [0]  # physical GPU 5: free, no waiting for GPU 3
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(1) as pool:  # another process that sees GPU 3 as its device 0 must wait
            assert pool.apply(_try_acquire, (str(tmp_path), "3")) == "timeout"


def _try_acquire(lock_dir: str, visible: str) -> str:
    import os

    os.environ["CUDA_VISIBLE_DEVICES"] = visible
    try:
        with GpuAllocator(devices=[0], lock_dir=lock_dir, poll=0.05).acquire(1, timeout=0.5):
            return "acquired"
    except TimeoutError:
        return "timeout"


def test_processes_and_backend_follow_the_gpus(monkeypatch):
    """The one device choice, with torch's CUDA queries answered as on an 8-GPU host (no GPU here)."""
    from charlm.device import DeviceError, placement, processes_per_node, resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert processes_per_node("auto", [3, 5]) == 2  # the allotted GPUs
    assert processes_per_node("auto", None) == 1
    assert placement("auto", "auto", 0) == (torch.device("cpu"), "gloo")
    with pytest.raises(DeviceError, match="backend 'nccl' requested but the job runs on the CPU"):
        placement("auto", "nccl", 0)
    with pytest.raises(DeviceError, match="device 'cuda' requested but CUDA is not available"):
        resolve_device("cuda")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    assert processes_per_node("auto", None) == 8  # every visible GPU
    assert processes_per_node("auto", None, "gloo") == 1  # gloo asked for explicitly: CPU ranks
    assert processes_per_node("cpu", None) == 1  # the config's device=cpu holds on a GPU host too
    assert placement("auto", "auto", 1, [4, 6]) == (torch.device("cuda", 6), "nccl")
    assert placement("auto", "auto", 2) == (torch.device("cuda", 2), "nccl")
    assert placement("cpu", "auto", 2) == (torch.device("cpu"), "gloo")
    assert placement("auto", "gloo", 0) == (torch.device("cpu"), "gloo")
    assert resolve_device("cuda:7") == torch.device("cuda", 7)
    with pytest.raises(DeviceError, match="cuda:8: this host has 8 GPU"):
        resolve_device("cuda:8")
