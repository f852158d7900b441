"""How the pipeline's tasks run: the task runner, GPU requests to it, and the training queue."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Protocol, TypeVar

from prefect.context import FlowRunContext
from prefect.futures import as_completed
from prefect.task_runners import ThreadPoolTaskRunner

T = TypeVar("T")
R = TypeVar("R")


class Future(Protocol[R]):
    def result(self) -> R: ...


def first_done(futures: Sequence[Future[R]]) -> Future[R]:
    """The first of ``futures`` to finish (Prefect's futures)."""
    return next(iter(as_completed(futures)))  # type: ignore[arg-type]


def run_queued(
    items: Iterable[T],
    submit: Callable[[int, T], Future[R]],
    concurrency: int,
    wait: Callable[[Sequence[Future[R]]], Future[R]] = first_done,
) -> tuple[list[R], list[str]]:
    """Submit at most ``concurrency`` items at a time (the rest queue here), in order; collect
    every result, and one line per failure — a failed item never stops the others."""
    queue = list(enumerate(items))
    running: list[Future[R]] = []
    results: list[R] = []
    failures: list[str] = []
    while queue or running:
        while queue and len(running) < concurrency:
            running.append(submit(*queue.pop(0)))
        done = wait(running)
        running.remove(done)
        try:
            results.append(done.result())
        except Exception as err:
            failures.append(f"{type(err).__name__}: {err}")
    return results, failures


def _runner_name() -> str:
    context = FlowRunContext.get()
    return type(context.task_runner).__name__ if context else ""


@contextlib.contextmanager
def gpu_request(gpus: int | None) -> Iterator[None]:
    """Declare the GPUs of the tasks submitted inside to a distributed task runner's resource
    model: Ray's ``num_gpus`` (prefect-ray) or a Dask worker resource ``GPU`` (prefect-dask)."""
    runner = _runner_name()
    if gpus and runner == "RayTaskRunner":
        from prefect_ray.context import remote_options

        with remote_options(num_gpus=gpus):
            yield
    elif gpus and runner == "DaskTaskRunner":
        import dask

        with dask.annotate(resources={"GPU": gpus}):
            yield
    else:
        yield


def make_task_runner(kind: str, address: str | None = None, concurrency: int = 16, **options: Any) -> Any:
    """``thread`` (default, one host), ``dask`` (prefect-dask) or ``ray`` (prefect-ray); ``address``
    names an existing cluster (``tcp://scheduler:8786``, ``ray://head:10001``), else a local one starts
    (``options`` go to the runner: Ray's ``init_kwargs``, Dask's ``cluster_kwargs`` such as
    ``resources={"GPU": 8}`` for the local cluster's workers)."""
    if kind == "thread":
        return ThreadPoolTaskRunner(max_workers=concurrency)
    if kind == "dask":
        # Dask workers are daemonic by default and could not start the DDP workers.
        os.environ.setdefault("DASK_DISTRIBUTED__WORKER__DAEMON", "False")
        from prefect_dask import DaskTaskRunner

        if address:
            return DaskTaskRunner(address=address, **options)
        local = {"n_workers": concurrency, "threads_per_worker": 1, "processes": True}
        return DaskTaskRunner(**{**options, "cluster_kwargs": {**local, **options.get("cluster_kwargs", {})}})
    if kind == "ray":
        from prefect_ray import RayTaskRunner

        return RayTaskRunner(address=address, **options)
    raise ValueError(f"task runner {kind!r}: expected thread, dask or ray")
