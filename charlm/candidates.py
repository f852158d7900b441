"""Promotion candidates beyond a run's best checkpoint: ensembles and weight averages of its
last SGDR snapshots (:mod:`charlm.ensemble`), and the ensemble of the best checkpoints of one
architecture trained with several seeds — each evaluated on the validation split, with the
generation speed it would serve at."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from charlm.checkpoint import save_checkpoint
from charlm.data import PreparedCorpus, make_layout
from charlm.ensemble import Combine, combine_payloads, load_payloads
from charlm.generate import LoadedModel
from charlm.training import evaluate

KINDS: dict[Combine, str] = {"ensemble": "ensemble", "average": "weight_average"}
SEED_ENSEMBLE = "seed_ensemble"
DEFAULT_SIZES = (2, 3, 4)


@dataclass(frozen=True)
class Combined:
    """A candidate built from ``members`` (snapshot files, oldest first) by ``kind``."""

    kind: str  # "ensemble", "weight_average" (of snapshots) or "seed_ensemble" (of seeds' best checkpoints)
    members: list[str]
    checkpoint: str | None  # a weight average's own checkpoint file; an ensemble has its members
    val_loss: float
    val_bpc: float
    val_accuracy: float
    gen_chars_per_sec: float

    @property
    def label(self) -> str:
        if self.kind == SEED_ENSEMBLE:
            return f"ensemble of {len(self.members)} seeds' best"
        what = "ensemble" if self.kind == "ensemble" else "weight average"
        return f"{what} of the last {len(self.members)} snapshots"

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "label": self.label}


def validation_metrics(loaded: LoadedModel, corpus: PreparedCorpus) -> dict[str, float]:
    """Loss, bits/char and accuracy on the whole validation split, as training measured them (the
    run's validation batch, so that a candidate compares with the run's best ``val_loss``)."""
    data = loaded.config.data
    layout = make_layout(
        loaded.model.layout,
        corpus.valid,
        batch_size=data.validation_batch_size,
        context=data.context,
        name="validation split",
        even=False,
    )
    return evaluate(loaded.model, layout, loaded.device)


def generation_speed(loaded: LoadedModel, chars: int = 200) -> float:
    """Characters per second of greedy generation, one request (what serving costs)."""
    prime = loaded.vocab.decode(list(range(2, min(len(loaded.vocab), 10))))
    started = time.perf_counter()
    loaded.generate(prime, chars, temperature=0.0, on_unknown="unk")
    return chars / max(time.perf_counter() - started, 1e-9)


def snapshot_candidates(
    snapshots: Sequence[str | os.PathLike[str]],
    corpus: PreparedCorpus,
    sizes: Sequence[int] = DEFAULT_SIZES,
    device: str = "cpu",
) -> list[Combined]:
    """For each size M in ``sizes`` that the snapshots allow (M ≥ 2): the ensemble and the weight
    average of the last M snapshots, evaluated on ``corpus``'s validation split. A weight average
    is written as a checkpoint of its own (``average-last-M.pt`` beside the snapshots)."""
    out = []
    paths = [Path(p) for p in snapshots]
    for size in sorted(s for s in set(sizes) if 2 <= s <= len(paths)):
        members = paths[-size:]
        for combine, kind in KINDS.items():
            checkpoint = None
            if combine == "average":
                payload = combine_payloads(load_payloads(members), "average")
                checkpoint = str(save_checkpoint(payload, members[-1].parent / f"average-last-{size}.pt"))
                loaded = LoadedModel.from_checkpoint(checkpoint, device=device)
            else:
                loaded = LoadedModel.from_checkpoints(members, combine=combine, device=device)
            out.append(_evaluated(kind, members, checkpoint, loaded, corpus))
    return out


def _evaluated(
    kind: str,
    members: Sequence[Path],
    checkpoint: str | None,
    loaded: LoadedModel,
    corpus: PreparedCorpus,
) -> Combined:
    """``loaded`` (the combination of ``members``) measured on ``corpus``'s validation split."""
    metrics = validation_metrics(loaded, corpus)
    return Combined(
        kind=kind,
        members=[str(p) for p in members],
        checkpoint=checkpoint,
        val_loss=metrics["val_loss"],
        val_bpc=metrics["val_bpc"],
        val_accuracy=metrics["val_accuracy"],
        gen_chars_per_sec=generation_speed(loaded),
    )


def seed_ensemble(
    best_checkpoints: Sequence[str | os.PathLike[str]], corpus: PreparedCorpus, device: str = "cpu"
) -> Combined:
    """The ensemble of one architecture's best checkpoints from independent seeds, evaluated on
    ``corpus``'s validation split. Two seeds land in different minima, so their mean distribution
    gains more than an ensemble of one run's snapshots does (at the same inference cost per member)."""
    paths = [Path(p) for p in best_checkpoints]
    if len(paths) < 2:
        raise ValueError(f"an ensemble of seeds needs two best checkpoints or more, got {len(paths)}")
    loaded = LoadedModel.from_checkpoints(paths, combine="ensemble", device=device)
    return _evaluated(SEED_ENSEMBLE, paths, None, loaded, corpus)
