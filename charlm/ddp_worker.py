"""One DDP worker: what each rank runs, under ``elastic_launch`` or ``torchrun``.

Kept light on purpose — spawned workers import this module, so it must not pull
in Prefect. Two roles:

* the **driver** node's workers get the job spec (config, prepared data directory,
  checkpoint directory, MLflow run) from :func:`charlm.distributed.launch_training`;
* a **joining** node's workers get nothing but the rendezvous: the driver publishes
  the spec in the rendezvous store and broadcasts the prepared corpus and, on a
  restart, the checkpoint to resume from — a joining node needs no shared disk::

    charlm join --nnodes 2 --rdzv-endpoint HOST:29400 --rdzv-id charlm-gru   # or:
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d \\
        --rdzv-endpoint HOST:29400 --rdzv-id charlm-gru -m charlm.ddp_worker --join

torchrun numbers nodes in an order of its own; the workers renumber themselves so
that the driver's ranks come first, and rank 0 — on the driver — alone writes
checkpoints and logs to MLflow. Each rank reads torchrun's environment (RANK,
WORLD_SIZE, LOCAL_RANK, TORCHELASTIC_RESTART_COUNT) and a restarted group resumes
from ``last.pt``.
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

# "rank=R,step=S[,mode=exit|raise]": that rank dies (exit) or raises an error at that step, first attempt only
FAULT_ENV = "CHARLM_FAULT_INJECT"


class FaultInjector(Callback):
    """Test hook: kill this worker mid-training, or make it raise (only before the first restart)."""

    all_ranks = True

    def __init__(self, spec: str, rank: int, restart_count: int) -> None:
        try:
            fields = dict(part.split("=") for part in spec.split(","))
            self.rank, self.step = int(fields.get("rank", 0)), int(fields["step"])
            self.mode = fields.get("mode", "exit")
            if self.mode not in ("exit", "raise"):
                raise ValueError(self.mode)
        except (ValueError, KeyError) as err:
            raise ValueError(f"{FAULT_ENV}={spec!r}: expected rank=R,step=S[,mode=exit|raise] ({err})") from None
        self.armed = restart_count == 0 and rank == self.rank

    def on_step_end(self, trainer: Trainer, step: int, loss: float, lr: float) -> None:
        if self.armed and step >= self.step:
            if self.mode == "raise":
                raise RuntimeError(f"[charlm fault injection] rank {self.rank} raised at step {step}")
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


def _broadcast(obj: Any, rank: int) -> Any:
    box = [obj if rank == 0 else None]
    torch_dist.broadcast_object_list(box, src=0)
    return box[0]


def run(spec_json: str) -> dict[str, Any]:
    """One rank's work. ``spec_json``: the driver's job spec, or ``{"join": true, …}`` on a joining node."""
    from charlm.experiment import load_prepared

    spec = json.loads(spec_json)
    joining = bool(spec.get("join"))
    launcher_rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))
    if spec.get("threads_per_rank"):
        torch.set_num_threads(spec["threads_per_rank"])
    # charlm's launcher turns torchrun's shared agent store off (TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1):
    # each rendezvous round then gets a fresh store, hosted by this round's rank 0 on a new port, so a
    # restarted rank can never read what a dead peer of an earlier attempt published there. Under a
    # plain torchrun (shared store) the keys are at least kept apart by the restart count (which is
    # per node: a node restarted for a peer's failure may not count it).
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    store = torch_dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        world_size=world,
        is_master=launcher_rank == 0 and not agent_store,
        timeout=timedelta(minutes=10),
    )
    attempt = torch_dist.PrefixStore(f"charlm/attempt-{restarts if agent_store else 0}", store)
    # The driver's first worker publishes where its ranks start and the job; every rank waits for both.
    if not joining and local_rank == 0:
        job = {k: spec[k] for k in ("config", "backend", "checkpoint_dir") if k in spec}
        attempt.set("job", json.dumps(job))
        attempt.set("driver_base", str(launcher_rank - local_rank))
    driver_base = int(attempt.get("driver_base"))
    rank = (launcher_rank - driver_base) % world  # the driver's ranks first: rank 0 is on the driver
    if joining:  # the driver's config and backend; this node's own devices and threads
        spec = {**json.loads(attempt.get("job")), **{k: v for k, v in spec.items() if v is not None}}
    device, backend = _device(spec, local_rank)
    torch_dist.init_process_group(
        backend,
        store=torch_dist.PrefixStore("pg", attempt),
        rank=rank,
        world_size=world,
        device_id=device if device.type == "cuda" else None,
    )
    try:
        if world > 1:  # a node restarted because a peer failed may not count it: take the highest count
            count = torch.tensor([restarts], device=device)
            torch_dist.all_reduce(count, op=torch_dist.ReduceOp.MAX)
            restarts = int(count.item())
        config = RunConfig.model_validate(spec["config"])
        # Every rank knows the directory (mid-epoch checkpoints are collective); rank 0 alone writes it.
        checkpoint_dir = Path(spec["checkpoint_dir"])
        # Rank 0 reads the data and the checkpoint; the others receive them (no shared disk needed).
        corpus = load_prepared(spec["prepared_dir"]) if rank == 0 else None
        last = checkpoint_dir / "last.pt"
        resume = load_checkpoint(last) if rank == 0 and last.is_file() else None
        if world > 1:
            corpus, resume = _broadcast((corpus, resume), rank)
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
            client.set_tag(run_id, "charlm.nnodes", os.environ.get("GROUP_WORLD_SIZE", "1"))
            tracker = MLflowTracker(run_id, client=client)
            callbacks.append(tracker)
        if os.environ.get(FAULT_ENV):
            callbacks.append(FaultInjector(os.environ[FAULT_ENV], rank, restarts))
        trainer = Trainer(
            config,
            corpus,
            callbacks=callbacks,
            checkpoint_dir=checkpoint_dir,
            device=device,
            dist=DistInfo(rank=rank, world_size=world, local_rank=local_rank),
        )
        if resume is not None:  # a restarted worker group continues from the last checkpoint
            trainer.load_state_dict(resume)
        result = trainer.fit()
        if rank != 0:
            return {}
        ids = tracker.snapshot_model_ids if tracker else None
        return {
            **fit_summary(result, ids),
            "restarts": restarts,
            "world_size": world,
            "device": str(device),
            "node_rank": int(os.environ.get("GROUP_RANK", 0)),  # torchrun's numbering of the driver's node
        }
    finally:
        torch_dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    role = parser.add_mutually_exclusive_group(required=True)
    role.add_argument("--spec", help="the driver: a JSON file with config, prepared_dir, checkpoint_dir, tracking")
    role.add_argument("--join", action="store_true", help="a joining node: take the job from the driver")
    parser.add_argument("--backend", choices=["auto", "gloo", "nccl"], help="default: the driver's")
    parser.add_argument("--threads-per-rank", type=int)
    args = parser.parse_args()
    if args.join:
        spec = json.dumps({"join": True, "backend": args.backend, "threads_per_rank": args.threads_per_rank})
    else:
        spec = Path(args.spec).read_text()
    result = run(spec)
    if result:
        print(json.dumps({k: v for k, v in result.items() if k != "history"}))


if __name__ == "__main__":
    main()
