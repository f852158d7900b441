"""One DDP worker: what each rank runs, under ``elastic_launch`` or ``torchrun``.

Kept light on purpose — spawned workers import this module, so it must not pull
in Prefect. Two roles:

* the **driver** node's workers get the :class:`~charlm.job.TrainJob` (as JSON) from
  :func:`charlm.distributed.launch_training`;
* a **joining** node's workers get nothing but the rendezvous: the driver publishes
  the spec in the rendezvous store and broadcasts the prepared corpus and, on a
  restart, the checkpoint to resume from — a joining node needs no shared disk::

    charlm join --nnodes 2 --rdzv-endpoint HOST:29400 --rdzv-id charlm-gru   # or:
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d \\
        --rdzv-endpoint HOST:29400 --rdzv-id charlm-gru -m charlm.ddp_worker --join

torchrun numbers nodes in an order of its own; the workers renumber themselves so
that the driver's ranks come first, and rank 0 — on the driver — alone writes
checkpoints and logs to MLflow. Each rank reads torchrun's environment (RANK,
WORLD_SIZE, LOCAL_RANK, TORCHELASTIC_RESTART_COUNT), sets up the process group and
calls :func:`charlm.job.run_job` like any other caller; a restarted group resumes
from ``last.pt``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as torch_dist
from pydantic import BaseModel, ConfigDict

from charlm.device import flush_denormals, placement
from charlm.job import RESUME_LAST, TrainJob, TrainResult, run_job
from charlm.training import DistInfo


class WorkerSpec(BaseModel):
    """What a node's launcher hands its workers: the job (None on a joining node, whose job
    comes from the driver) and this node's own placement."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    job: TrainJob | None = None
    devices: list[int] | None = None
    backend: str | None = None  # None on a joining node: the driver's
    threads_per_rank: int | None = None


def run(spec_json: str) -> TrainResult | None:
    """One rank's work; returns the result on rank 0 (None elsewhere)."""
    flush_denormals()  # before torch's thread pool exists: its threads inherit it
    spec = WorkerSpec.model_validate_json(spec_json)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s | %(name)s | %(message)s")  # epoch lines
    launcher_rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))
    if spec.threads_per_rank:
        torch.set_num_threads(spec.threads_per_rank)
    # charlm's launcher turns torchrun's shared agent store off (TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1):
    # each rendezvous round then gets a fresh store, hosted by this round's rank 0 on a new port, so a
    # restarted rank can never read what a dead peer of an earlier attempt published there. Under a
    # plain torchrun (shared store) the keys are at least kept apart by the restart count (which is
    # per node: a node restarted for a peer's failure may not count it).
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    store = torch_dist.TCPStore(  # type: ignore[attr-defined]
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        world_size=world,
        is_master=launcher_rank == 0 and not agent_store,
        timeout=timedelta(minutes=10),
    )
    attempt = torch_dist.PrefixStore(  # type: ignore[attr-defined]
        f"charlm/attempt-{restarts if agent_store else 0}", store
    )
    # The driver's first worker publishes where its ranks start and the job; every rank waits for both.
    if spec.job is not None and local_rank == 0:
        attempt.set("job", spec.job.model_dump_json())
        attempt.set("backend", spec.backend or "auto")
        attempt.set("driver_base", str(launcher_rank - local_rank))
    driver_base = int(attempt.get("driver_base"))
    rank = (launcher_rank - driver_base) % world  # the driver's ranks first: rank 0 is on the driver
    job = spec.job or TrainJob.model_validate_json(attempt.get("job"))
    backend = spec.backend or attempt.get("backend").decode()
    device, pg_backend = placement(job.config.device, backend, local_rank, spec.devices)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch_dist.init_process_group(
        pg_backend,
        store=torch_dist.PrefixStore("pg", attempt),  # type: ignore[attr-defined]
        rank=rank,
        world_size=world,
        device_id=device if device.type == "cuda" else None,
    )
    try:
        if world > 1:  # a node restarted because a peer failed may not count it: take the highest count
            count = torch.tensor([restarts], device=device)
            torch_dist.all_reduce(count, op=torch_dist.ReduceOp.MAX)
            restarts = int(count.item())
        dist = DistInfo(
            rank=rank,
            world_size=world,
            local_rank=local_rank,
            device=str(device),
            restarts=restarts,
            nnodes=int(os.environ.get("GROUP_WORLD_SIZE", "1")),
            node_rank=int(os.environ.get("GROUP_RANK", "0")),  # torchrun's numbering of this node
        )
        # A restarted worker group continues from the last checkpoint (rank 0 reads it, the others receive it).
        if restarts or job.resume is None:
            job = job.model_copy(update={"resume": RESUME_LAST})
        result = run_job(job, dist)
        return result if rank == 0 else None
    finally:
        torch_dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    role = parser.add_mutually_exclusive_group(required=True)
    role.add_argument("--job", help="the driver: a JSON file holding a charlm.job.TrainJob")
    role.add_argument("--join", action="store_true", help="a joining node: take the job from the driver")
    parser.add_argument("--backend", choices=["auto", "gloo", "nccl"], help="default: the driver's")
    parser.add_argument("--threads-per-rank", type=int)
    args = parser.parse_args()
    job = TrainJob.model_validate_json(Path(args.job).read_text()) if args.job else None
    result = run(WorkerSpec(job=job, backend=args.backend, threads_per_rank=args.threads_per_rank).model_dump_json())
    if result is not None:
        print(json.dumps(result.model_dump(exclude={"history"})))


if __name__ == "__main__":
    main()
