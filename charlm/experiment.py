"""The pipeline's steps as plain functions (no Prefect here; ``flows/`` composes them).

prepare → train one architecture in its own MLflow child run → compare.
"""

from __future__ import annotations

import json
import os
import socket
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from charlm.config import RunConfig
from charlm.data import PreparedCorpus, Vocabulary, prepare_corpus
from charlm.storage import FetchedCorpus

PREPARED_FILES = ("vocab.json", "stats.json", "train.pt", "valid.pt")


# --------------------------------------------------------------------------- preparation


def preparation_settings(config: RunConfig) -> dict[str, Any]:
    """What the prepared artifacts depend on, besides the corpus itself."""
    d = config.data
    return {"valid_fraction": d.valid_fraction, "lowercase": d.lowercase, "min_freq": d.min_freq}


def preparation_key(sha256: str, settings: dict[str, Any]) -> str:
    parts = "-".join(f"{k}={settings[k]}" for k in sorted(settings))
    return f"{sha256[:16]}-{parts}".replace(".", "_").replace("=", "")


def prepare_artifacts(text: str, settings: dict[str, Any], out_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Split, build the vocabulary and encode; write vocab JSON, statistics and encoded arrays."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    prepared = prepare_corpus(text, **settings)
    prepared.vocab.save(out / "vocab.json")
    stats = {**prepared.stats(), **settings}
    (out / "stats.json").write_text(json.dumps(stats, indent=1))
    torch.save(prepared.train, out / "train.pt")
    torch.save(prepared.valid, out / "valid.pt")
    return {"dir": str(out), "stats": stats, "prepared_at": time.time()}


def load_prepared(directory: str | os.PathLike[str]) -> PreparedCorpus:
    d = Path(directory)
    missing = [f for f in PREPARED_FILES if not (d / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{d}: prepared artifacts missing: {', '.join(missing)}")
    return PreparedCorpus(
        vocab=Vocabulary.load(d / "vocab.json"),
        train=torch.load(d / "train.pt", weights_only=True),
        valid=torch.load(d / "valid.pt", weights_only=True),
    )


# --------------------------------------------------------------------------- tracking helpers


def log_corpus_input(run_id: str, corpus: FetchedCorpus) -> None:
    """The corpus as an MLflow dataset input, with its digest (lineage)."""
    import mlflow
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    dataset = MetaDataset(
        source=resolve_dataset_source(corpus.uri), name=Path(corpus.uri).name or corpus.uri, digest=corpus.sha256[:36]
    )
    with mlflow.start_run(run_id=run_id, nested=True):
        mlflow.log_input(dataset, context="training", tags={"sha256": corpus.sha256, "size": str(corpus.size)})


def placement_tags(devices: list[int] | None) -> dict[str, str]:
    """Where a training ran: the GPUs it was allotted and what the process was shown."""
    tags = {}
    if devices is not None:
        tags["charlm.devices"] = ",".join(map(str, devices))
    if os.environ.get("CUDA_VISIBLE_DEVICES") is not None:  # set by Ray (num_gpus) or the operator
        tags["charlm.cuda_visible_devices"] = os.environ["CUDA_VISIBLE_DEVICES"]
    return tags


def train_architecture(
    config: RunConfig,
    prepared_dir: str,
    *,
    experiment_id: str,
    parent_run_id: str,
    corpus: FetchedCorpus,
    output_dir: str | os.PathLike[str],
    extra_tags: dict[str, str] | None = None,
    distributed=None,
    devices: list[int] | None = None,
) -> dict[str, Any]:
    """Train one architecture in a child MLflow run; returns its summary.

    The child run ends FINISHED only when training finished; any error marks it
    FAILED (with the traceback as a tag) and is raised again. With ``distributed``
    (a :class:`charlm.distributed.DistributedConfig`) training is a DDP job on
    ``devices`` (GPU indices; None on CPU), rank 0 logging to the same child run.
    """
    import mlflow
    from mlflow.tracking import MlflowClient

    from charlm.tracking import MLflowTracker
    from charlm.training import Trainer, fit_summary

    client = MlflowClient()
    arch = config.architecture
    run = client.create_run(
        experiment_id,
        run_name=arch,
        tags={
            "mlflow.parentRunId": parent_run_id,
            "charlm.architecture": arch,
            "charlm.corpus_sha256": corpus.sha256,
            "charlm.host": socket.gethostname(),
            **placement_tags(devices),
            **(extra_tags or {}),
        },
    )
    run_id = run.info.run_id
    try:
        log_corpus_input(run_id, corpus)
        client.log_artifact(run_id, str(Path(prepared_dir) / "vocab.json"), artifact_path="data")
        client.log_artifact(run_id, str(Path(prepared_dir) / "stats.json"), artifact_path="data")
        checkpoint_dir = Path(output_dir) / arch
        started = time.perf_counter()
        if distributed is None:
            tracker = MLflowTracker(run_id, client=client)
            trainer = Trainer(config, load_prepared(prepared_dir), callbacks=[tracker], checkpoint_dir=checkpoint_dir)
            summary = fit_summary(trainer.fit(), tracker.snapshot_model_ids)
        else:
            from charlm.distributed import launch_training

            summary = launch_training(
                config,
                prepared_dir,
                checkpoint_dir,
                dist=distributed,
                devices=devices,
                tracking={"tracking_uri": mlflow.get_tracking_uri(), "run_id": run_id},
            )
        wall = time.perf_counter() - started
    except BaseException as err:
        client.set_tag(run_id, "charlm.error", "".join(traceback.format_exception_only(type(err), err))[:5000])
        client.set_terminated(run_id, status="FAILED")
        raise
    client.set_terminated(run_id, status="FINISHED")
    history = summary["history"]
    best = min(history, key=lambda h: h["val_loss"])
    return {
        "architecture": arch,
        "run_id": run_id,
        "best_val_loss": summary["best_val_loss"],
        "best_val_bpc": best["val_bpc"],
        "best_epoch": summary["best_epoch"],
        "parameters": summary["parameters"],
        "epochs": len(history),
        "chars_per_sec": sum(h["chars_per_sec"] for h in history) / len(history),
        "wall_time_s": wall,
        "val_loss_curve": [h["val_loss"] for h in history],
        "best_checkpoint": summary["checkpoints"].get("best"),
        "snapshot_model_ids": summary["snapshot_model_ids"],
        "restarts": summary.get("restarts", 0),
        "world_size": summary.get("world_size", 1),
    }


# --------------------------------------------------------------------------- comparison


COMPARISON_COLUMNS = [
    "architecture",
    "best_val_loss",
    "best_val_bpc",
    "parameters",
    "epochs",
    "chars_per_sec",
    "wall_time_s",
    "run_id",
]


def comparison_table(results: list[dict[str, Any]]):
    import pandas as pd

    table = pd.DataFrame([{k: r[k] for k in COMPARISON_COLUMNS} for r in results], columns=COMPARISON_COLUMNS)
    return table.sort_values("best_val_loss").reset_index(drop=True)


def plot_validation_curves(results: list[dict[str, Any]], path: str | os.PathLike[str]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=100)
    for r in sorted(results, key=lambda r: r["best_val_loss"]):
        curve = r["val_loss_curve"]
        ax.plot(range(1, len(curve) + 1), curve, marker="o", markersize=3, label=r["architecture"])
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation loss (nats/char)")
    ax.set_title("charlm: validation loss by architecture")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


# --------------------------------------------------------------------------- promotion


def promote_run(parent_run_id: str, *, model_name: str = "charlm", margin: float = 0.0, corpus_text: str | None = None):
    """Promote the best candidate of a finished pipeline run (see :func:`charlm.registry.promote`).

    ``corpus_text`` is the run's corpus, needed only to re-evaluate a champion that was
    trained on another corpus.
    """
    from mlflow.tracking import MlflowClient

    from charlm import registry
    from charlm.tracking import load_registered

    client = MlflowClient()
    parent = client.get_run(parent_run_id)
    sha256 = parent.data.tags["charlm.corpus_sha256"]
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'"
    )
    candidates = registry.candidates_of(parent.info.experiment_id, [c.info.run_id for c in children])
    if not candidates:
        raise ValueError(f"run {parent_run_id}: no candidate models (best checkpoints or snapshots) were logged")

    def reevaluate(version) -> float:
        if corpus_text is None:
            raise ValueError("the champion was trained on another corpus: give the corpus to re-evaluate it")
        loaded = load_registered(f"models:/{model_name}/{version.version}")
        return loaded.evaluate_text(corpus_text)["val_loss"]

    return registry.promote(
        candidates[0],
        corpus_sha256=sha256,
        model_name=model_name,
        margin=margin,
        reevaluate=reevaluate,
        parent_run_id=parent_run_id,
        client=client,
    )
