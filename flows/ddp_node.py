"""One extra node of a multi-node DDP job, as a Prefect flow for a work pool.

The pipeline's training task is the job's driver: with ``nnodes > 1`` and a node
deployment (``python -m flows.pipeline --nnodes 2 --node-deployment charlm-ddp-node/gpu``)
it runs this flow once per extra node through :func:`prefect.deployments.run_deployment`;
a Prefect worker on another machine picks each run up and joins torchrun's c10d
rendezvous at the driver's endpoint. The joining node needs no corpus, data or
checkpoints: the driver's ranks send them (see :mod:`charlm.ddp_worker`).

    prefect worker start --pool gpu-nodes      # on every machine that may host a node
"""

from __future__ import annotations

import os

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from prefect import flow, get_run_logger

from charlm.distributed import DistributedConfig, GpuAllocator, join_training

NODE_FLOW_NAME = "charlm-ddp-node"


@flow(name=NODE_FLOW_NAME, log_prints=True)
def charlm_ddp_node(dist: DistributedConfig, gpus: int | None = None) -> dict[str, str | int | None]:
    """Run this machine's DDP workers of the job ``dist`` describes, until it ends (fails with the
    workers' error); ``gpus``: how many of this machine's GPUs to take (disjoint from other jobs)."""
    logger = get_run_logger()
    logger.info("joining %s at %s (%d nodes)", dist.rdzv_id, dist.rdzv_endpoint, dist.nnodes)
    if gpus:
        with GpuAllocator().acquire(gpus) as devices:
            logger.info("GPUs %s", devices)
            join_training(dist, devices=devices)
    else:
        join_training(dist)
    return {"rdzv_id": dist.rdzv_id, "nnodes": dist.nnodes}
