"""One DDP worker: what each rank runs, under ``elastic_launch`` or ``torchrun``.

Kept light on purpose — spawned workers import this module, so it must not pull
in Prefect. Also a torchrun script, for multi-node jobs launched by hand::

    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29400 \\
        --rdzv-id charlm-gru -m charlm.ddp_worker --spec spec.json

Each rank reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK,
TORCHELASTIC_RESTART_COUNT), resumes from ``last.pt`` when a previous attempt left
one, and rank 0 alone writes checkpoints and logs to MLflow.
"""

from __future__ import annotations

import argparse
import json
import os
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as torch_dist

from charlm.checkpoint import load_checkpoint
from charlm.config import RunConfig
from charlm.training import Callback, DistInfo, Trainer, fit_summary

FAULT_ENV = "CHARLM_FAULT_INJECT"  # "rank=R,step=S": that rank dies at that step, first attempt only


class FaultInjector(Callback):
    """Test hook: kill this worker mid-training (only before the first restart)."""

    all_ranks = True

    def __init__(self, spec: str, rank: int, restart_count: int) -> None:
        fields = dict(part.split("=") for part in spec.split(","))
        self.rank, self.step = int(fields.get("rank", 0)), int(fields["step"])
        self.armed = restart_count == 0 and rank == self.rank

    def on_step_end(self, trainer: Trainer, step: int, loss: float, lr: float) -> None:
        if self.armed and step >= self.step:
            print(f"[charlm fault injection] rank {self.rank} exits at step {step}", flush=True)
            os._exit(17)


def _device(spec: dict[str, Any], local_rank: int) -> tuple[torch.device, str]:
    backend = spec.get("backend", "auto")
    if backend != "gloo" and torch.cuda.is_available():
        devices = spec.get("devices")
        device = torch.device("cuda", devices[local_rank] if devices else local_rank)
        torch.cuda.set_device(device)
        return device, "nccl"
    if backend == "nccl":
        raise RuntimeError("backend 'nccl' requested but CUDA is not available")
    return torch.device("cpu"), "gloo"


def run(spec_json: str) -> dict[str, Any]:
    from charlm.experiment import load_prepared

    spec = json.loads(spec_json)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))
    if spec.get("threads_per_rank"):
        torch.set_num_threads(spec["threads_per_rank"])
    device, backend = _device(spec, local_rank)
    if rank == 0 and spec.get("tracking"):
        import mlflow
    # The launcher's store outlives restarts: key this attempt's process group by the restart count,
    # so that a restarted rank never reads the address a dead peer published in an earlier attempt.
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"  # torchrun's default
    store = torch_dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        world_size=world,
        is_master=rank == 0 and not agent_store,
        timeout=timedelta(minutes=10),
    )
    torch_dist.init_process_group(
        backend,
        store=torch_dist.PrefixStore(f"charlm/attempt-{restarts}", store),
        rank=rank,
        world_size=world,
        device_id=device if device.type == "cuda" else None,
    )
    try:
        config = RunConfig.model_validate(spec["config"])
        callbacks: list[Callback] = []
        tracker = None
        if rank == 0 and spec.get("tracking"):
            import mlflow
            from mlflow.tracking import MlflowClient

            from charlm.tracking import MLflowTracker

            mlflow.set_tracking_uri(spec["tracking"]["tracking_uri"])  # the fluent API (log_model) uses it too
            client = MlflowClient(spec["tracking"]["tracking_uri"])
            run_id = spec["tracking"]["run_id"]
            client.set_tag(run_id, "charlm.restarts", str(restarts))
            client.set_tag(run_id, "charlm.world_size", str(world))
            tracker = MLflowTracker(run_id, client=client)
            callbacks.append(tracker)
        if os.environ.get(FAULT_ENV):
            callbacks.append(FaultInjector(os.environ[FAULT_ENV], rank, restarts))
        checkpoint_dir = Path(spec["checkpoint_dir"])
        trainer = Trainer(
            config,
            load_prepared(spec["prepared_dir"]),
            callbacks=callbacks,
            checkpoint_dir=checkpoint_dir,
            device=device,
            dist=DistInfo(rank=rank, world_size=world, local_rank=local_rank),
        )
        last = checkpoint_dir / "last.pt"
        if last.is_file():  # a restarted worker group continues from the last checkpoint
            trainer.load_state_dict(load_checkpoint(last, map_location=device))
        result = trainer.fit()
        if rank != 0:
            return {}
        ids = tracker.snapshot_model_ids if tracker else None
        return {**fit_summary(result, ids), "restarts": restarts, "world_size": world, "device": str(device)}
    finally:
        torch_dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", required=True, help="JSON file: config, prepared_dir, checkpoint_dir, tracking")
    args = parser.parse_args()
    result = run(Path(args.spec).read_text())
    if result:
        print(json.dumps({k: v for k, v in result.items() if k != "history"}))


if __name__ == "__main__":
    main()
