"""The launcher of a DDP job: torch's elastic launch in the main thread of a process of its own.

:func:`charlm.distributed.launch_training` runs ``python -m charlm.launch REQUEST ANSWER``
rather than calling the launcher from the training task's thread, because torch installs its
signal handlers only in a main thread: here, a SIGTERM or Ctrl-C (from the pipeline when it is
stopped, or from a terminal) makes the elastic agent stop every worker without counting it
as a failure — no restart is spent on a signal from outside. The answer file holds rank 0's
result, the workers' error (torch's ``ChildFailedError`` report) or the signal that stopped it.
Kept light on purpose: it imports torch and the worker, never Prefect or MLflow.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.launcher.api import elastic_launch

from charlm import ddp_worker
from charlm.distributed import DistributedConfig, launch_config


def _answer(path: Path, outcome: dict[str, Any]) -> None:
    path.write_text(json.dumps(outcome))


def main(argv: list[str] | None = None) -> int:
    request, answer = (Path(a) for a in (argv or sys.argv[1:])[:2])
    spec = json.loads(request.read_text())
    dist = DistributedConfig.model_validate(spec["dist"])
    try:
        results = elastic_launch(launch_config(dist, spec["nproc"]), entrypoint=ddp_worker.run)(spec["worker"])
    except ChildFailedError as err:
        _answer(answer, {"error": f"ChildFailedError: {err}"})
        return 1
    except Exception as err:
        if type(err).__name__ == "SignalException":  # torch's: the agent stopped its workers on a signal
            sigval = getattr(err, "sigval", None)
            name = getattr(sigval, "name", str(sigval))
            _answer(answer, {"stopped": name})
            return 128 + int(sigval) if sigval is not None else 1
        _answer(answer, {"error": f"{type(err).__name__}: {err}"})
        return 1
    # Keyed by torchrun's ranks, whose node order is its own; rank 0 alone returns a result.
    result = next((r for r in results.values() if r is not None), None)
    if result is None:
        _answer(answer, {"error": "the DDP job ended without a result from rank 0"})
        return 1
    _answer(answer, {"result": result.model_dump()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
