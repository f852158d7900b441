"""What the pipeline tells its user: the closing summary, the Prefect artifacts, its logger."""

from __future__ import annotations

import logging
from typing import Any


def logger() -> Any:
    """The Prefect run logger inside a flow or task run, else the ``charlm`` logger (``task.fn()`` in tests)."""
    from prefect import get_run_logger
    from prefect.exceptions import MissingContextError

    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("charlm")


def promotion_markdown(decision: dict[str, Any]) -> str:
    outcome = "**promoted to champion**" if decision["promoted"] else "kept as **challenger**"
    candidate = decision["candidate"]
    return (
        f"### {decision['model_name']} v{decision['version']}: {outcome}\n\n"
        f"- candidate: {candidate.get('architecture')} ({candidate.get('kind')}), "
        f"val loss {candidate.get('val_loss', float('nan')):.4f}\n- reason: {decision['reason']}\n"
    )


def format_summary(summary: dict[str, Any]) -> str:
    """The lines a finished run prints: the ranked table, the best, where to look, the registry's decision."""
    uri = summary["tracking_uri"]
    ui = f"mlflow ui --backend-store-uri {uri}" if not uri.startswith("http") else f"open {uri}"
    lines = ["", "charlm pipeline finished", ""]
    lines.append(f"{'architecture':<18} {'val_loss':>9} {'val_bpc':>8} {'params':>9} {'epochs':>6} {'chars/s':>9}")
    for row in summary["table"]:
        lines.append(
            f"{row['architecture']:<18} {row['best_val_loss']:>9.4f} {row['best_val_bpc']:>8.4f} "
            f"{row['parameters']:>9,} {row['epochs']:>6} {row['chars_per_sec']:>9,.0f}"
        )
    best = summary["best"]
    lines += [
        "",
        f"best: {best['architecture']} with validation loss {best['best_val_loss']:.4f} nats/char",
        f"MLflow: experiment {summary['experiment_id']}, parent run {summary['parent_run_id']}",
        f"MLflow UI: {ui}",
        f"outputs: {summary['output_dir']}",
    ]
    if summary.get("promotion"):
        d = summary["promotion"]
        verdict = "is the new champion" if d["promoted"] else "stays challenger"
        lines.append(f"registry: {d['model_name']} v{d['version']} {verdict} ({d['reason']})")
    return "\n".join(lines)
