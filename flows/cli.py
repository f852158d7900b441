"""``python -m flows.pipeline``: the command line, derived from the parameter models.

Every option comes from a field of :class:`~flows.params.PipelineParams`,
:class:`~flows.params.RunnerOptions` or :class:`~charlm.distributed.DistributedConfig`
(its flag, help, choices and environment variable), so the flow's parameters and its
command line cannot drift apart. ``--quick`` is the one shorthand: the tiny preset on
three architectures.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import types
import typing
from collections.abc import Callable
from typing import Any, Literal

from prefect.exceptions import TerminationSignal
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

from charlm import stopping
from charlm.cli import describe_error
from charlm.distributed import DistributedConfig
from charlm.tracking import TrackingUnavailable, check_tracking_server
from flows.params import QUICK_ARCHITECTURES, PipelineParams, RunnerOptions

DESCRIPTION = """The nightly pipeline: fetch → prepare → train every architecture → compare → promote.

    python -m flows.pipeline                        # the notebook's ten models on s3://text-datasets/nietzsche.txt
    python -m flows.pipeline --quick --corpus-uri ../shared/data/nietzsche.txt

Runs on Prefect's ephemeral mode and a local MLflow SQLite store unless
PREFECT_API_URL / MLFLOW_TRACKING_URI point at servers.
"""


def _unwrap(annotation: Any) -> Any:
    """``X | None`` → ``X``."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _flag(name: str, field: FieldInfo) -> str:
    extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
    return str(extra.get("flag") or "--" + name.replace("_", "-"))


def _env(field: FieldInfo) -> str | None:
    extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
    env = extra.get("env")
    return str(env) if env else None


def add_options(parser: argparse._ActionsContainer, model: type[BaseModel]) -> None:
    """One option per field of ``model``; only the options given land in the namespace."""
    for name, field in model.model_fields.items():
        annotation = _unwrap(field.annotation)
        origin = typing.get_origin(annotation)
        kwargs: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS}
        if annotation is bool:
            kwargs["action"] = "store_false" if field.default is True else "store_true"
        elif isinstance(annotation, type) and issubclass(annotation, BaseModel):
            kwargs["action"] = "store_true"  # switches the section on; its fields are options of their own
        elif origin is list:
            kwargs.update(nargs="+", metavar=name.upper().removesuffix("S"))
        elif origin is dict:
            kwargs.update(action="append", metavar="KEY=VALUE")
        elif origin is Literal:
            kwargs["choices"] = typing.get_args(annotation)
        else:
            kwargs["type"] = annotation
        notes = []
        if _env(field):
            notes.append(f"env {_env(field)}")
        if kwargs.get("action") is None and field.default not in (None, ...) and not field.default_factory:
            notes.append(f"default: {field.default}")
        suffix = f" ({'; '.join(notes)})" if notes else ""
        kwargs["help"] = (field.description or "") + suffix
        parser.add_argument(_flag(name, field), **kwargs)


def _values(model: type[BaseModel], given: dict[str, Any]) -> dict[str, Any]:
    """The options given for ``model``'s fields, with its environment variables beneath them."""
    values = {name: os.environ[env] for name, f in model.model_fields.items() if (env := _env(f)) and env in os.environ}
    values.update({name: given[name] for name in model.model_fields if name in given})
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m flows.pipeline", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_options(parser, PipelineParams)
    parser.add_argument("--quick", action="store_true", help=f"the tiny preset on {', '.join(QUICK_ARCHITECTURES)}")
    add_options(parser.add_argument_group("task runner"), RunnerOptions)
    ddp = parser.add_argument_group(
        "distributed training (with --ddp: torch DDP through torch's elastic launcher; env CHARLM_<NAME> too)"
    )
    add_options(ddp, DistributedConfig)
    return parser


def _one_line(err: ValidationError) -> str:
    """A pydantic error as one line: ``field: message`` for each problem."""
    parts = []
    for e in err.errors():
        message, where = str(e["msg"]).removeprefix("Value error, "), ".".join(map(str, e["loc"]))
        parts.append(f"{where}: {message}" if where else message)
    return "; ".join(parts)


