"""The nightly retraining deployment.

    python -m flows.deploy serve                  # serve it from this process (flow.serve), 02:00 UTC nightly
    python -m flows.deploy serve --cron "30 1 * * *" --timezone Europe/Berlin

Production goes through a work pool instead (see prefect.yaml and README):
``prefect deploy --all`` then a worker per pool (``prefect worker start --pool gpu-pool``).
Two runs never overlap: the deployment's concurrency limit is 1 and an overlapping
run is cancelled (``collision_strategy: CANCEL_NEW``). A run whose corpus is
unchanged and whose champion was trained on it skips training.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
from prefect.schedules import Cron

from flows.params import PipelineParams
from flows.pipeline import charlm_pipeline

DEPLOYMENT_NAME = "nightly"
DEFAULT_CRON = "0 2 * * *"  # 02:00 UTC


def nightly_parameters(**overrides: Any) -> dict[str, Any]:
    """The flow's one parameter, ``params``: the corpus from ``CHARLM_CORPUS_URI`` (else the
    default), skipping an unchanged corpus, promoting the best."""
    corpus = {"corpus_uri": os.environ["CHARLM_CORPUS_URI"]} if os.environ.get("CHARLM_CORPUS_URI") else {}
    params = PipelineParams.model_validate({**corpus, "skip_if_unchanged": True, "promote_best": True, **overrides})
    return {"params": params.model_dump(mode="json", exclude_defaults=True)}


def no_overlap() -> ConcurrencyLimitConfig:
    return ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW)


def nightly_deployment(cron: str = DEFAULT_CRON, timezone: str = "UTC", **parameters: Any):
    """The deployment object (``.apply()`` registers it with the Prefect API)."""
    return charlm_pipeline.to_deployment(
        name=DEPLOYMENT_NAME,
        schedule=Cron(cron, timezone=timezone),
        concurrency_limit=no_overlap(),
        parameters=nightly_parameters(**parameters),
        description="Nightly retraining: fetch the corpus, train every architecture, compare, promote.",
        tags=["charlm", "nightly"],
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m flows.deploy", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("command", choices=["serve"], help="serve the nightly deployment from this process")
    parser.add_argument("--cron", default=DEFAULT_CRON)
    parser.add_argument("--timezone", default="UTC")
    args = parser.parse_args(argv)
    charlm_pipeline.serve(
        name=DEPLOYMENT_NAME,
        schedule=Cron(args.cron, timezone=args.timezone),
        global_limit=no_overlap(),
        parameters=nightly_parameters(),
        tags=["charlm", "nightly"],
    )


if __name__ == "__main__":
    main()
