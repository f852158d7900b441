"""The comparison of a pipeline run's architectures: a table ranked within each task, and plots.

A validation loss measures a task — a corpus split, a vocabulary (case-sensitive or
lowercased, ``min_freq``) — and losses of two tasks are not comparable: a lowercased
58-symbol vocabulary is an easier problem than an 84-symbol one. So every row states
its task, ranks are given within a task, and the run's best is taken from its
*primary* task: the champion's, or the one most architectures share.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from charlm.job import TrainResult

if TYPE_CHECKING:
    import pandas as pd

COLUMNS = [
    "rank",
    "architecture",
    "candidate",
    "best_val_loss",
    "best_val_bpc",
    "task",
    "vocab_size",
    "valid_chars",
    "parameters",
    "epochs",
    "chars_per_sec",
    "target_reached",
    "gen_chars_per_sec",
    "wall_time_s",
    "run_id",
]
ROUNDING = {"best_val_loss": 4, "best_val_bpc": 4, "chars_per_sec": 0, "gen_chars_per_sec": 0, "wall_time_s": 1}


def rows_of(result: TrainResult) -> list[dict[str, Any]]:
    """An architecture's lines: its best checkpoint, then each ensemble and weight average of its
    snapshots (their parameters: what inference holds; their speed: greedy generation)."""
    base = {c: getattr(result, c) for c in COLUMNS if c not in ("rank", "candidate", "target_reached")}
    base["target_reached"] = target_reached(result)
    of_seed = f", seed {result.seed}" if result.name and result.name != result.architecture else ""
    if result.teachers:
        of_seed = f", distilled from {len(result.teachers)} (seed {result.seed})"
    best = result.history[result.best_epoch - 1] if 0 < result.best_epoch <= len(result.history) else {}
    averaged = " (weight average)" if "val_loss_raw" in best else ""  # config.average served it
    rows = [{**base, "candidate": "best checkpoint" + averaged + of_seed}]
    for c in result.candidates:
        members = len(c["members"])
        rows.append(
            {
                **base,
                "candidate": c["label"] + of_seed,
                "best_val_loss": c["val_loss"],
                "best_val_bpc": c["val_bpc"],
                "parameters": result.parameters * (members if c["kind"] == "ensemble" else 1),
                "gen_chars_per_sec": c["gen_chars_per_sec"],
            }
        )
    return rows


def primary_task(results: Sequence[TrainResult], champion_task: str | None = None) -> str:
    """The champion's task when a result shares it, else the task most results share (ties: the best's)."""
    tasks = Counter(r.task for r in results)
    if champion_task is not None and champion_task in tasks:
        return champion_task
    return max(tasks, key=lambda t: (tasks[t], -min(r.best_val_loss for r in results if r.task == t)))


def seed_ensemble_row(entry: dict[str, Any]) -> dict[str, Any]:
    """The line of an ensemble of several seeds' best checkpoints (:func:`charlm.experiment.log_seed_ensembles`):
    its parameters are all its members', its wall time their training's sum, its run the parent."""
    row = {c: entry.get(c) for c in COLUMNS if c not in ("rank", "candidate", "best_val_loss", "best_val_bpc")}
    return {
        **row,
        "candidate": entry["label"],
        "best_val_loss": entry["val_loss"],
        "best_val_bpc": entry["val_bpc"],
        "chars_per_sec": math.nan,
        "target_reached": "",
    }


def comparison_table(
    results: Sequence[TrainResult], primary: str | None = None, seed_ensembles: Sequence[dict[str, Any]] = ()
) -> pd.DataFrame:
    """One row per candidate — each architecture's best checkpoint, its snapshots' ensembles and
    averages, the ensembles of its seeds: the primary task's rows first, ranked by validation loss;
    then each other task's rows, ranked among themselves (rank restarts at 1 per task)."""
    import pandas as pd

    primary = primary or primary_task(results)
    every = [row for r in results for row in rows_of(r)] + [seed_ensemble_row(e) for e in seed_ensembles]
    ordered = sorted(every, key=lambda row: (row["task"] != primary, row["task"], row["best_val_loss"]))
    ranks = Counter[str]()
    for row in ordered:
        ranks[row["task"]] += 1
        row["rank"] = ranks[row["task"]]
    return pd.DataFrame(ordered, columns=COLUMNS)