def parse(argv: list[str] | None = None) -> tuple[PipelineParams, RunnerOptions]:
    """The flow's parameters and task-runner options from the command line and the environment."""
    parser = build_parser()
    given = vars(parser.parse_args(argv))
    if given.pop("quick", False):
        clash = [flag for flag, name in (("--arch", "architectures"), ("--preset", "preset_name")) if name in given]
        if clash:
            parser.error(f"--quick sets the architectures and the preset: drop {' and '.join(clash)}")
        given.update(architectures=QUICK_ARCHITECTURES, preset_name="tiny")
    dist_given = {k: given.pop(k) for k in list(given) if k in DistributedConfig.model_fields}
    try:
        if given.pop("distributed", False) or dist_given:
            given["distributed"] = DistributedConfig.from_env(**dist_given)
        params = PipelineParams.model_validate(_values(PipelineParams, given))
        runner = RunnerOptions.model_validate(_values(RunnerOptions, given))
    except ValidationError as err:
        parser.error(_one_line(err))
    except ValueError as err:
        parser.error(str(err))
    return params, runner


class _UserErrorsWithoutTraceback(logging.Filter):
    """Prefect logs a failed task's and flow's exception with its traceback, three times over; for an
    error in the user's input (a missing corpus, an unreachable server) one line says it all."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None and describe_error(record.exc_info[1]) is not None:
            record.exc_info, record.exc_text = None, None
        return True


def main(flow: Callable[..., Any], argv: list[str] | None = None) -> Any:
    """Run the flow from the command line: a user's error ends it with one line, the last, and exit
    code 2 (options) or 1 (at run time); anything else is a bug and shows its traceback."""
    from flows.runners import make_task_runner

    params, runner = parse(argv)  # bad options: one line, exit 2, before Prefect starts
    try:
        check_tracking_server(timeout=5.0)  # an unreachable MLflow server: seconds, not Prefect's start-up
    except TrackingUnavailable as err:
        print(f"python -m flows.pipeline: error: {err}", file=sys.stderr)
        sys.exit(1)
    task_runner = make_task_runner(runner.task_runner, runner.task_runner_address, params.concurrency)
    quiet = _UserErrorsWithoutTraceback()
    for name in ("prefect.flow_runs", "prefect.task_runs"):
        logging.getLogger(name).addFilter(quiet)
    try:
        return flow.with_options(task_runner=task_runner)(params)  # type: ignore[attr-defined]
    except (KeyboardInterrupt, TerminationSignal) as err:
        # The trainings stop at their next step, write last.pt and end their runs KILLED while the
        # interpreter waits for their threads; a second signal does not wait.
        name = "SIGINT" if isinstance(err, KeyboardInterrupt) else signal.Signals(err.signal).name
        stopping.request(name)
        code = 130 if name == "SIGINT" else 128 + int(getattr(signal, name))
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: os._exit(code))
        print(
            f"python -m flows.pipeline: stopped by {name}: runs marked KILLED, last.pt kept to resume", file=sys.stderr
        )
        sys.exit(code)
    except Exception as err:
        described = describe_error(err) or _prefect_start_error(err)
        if described is None:
            raise
        print(f"python -m flows.pipeline: error: {described[1]}", file=sys.stderr)
        sys.exit(1)


def _prefect_start_error(err: BaseException) -> tuple[int, str] | None:
    """Prefect's temporary API server (no PREFECT_API_URL) that did not start in time: on a machine
    too busy to start it, the fix is a longer wait or a running server, not a traceback."""
    if not (isinstance(err, RuntimeError) and "Timed out while attempting to connect to ephemeral" in str(err)):
        return None
    wait = os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "20")
    return 1, (
        f"Prefect's temporary API server did not start within {wait} s (the machine may be too busy): "
        "raise PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, or set PREFECT_API_URL to a running Prefect server"
    )
