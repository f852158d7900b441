"""MLflow tracking as a trainer callback, and the pyfunc that serves a checkpoint.

The trainer never imports this module: :class:`MLflowTracker` plugs into its
hooks. Every call names its run id explicitly (MLflow's active run is
thread-local, and several architectures train at once in one process).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import LoggedModelOutput, Metric
from mlflow.pyfunc.model import PythonModel
from mlflow.tracking import MlflowClient
from pydantic import BaseModel, ConfigDict, Field

from charlm.candidates import generation_speed, snapshot_candidates
from charlm.generate import LoadedModel
from charlm.training import QUALITY_TARGETS, Callback, DistInfo, FitResult, Trainer, time_to_targets

# Explicit requirements keep log_model from inferring them (seconds per call).
PIP_REQUIREMENTS = ["charlm", "torch", "numpy", "pydantic", "pandas"]
MODEL_CODE = Path(__file__).with_name("pyfunc_model.py")  # logged as the model's code: no pickled object
# MLflow checks each logged model against its input example and says so at INFO, once per model.
logging.getLogger("mlflow.models.signature").setLevel(logging.WARNING)
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` when set, else the embedded default: a local SQLite store."""
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


class TrackingUnavailable(RuntimeError):
    pass


def check_tracking_server(uri: str | None = None, timeout: float = 10.0) -> str:
    """Fail fast, before any training, when an HTTP tracking server does not answer."""
    import urllib.error
    import urllib.request

    uri = uri or tracking_uri()
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as response:
                if response.status != 200:
                    raise TrackingUnavailable(f"MLflow tracking server {uri} answered /health with {response.status}")
        except (urllib.error.URLError, OSError) as err:
            raise TrackingUnavailable(
                f"MLflow tracking server {uri} is unreachable ({getattr(err, 'reason', err)}); "
                "start it or unset MLFLOW_TRACKING_URI to use the local SQLite store"
            ) from None
    else:
        MlflowClient(uri).search_experiments(max_results=1)  # creates/migrates a local store once, up front
    return uri


MAX_LENGTH = 10_000  # characters one request may ask for


class GenerationRequest(BaseModel):
    """One row of the served model's input: a priming text and the sampling options."""

    model_config = ConfigDict(extra="forbid")

    prime: str = Field(description="the text to continue")
    length: int = Field(200, ge=0, le=MAX_LENGTH, description=f"characters to generate (at most {MAX_LENGTH:,})")
    temperature: float = Field(1.0, ge=0.0, allow_inf_nan=False, description="0 = greedy")
    top_k: int | None = Field(None, ge=1, description="sample among the k most likely characters")
    seed: int | None = Field(None, description="make the sample reproducible")


INPUT_EXAMPLE = [{"prime": "the spirit ", "length": 40, "temperature": 0.8, "seed": 1}]


class CharLMPyfunc(PythonModel):
    """Generates text from a charlm checkpoint (logged as code: ``charlm/pyfunc_model.py``).

    Input: rows of :class:`GenerationRequest` — a list of dicts, or a DataFrame with a
    ``prime`` column and optional ``length``, ``temperature``, ``top_k``, ``seed``
    columns; every option goes in the row (MLflow's typed pyfuncs take no params).
    Output: the generated texts, without the priming text.
    """

    def load_context(self, context: Any) -> None:
        paths = [context.artifacts[name] for name in sorted(context.artifacts)]  # one, or an ensemble's members
        self.model = LoadedModel.from_checkpoints(paths, combine="ensemble", device="cpu")

    def predict(
        self, context: Any, model_input: list[GenerationRequest], params: dict[str, Any] | None = None
    ) -> list[str]:
        return [
            self.model.generate(
                request.prime,
                request.length,
                temperature=request.temperature,
                top_k=request.top_k,
                seed=request.seed,
                on_unknown="unk",
            )
            for request in model_input
        ]


def load_registered(model_uri: str) -> LoadedModel:
    """The :class:`~charlm.generate.LoadedModel` behind an MLflow model URI
    (``models:/charlm@champion``, ``models:/m-…``, ``runs:/…``)."""
    pyfunc: CharLMPyfunc = mlflow.pyfunc.load_model(model_uri).unwrap_python_model()
    return pyfunc.model


