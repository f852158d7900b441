"""The pipeline's parameters: one typed model, validated before any work.

The flow takes a :class:`PipelineParams`; ``python -m flows.pipeline`` derives its
command line from the same fields (``flows/cli.py``): a field's ``flag`` and ``env``
metadata name its option and environment variable, its description is the help.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from charlm.config import RunConfig, preset
from charlm.device import uses_cuda
from charlm.distributed import DistributedConfig
from charlm.models import ARCHITECTURES, get_architecture
from charlm.storage import DEFAULT_CORPUS_URI, check_uri

QUICK_ARCHITECTURES = ["char3", "stateful_gru", "stateful_lstm"]


def option(default: Any = None, help: str = "", *, flag: str | None = None, env: str | None = None, **kw: Any) -> Any:
    """A field with its command-line flag and environment variable (``flows/cli.py`` reads them)."""
    extra = {k: v for k, v in {"flag": flag, "env": env}.items() if v}
    if callable(default):
        return Field(default_factory=default, description=help, json_schema_extra=extra or None, **kw)
    return Field(default, description=help, json_schema_extra=extra or None, **kw)


class PipelineParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    corpus_uri: str = option(
        DEFAULT_CORPUS_URI, "s3://bucket/key, https://…, file://… or a path", env="CHARLM_CORPUS_URI"
    )
    architectures: list[str] = option(
        lambda: list(ARCHITECTURES), "architectures to train (default: all ten)", flag="--arch", min_length=1
    )
    preset_name: Literal[
        "notebook",
        "notebook_full",
        "tiny",
        "awd_sgdr",
        "short_sgdr",
        "wide_awd_sgdr",
        "awd_ar_sgdr",
        "awd_ar_sgdr_batch64",
    ] = option(
        "notebook",
        "settings preset of every architecture (awd_sgdr, short_sgdr: the stateful ones only, beyond the notebook; "
        "notebook_full: the notebook's 80-epoch stateful_lstm training; wide_awd_sgdr: awd_sgdr's stateful_lstm at "
        "2 x 1024, for a GPU; awd_ar_sgdr: awd_sgdr's stateful_lstm with AWD-LSTM's activation regularisation; "
        "awd_ar_sgdr_batch64: awd_ar_sgdr on 64 columns at sqrt(2) the rate)",
        flag="--preset",
    )
    overrides: dict[str, dict[str, Any]] = option(
        dict,
        "config overrides: per architecture, or '*' for all; on the command line KEY=VALUE for all, "
        "e.g. --set data.batch_size=32",
        flag="--set",
    )
    seeds: int = option(
        1,
        "independent trainings of each architecture (seeds S…S+N-1, S the config's seed); two or more also make "
        "the ensemble of their best checkpoints, a promotion candidate of N models (see --max-ensemble)",
        ge=1,
    )
    distill: bool = option(
        False,
        "with --seeds 2 or more, stateful architectures: then train one more model of each toward the "
        "ensemble of its seeds' best checkpoints (knowledge distillation): a candidate of one model's cost",
    )
    distill_weight: float = option(
        0.9, "with --distill: the teachers' share of the training target, the rest the next character", gt=0, le=1
    )
    concurrency: int = option(2, "training tasks at once (the rest queue)", ge=1)
    experiment_name: str = option("charlm", "MLflow experiment", flag="--experiment")
    s3_endpoint_url: str | None = option(None, "S3-compatible endpoint, e.g. MinIO", env="CHARLM_S3_ENDPOINT_URL")
    promote_best: bool = option(True, "train and compare only: promote nothing", flag="--no-promote")
    model_name: str = option("charlm", "registered model to promote into")
    promotion_margin: float = option(0.0, "improvement (nats/char) needed to replace the champion", flag="--margin")
    max_ensemble: int = option(
        3, "largest snapshot ensemble (models run per character) the promotion gate accepts; 1: none", ge=1
    )
    skip_if_unchanged: bool = option(False, "skip training when the champion was trained on this exact corpus")
    distributed: DistributedConfig | None = option(None, "train each architecture as a DDP job", flag="--ddp")
    gpus_per_task: int | None = option(None, "GPUs allotted to each architecture task", ge=1)
    node_deployment: str | None = option(
        None,
        "deployment of flows/ddp_node.py that runs a multi-node job's other nodes, e.g. charlm-ddp-node/gpu "
        "(without it, start them with 'charlm join')",
        env="CHARLM_NODE_DEPLOYMENT",
    )

    @field_validator("corpus_uri")
    @classmethod
    def _uri(cls, value: str) -> str:
        check_uri(value)  # syntax, and a local file's existence: seconds before Prefect would start
        return value

    @field_validator("overrides", mode="before")
    @classmethod
    def _overrides_from_assignments(cls, value: Any) -> Any:
        """``["data.batch_size=32", …]`` (the command line's --set) applies to every architecture."""
        if isinstance(value, list):
            return {"*": RunConfig.parse_overrides(value)} if value else {}
        return value

    @model_validator(mode="after")
    def _check(self) -> PipelineParams:
        unknown = [a for a in self.architectures if a not in ARCHITECTURES]
        if unknown:
            raise ValueError(f"architectures: unknown {unknown}; known: {', '.join(ARCHITECTURES)}")
        stray = set(self.overrides) - set(self.architectures) - {"*"}
        if stray:
            raise ValueError(f"overrides: for architectures not requested: {sorted(stray)}")
        if self.distill:
            if self.seeds < 2:
                raise ValueError("distill: a student learns from the ensemble of the seeds: give --seeds 2 or more")
            windows = [a for a in self.architectures if get_architecture(a).layout != "stream"]
            if windows:
                raise ValueError(f"distill: stateful architectures only, not {', '.join(windows)}")
        if self.distributed is not None:
            self.distributed.check_multinode(require_id=False)  # the flow names a job that has no id
        self.run_configs()  # every override applies to a real field, every value is valid
        return self

    def run_configs(self) -> list[RunConfig]:
        """One validated RunConfig per training task: per architecture, per seed."""
        configs = []
        for arch in self.architectures:
            config = preset(self.preset_name, arch).override({"progress": False})
            config = config.override({**self.overrides.get("*", {}), **self.overrides.get(arch, {})})
            configs += [config.override({"seed": config.seed + i}) for i in range(self.seeds)]
        return configs

    def student_config(self, config: RunConfig, teachers: list[str], seed: int) -> RunConfig:
        """An architecture's student (``--distill``): one of its seeds' ``config`` with another ``seed``
        (not a teacher's), taught by ``teachers``, its seeds' best checkpoints."""
        return config.override({"seed": seed, "distill": {"teachers": teachers, "weight": self.distill_weight}})

    @staticmethod
    def student_name(architecture: str) -> str:
        return f"{architecture}-distilled"

    def job_name(self, config: RunConfig) -> str | None:
        """A task's name when an architecture is trained with several seeds (its child run, its
        checkpoint directory): ``stateful_lstm-seed1``; None (its architecture) otherwise."""
        return f"{config.architecture}-seed{config.seed}" if self.seeds > 1 else None

    def cpu_plan(self, cores: int, tasks: int | None = None) -> tuple[int, DistributedConfig | None, str | None]:
        """DDP ranks on a CPU host without oversubscribing it: ``(concurrency, distributed, note)``.
        Tasks at once are capped so that their ranks fit the cores, and each rank gets an equal
        share of the cores as torch threads (unless ``threads_per_rank`` is given); GPU jobs and
        in-process training are left as they are."""
        dist = self.distributed
        if dist is None or (uses_cuda(self.run_configs()[0].device) and dist.backend != "gloo"):
            return self.concurrency, dist, None
        ranks = dist.nproc_per_node or 1
        tasks = tasks or len(self.architectures) * self.seeds  # the training tasks (a wave of them)
        at_once = min(self.concurrency, tasks)
        concurrency = self.concurrency
        note = None
        if ranks * at_once > cores:
            concurrency = max(1, cores // ranks)
            at_once = min(concurrency, tasks)
            note = (
                f"{ranks} ranks × {min(self.concurrency, tasks)} tasks would oversubscribe "
                f"{cores} cores: {concurrency} task(s) at a time"
            )
        if dist.threads_per_rank is None:
            dist = dist.model_copy(update={"threads_per_rank": max(1, cores // (ranks * at_once))})
        return concurrency, dist, note

    def distribution(self, flow_run_id: str) -> DistributedConfig | None:
        """The DDP settings, a multi-node job named after the flow run when it has no id."""
        dist = self.distributed
        if dist is not None and dist.nnodes > 1 and dist.rdzv_id is None:
            dist = dist.model_copy(update={"rdzv_id": f"charlm-{flow_run_id[:8]}"})
        return dist


class RunnerOptions(BaseModel):
    """How the flow's tasks run (the flow's task runner, not a flow parameter)."""

    model_config = ConfigDict(extra="forbid")

    task_runner: Literal["thread", "dask", "ray"] = option(
        "thread", "Prefect task runner: threads here, or a Dask or Ray cluster", env="CHARLM_TASK_RUNNER"
    )
    task_runner_address: str | None = option(
        None, "an existing Dask scheduler (tcp://…) or Ray cluster (ray://…)", env="CHARLM_TASK_RUNNER_ADDRESS"
    )
