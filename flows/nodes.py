"""The other machines of a multi-node DDP job, asked of a Prefect work pool."""

from __future__ import annotations

from typing import Any

from charlm.distributed import DistributedConfig
from flows.report import logger


def start_joining_nodes(dist: DistributedConfig, node_deployment: str | None, gpus: int | None) -> list[Any]:
    """Ask the work pool behind ``node_deployment`` for the job's other ``nnodes - 1`` nodes
    (runs of :func:`flows.ddp_node.charlm_ddp_node`); without one, log what to run by hand."""
    if not node_deployment:
        logger().info(
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

    parameters = {"dist": dist.model_dump(mode="json"), "gpus": gpus}
    runs = [
        run_deployment(node_deployment, parameters=parameters, timeout=0, as_subflow=True)
        for _ in range(dist.nnodes - 1)
    ]
    logger().info("%s: %d node run(s) of %s requested", dist.rdzv_id, len(runs), node_deployment)
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
        logger().warning("could not cancel the job's pending node runs: %s", err)