def log_checkpoint_model(
    checkpoint: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    name: str,
    *,
    run_id: str,
    step: int = 0,
    tags: dict[str, Any] | None = None,
    client: MlflowClient | None = None,
    metrics: dict[str, float] | None = None,
) -> str:
    """Log a checkpoint as an MLflow 3 logged model of run ``run_id`` (a pyfunc, as code), linked to
    the run's metrics at ``step`` — or, given ``metrics``, to these alone (logged to the run at
    ``step``): a model the epoch's metrics do not describe, such as an ensemble. Returns its model
    id. The run stays as it is (no active run is opened, so none is ended). Several checkpoints
    make an ensemble (the mean of their probabilities), served like one model."""
    client = client or MlflowClient()
    paths = [checkpoint] if isinstance(checkpoint, str | os.PathLike) else list(checkpoint)
    artifacts = (
        {"checkpoint": str(paths[0])} if len(paths) == 1 else {f"member-{i:02d}": str(p) for i, p in enumerate(paths)}
    )
    run = client.get_run(run_id)
    model = mlflow.initialize_logged_model(
        name=name,
        source_run_id=run_id,
        experiment_id=run.info.experiment_id,
        tags={k: str(v) for k, v in (tags or {}).items()},
    )
    mlflow.pyfunc.log_model(
        name=name,
        python_model=str(MODEL_CODE),
        artifacts=artifacts,
        pip_requirements=PIP_REQUIREMENTS,
        input_example=INPUT_EXAMPLE,
        model_id=model.model_id,
    )
    # What log_model(step=…) does for an active run: the run names the model as an output, and the
    # run's metrics at that step are the model's too.
    client.log_outputs(run_id, models=[LoggedModelOutput(model.model_id, step=step)])
    if metrics is not None:
        now = _now_ms()
        at_step = [Metric(k, float(v), now, step, run_id=run_id, model_id=model.model_id) for k, v in metrics.items()]
    else:
        at_step = [
            Metric(m.key, m.value, m.timestamp, m.step, run_id=run_id, model_id=model.model_id)
            for key in run.data.metrics
            for m in client.get_metric_history(run_id, key)
            if m.step == step and m.model_id is None
        ]
    if at_step:
        client.log_batch(run_id, metrics=at_step)
    return str(model.model_id)