def rounded(table: pd.DataFrame) -> pd.DataFrame:
    """For display (CSV, artifacts, descriptions); metrics keep full precision."""
    return table.round(ROUNDING)


def markdown(table: pd.DataFrame) -> str:
    """The table as markdown, one table per task under a line that names it (the parent run's
    description in the MLflow UI)."""
    shown = rounded(table)
    columns = [c for c in COLUMNS if c not in ("task", "vocab_size", "valid_chars", "run_id", "wall_time_s")]
    parts = []
    for task, rows in shown.groupby("task", sort=False):
        first = rows.iloc[0]
        parts.append(f"*{task}* — vocabulary {first['vocab_size']}, {first['valid_chars']:,} validation characters\n")
        parts.append("| " + " | ".join(columns) + " |\n|" + "---|" * len(columns))
        parts += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows[columns].itertuples(index=False)]
        parts.append("")
    return "\n".join(parts)


def _cell(value: Any) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        return "—"
    if isinstance(value, float):
        return f"{value:,.4f}".rstrip("0").rstrip(".") if value % 1 else f"{value:,.0f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def target_reached(result: TrainResult) -> str:
    """The lowest quality target the run reached and when: ``≤1.3697 at 95 s`` (empty if none)."""
    reached = result.time_to_targets
    if not reached:
        return ""
    target = min(reached, key=float)
    return f"≤{target} at {reached[target]:,.0f} s"


def mark_targets(ax: Any, targets: Sequence[tuple[float, str]], linewidth: float = 0.6) -> None:
    """A dotted grey line across ``ax`` at each target loss, named at its right end."""
    for target, name in targets:
        ax.axhline(target, color="grey", linewidth=linewidth, linestyle=":")
        ax.annotate(
            name, (0.995, target), xycoords=("axes fraction", "data"), ha="right", va="bottom",
            fontsize=7, color="grey",
        )  # fmt: skip


def plot_loss_against_time(results: Sequence[TrainResult], path: str | os.PathLike[str], title: str = "") -> Path:
    """Validation loss against wall-clock seconds, one line per architecture, with the quality
    targets drawn across: which architecture gets good soonest, not only which ends best."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from charlm.training import QUALITY_TARGETS

    fig, ax = plt.subplots(figsize=(8, 5), dpi=100)
    for r in sorted(results, key=lambda r: r.best_val_loss):
        points = [(t, v) for t, v in zip(r.elapsed_curve, r.val_loss_curve) if math.isfinite(t)]
        if points:
            ax.plot(*zip(*points), marker="o", markersize=3, label=f"{r.name or r.architecture} ({r.task})")
    low, high = ax.get_ylim()
    mark_targets(ax, [(target, f"{target:g}") for target in QUALITY_TARGETS if low <= target <= high])
    ax.set_xlabel("wall-clock seconds (validation included)")
    return _save(fig, ax, f"validation loss against time{' — ' + title if title else ''}", path)


def plot_validation_curves(results: Sequence[TrainResult], path: str | os.PathLike[str], title: str = "") -> Path:
    """Validation loss per epoch, one line per architecture (integer epochs on the axis)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(8, 5), dpi=100)
    for r in sorted(results, key=lambda r: r.best_val_loss):
        curve = r.val_loss_curve
        ax.plot(
            range(1, len(curve) + 1), curve, marker="o", markersize=3, label=f"{r.name or r.architecture} ({r.task})"
        )
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    return _save(fig, ax, f"validation loss by architecture{' — ' + title if title else ''}", path)


def _save(fig: Any, ax: Any, title: str, path: str | os.PathLike[str]) -> Path:
    """The finishing shared by the plots: loss axis, title, grid, legend; written as PNG and closed."""
    import matplotlib.pyplot as plt

    ax.set_ylabel("validation loss (nats/char)")
    ax.set_title(f"charlm: {title}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
