"""What the pipeline tells its user: the closing summary, the Prefect artifacts, its logger."""

from __future__ import annotations

import logging
import math
import re
from typing import Any

from charlm.training import Callback, Trainer


def logger() -> Any:
    """The Prefect run logger inside a flow or task run, else the ``charlm`` logger (``task.fn()`` in tests)."""
    from prefect import get_run_logger
    from prefect.exceptions import MissingContextError

    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("charlm")


class ProgressArtifact(Callback):
    """A Prefect progress artifact per architecture task (``train-<architecture>``), moved at each epoch."""

    def __init__(self, architecture: str) -> None:
        self.key = "train-" + re.sub(r"[^a-z0-9]+", "-", architecture.lower())
        self.artifact_id: Any = None

    def on_fit_start(self, trainer: Trainer) -> None:
        from prefect.artifacts import create_progress_artifact

        done = 100.0 * trainer.epoch / trainer.schedule.total_epochs
        description = f"{trainer.config.architecture}: epochs done of {trainer.schedule.total_epochs}"
        self.artifact_id = create_progress_artifact(done, key=self.key, description=description)

    def on_epoch_end(self, trainer: Trainer, epoch: int, metrics: dict[str, float]) -> None:
        from prefect.artifacts import update_progress_artifact

        if self.artifact_id is not None:
            update_progress_artifact(self.artifact_id, 100.0 * (epoch + 1) / trainer.schedule.total_epochs)


def promotion_markdown(decision: dict[str, Any]) -> str:
    outcome = "**promoted to champion**" if decision["promoted"] else "kept as **challenger**"
    candidate = decision["candidate"]
    return (
        f"### {decision['model_name']} v{decision['version']}: {outcome}\n\n"
        f"- candidate: {candidate.get('architecture')} ({candidate.get('kind')}), "
        f"val loss {candidate.get('val_loss', float('nan')):.4f}\n- reason: {decision['reason']}\n"
    )


def runs_page(tracking_uri: str, experiment_id: str) -> str:
    """Where to read the comparison: the experiment's runs table in the machine-learning view (the
    UI otherwise opens on a GenAI overview); for a local store, the ``mlflow ui`` to start first."""
    page = f"#/experiments/{experiment_id}/runs?workflowType=machine_learning"
    if tracking_uri.startswith(("http://", "https://")):
        return f"{tracking_uri.rstrip('/')}/{page}"
    return f"mlflow ui --backend-store-uri {tracking_uri}   then open http://127.0.0.1:5000/{page}"


def _count(value: float) -> str:
    """A rate for the table, or a dash where it does not apply (an ensemble of seeds trains as its members)."""
    return f"{value:,.0f}" if math.isfinite(value) else "—"


def format_summary(summary: dict[str, Any]) -> str:
    """The lines a finished run prints: the table ranked within each task, the best, where to look,
    the registry's decision."""
    lines = ["", "charlm pipeline finished", ""]
    width = max([40] + [len(row.get("candidate", "")) for row in summary["table"]])  # "…, seed 1" may be longer
    header = (
        f"{'rank':>4} {'architecture':<18} {'candidate':<{width}} {'val_loss':>9} {'val_bpc':>8} {'params':>9} "
        f"{'epochs':>6} {'train c/s':>9} {'gen c/s':>8}"
    )
    task = None
    for row in summary["table"]:
        if row["task"] != task:
            task = row["task"]
            lines += [f"task: {task} (vocabulary {row['vocab_size']}, {row['valid_chars']:,} validation chars)", header]
        lines.append(
            f"{row['rank']:>4} {row['architecture']:<18} {row.get('candidate', ''):<{width}} "
            f"{row['best_val_loss']:>9.4f} {row['best_val_bpc']:>8.4f} {row['parameters']:>9,} {row['epochs']:>6} "
            f"{_count(row['chars_per_sec']):>9} {row.get('gen_chars_per_sec', 0):>8,.0f}"
        )
    best = summary["best"]
    lines += [
        "",
        f"best: {best['architecture']} ({best.get('candidate', 'best checkpoint')}) with validation loss "
        f"{best['best_val_loss']:.4f} nats/char ({best['task']})",
        f"MLflow: experiment {summary['experiment_id']}, parent run {summary['parent_run_id']}",
        f"MLflow runs: {runs_page(summary['tracking_uri'], summary['experiment_id'])}",
        f"outputs: {summary['output_dir']}",
    ]
    if summary.get("promotion"):
        d = summary["promotion"]
        if not d.get("registered", True):
            lines.append(f"registry: {d['model_name']}: nothing new registered ({d['reason']})")
        else:
            verdict = "is the new champion" if d["promoted"] else "stays challenger"
            lines.append(f"registry: {d['model_name']} v{d['version']} {verdict} ({d['reason']})")
    return "\n".join(lines)
