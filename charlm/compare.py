"""The comparison of a pipeline run's architectures: a ranked table and the validation curves."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from charlm.job import TrainResult

if TYPE_CHECKING:
    import pandas as pd

COLUMNS = [
    "architecture",
    "best_val_loss",
    "best_val_bpc",
    "parameters",
    "epochs",
    "chars_per_sec",
    "wall_time_s",
    "run_id",
]


def row(result: TrainResult) -> dict[str, Any]:
    """One architecture's line of the comparison."""
    return {name: getattr(result, name) for name in COLUMNS}


def comparison_table(results: Sequence[TrainResult]) -> pd.DataFrame:
    """Every architecture's line, best validation loss first."""
    import pandas as pd

    table = pd.DataFrame([row(r) for r in results], columns=COLUMNS)
    return table.sort_values("best_val_loss").reset_index(drop=True)


def plot_validation_curves(results: Sequence[TrainResult], path: str | os.PathLike[str]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=100)
    for r in sorted(results, key=lambda r: r.best_val_loss):
        curve = r.val_loss_curve
        ax.plot(range(1, len(curve) + 1), curve, marker="o", markersize=3, label=r.architecture)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation loss (nats/char)")
    ax.set_title("charlm: validation loss by architecture")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
