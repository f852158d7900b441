"""DDP through torch's elastic launcher, gloo on CPU."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

from charlm.checkpoint import load_checkpoint
from charlm.config import tiny
from charlm.distributed import DistributedConfig, GpuAllocator, launch_training
from charlm.experiment import load_prepared, preparation_settings, prepare_artifacts
from charlm.training import Trainer
from tests.conftest import generated_text

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


def prepared(tmp_path, config):
    return prepare_artifacts(even_text(config), preparation_settings(config), tmp_path / "prepared")["dir"]


@pytest.mark.parametrize("architecture", ["stateful_gru", "seq_rnn"])
def test_two_ranks_match_one_rank(tmp_path, architecture):
    config = tiny(architecture)
    data = prepared(tmp_path, config)
    single = launch_training(config, data, tmp_path / "one", dist=DistributedConfig(nproc_per_node=1))
    double = launch_training(
        config, data, tmp_path / "two", dist=DistributedConfig(nproc_per_node=2, threads_per_rank=1)
    )
    assert double["world_size"] == 2 and single["world_size"] == 1
    for a, b in zip(single["history"], double["history"], strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=TOLERANCE)
        assert a["val_loss"] == pytest.approx(b["val_loss"], abs=TOLERANCE)
    one, two = load_checkpoint(tmp_path / "one" / "best.pt"), load_checkpoint(tmp_path / "two" / "best.pt")
    assert one.keys() == two.keys() and one["vocab"] == two["vocab"]
    assert one["model"].keys() == two["model"].keys()  # saved from the unwrapped module: no "module." prefix
    for name, tensor in one["model"].items():
        assert torch.allclose(tensor, two["model"][name], atol=1e-3), name


def test_killed_worker_is_restarted_and_resumes_in_the_same_mlflow_run(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from charlm.tracking import check_tracking_server

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    check_tracking_server(uri)
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("ddp")).info.run_id
    config = tiny("stateful_gru")
    data = prepared(tmp_path, config)
    layout = Trainer(config, load_prepared(data)).train_layout
    first, second = (len(layout.plan(epoch, config.seed, True)) for epoch in (0, 1))
    kill_at = (first + second // 2) // config.log_every * config.log_every  # in the middle of the second epoch
    monkeypatch.setenv("CHARLM_FAULT_INJECT", f"rank=1,step={kill_at}")
    result = launch_training(
        config,
        data,
        tmp_path / "ckpt",
        tracking={"tracking_uri": uri, "run_id": run_id},
        dist=DistributedConfig(nproc_per_node=2, max_restarts=1, threads_per_rank=1),
    )
    assert result["restarts"] == 1
    assert [h["epoch"] for h in result["history"]] == [1, 2, 3]  # no epoch counted twice
    run = client.get_run(run_id)
    assert run.data.tags["charlm.restarts"] == "1"
    assert [m.step for m in client.get_metric_history(run_id, "val_loss")] == [1, 2, 3]
    steps = [m.step for m in client.get_metric_history(run_id, "train_loss_step")]
    assert len(steps) == len(set(steps)) and max(steps) == result["steps"] // 5 * 5


def test_a_worker_failure_without_restarts_fails_the_launch(tmp_path, monkeypatch):
    config = tiny("seq_rnn")
    monkeypatch.setenv("CHARLM_FAULT_INJECT", "rank=0,step=5")
    started = time.monotonic()
    with pytest.raises(ChildFailedError):
        launch_training(
            config,
            prepared(tmp_path, config),
            tmp_path / "ckpt",
            dist=DistributedConfig(nproc_per_node=2, max_restarts=0),
        )
    assert time.monotonic() - started < 120  # failed, did not hang


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