class MLflowTracker(Callback):
    """Logs one training run to the MLflow run ``run_id``.

    Parameters at the start; ``train_loss`` and ``lr`` every ``log_every`` steps
    (``step`` = optimizer step); epoch metrics with ``step`` = epoch number; the
    latest and best checkpoints as artifacts under ``checkpoints/``; each SGDR
    cycle-end snapshot as its own logged model tagged with the cycle index.
    """

    def __init__(
        self,
        run_id: str,
        *,
        client: MlflowClient | None = None,
        log_snapshots: bool = True,
        model_tags: dict[str, str] | None = None,
        targets: Sequence[float] = QUALITY_TARGETS,
    ) -> None:
        self.run_id = run_id
        self.targets = tuple(targets)  # validation losses whose time to reach is logged
        self.client = client or MlflowClient()
        self.log_snapshots = log_snapshots
        self.model_tags = model_tags or {}  # on every logged model (task, fingerprint, corpus)
        self.snapshot_model_ids: dict[int, str] = {}
        self.snapshot_paths: dict[int, str] = {}
        self.candidates: list[dict[str, Any]] = []  # ensembles and weight averages, evaluated and logged
        self.gen_chars_per_sec = 0.0
        self.best_model_id: str | None = None
        self._logged_step = self._logged_epoch = 0

    @classmethod
    def for_job(
        cls, tracking_uri: str, run_id: str, dist: DistInfo, model_tags: dict[str, str] | None = None
    ) -> MLflowTracker:
        """The tracker of a job's main rank, its run tagged with where the job ran."""
        mlflow.set_tracking_uri(tracking_uri)  # the fluent API (log_model) uses it too
        client = MlflowClient(tracking_uri)
        tags = {"charlm.restarts": dist.restarts, "charlm.world_size": dist.world_size, "charlm.nnodes": dist.nnodes}
        from mlflow.entities import RunTag

        client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])
        return cls(run_id, client=client, model_tags=model_tags)

    def on_fit_start(self, trainer: Trainer) -> None:
        if trainer.step:  # a resumed run: parameters are logged; skip what the failed attempt already logged
            steps = self.client.get_metric_history(self.run_id, "train_loss_step")
            epochs = self.client.get_metric_history(self.run_id, "val_loss")
            self._logged_step = max((m.step for m in steps), default=0)
            self._logged_epoch = max((m.step for m in epochs), default=0)
            return
        params = {k: str(v) for k, v in trainer.config.flat().items()}
        params["parameters"] = str(trainer.parameters)
        params["vocab_size"] = str(len(trainer.vocab))
        params["device"] = str(trainer.device)
        params["precision"] = trainer.precision  # what `auto` resolved to on this device
        if trainer.bf16_step_ratio is not None:  # and, on a CPU, the step times that decided it
            params["precision_bf16_step_ratio"] = f"{trainer.bf16_step_ratio:.3f}"
        params["cuda_graph"] = str(trainer.config.cuda_graph)
        params["world_size"] = str(trainer.dist.world_size)
        from mlflow.entities import Param

        self.client.log_batch(self.run_id, params=[Param(k, v) for k, v in params.items()])

    def on_step_end(self, trainer: Trainer, step: int, loss: float, lr: float) -> None:
        from mlflow.entities import Metric

        if step <= self._logged_step:
            return
        now = _now_ms()
        self.client.log_batch(
            self.run_id, metrics=[Metric("train_loss_step", loss, now, step), Metric("lr", lr, now, step)]
        )

    def on_epoch_end(self, trainer: Trainer, epoch: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        if epoch + 1 <= self._logged_epoch:
            return
        now = _now_ms()
        # val_loss_raw: the trained weights' loss while a weight average is the run's model
        names: tuple[str, ...] = ("train_loss", "train_bpc", "val_loss", "val_loss_raw", "val_bpc", "val_accuracy")
        names += ("chars_per_sec", "elapsed_s")
        batch = [Metric(n, float(metrics[n]), now, epoch + 1) for n in names if n in metrics]
        # Time to quality: the wall-clock seconds at which this run first reached each target, once.
        before = time_to_targets(trainer.history[:-1], self.targets)
        for target, seconds in time_to_targets(trainer.history, self.targets).items():
            if target not in before:
                batch.append(Metric(f"time_to_val_loss_{target}_s", float(seconds), now, epoch + 1))
        self.client.log_batch(self.run_id, metrics=batch)

    def on_checkpoint(self, trainer: Trainer, kind: str, path: Path, metrics: dict[str, float]) -> None:
        if kind in ("last", "best"):
            self.client.log_artifact(self.run_id, str(path), artifact_path="checkpoints")
        elif kind.startswith("cycle-") and self.log_snapshots:
            cycle = int(kind.removeprefix("cycle-"))
            self.snapshot_paths[cycle] = str(path)
            tags = {"charlm.kind": "sgdr-snapshot", "charlm.cycle": cycle, "charlm.val_loss": metrics["val_loss"]}
            self.snapshot_model_ids[cycle] = self._log_model(trainer, path, kind, int(metrics["epoch"]), tags)

    def on_fit_end(self, trainer: Trainer, result: FitResult) -> None:
        from mlflow.entities import Metric

        now = _now_ms()
        self.client.log_batch(
            self.run_id,
            metrics=[
                Metric("best_val_loss", result.best_val_loss, now, result.best_epoch),
                Metric("wall_time_s", result.wall_time, now, 0),
            ],
        )
        best = result.checkpoints.get("best")
        if best and self.log_snapshots:  # the best checkpoint as a logged model: a promotion candidate
            speed = generation_speed(LoadedModel.from_checkpoint(best, device=trainer.device))
            self.gen_chars_per_sec = speed
            tags = {
                "charlm.kind": "best",
                "charlm.val_loss": result.best_val_loss,
                "charlm.epoch": result.best_epoch,
                "charlm.members": 1,
                "charlm.gen_chars_per_sec": round(speed),
            }
            self.best_model_id = self._log_model(trainer, best, "best", result.best_epoch, tags)
        snapshots = [self.snapshot_paths[c] for c in sorted(self.snapshot_paths)]
        if self.log_snapshots and len(snapshots) >= 2:
            self._log_combined(trainer, snapshots, int(result.history[-1]["epoch"]) if result.history else 0)

    def _log_combined(self, trainer: Trainer, snapshots: list[str], step: int) -> None:
        """Ensembles and weight averages of the last snapshots, each a logged model and a candidate."""
        for combined in snapshot_candidates(snapshots, trainer.corpus, device=str(trainer.device)):
            size = len(combined.members)
            tags = {
                "charlm.kind": combined.kind,
                "charlm.members": size,
                "charlm.member_files": ",".join(Path(p).name for p in combined.members),
                "charlm.val_loss": combined.val_loss,
                "charlm.gen_chars_per_sec": round(combined.gen_chars_per_sec),
            }
            files = combined.checkpoint or combined.members
            name = f"{combined.kind.replace('_', '-')}-last-{size}"
            metrics = {f"{combined.kind}_{size}_val_loss": combined.val_loss}  # its own, not the last epoch's
            model_id = self._log_model(trainer, files, name, int(step), tags, metrics)
            self.candidates.append({**combined.as_dict(), "model_id": model_id})

    def _log_model(
        self,
        trainer: Trainer,
        path: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
        kind: str,
        step: int,
        tags: dict[str, Any],
        metrics: dict[str, float] | None = None,
    ) -> str:
        arch = trainer.config.architecture
        tags = {"charlm.architecture": arch, **self.model_tags, **tags}
        return log_checkpoint_model(
            path, f"{arch}-{kind}", run_id=self.run_id, step=step, tags=tags, client=self.client, metrics=metrics
        )


def _now_ms() -> int:
    import time

    return int(time.time() * 1000)
