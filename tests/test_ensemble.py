"""Snapshot ensembles and weight averages, on small generated texts."""

from __future__ import annotations

import json

import pytest
import torch

from charlm import prepared
from charlm.candidates import snapshot_candidates, validation_metrics
from charlm.checkpoint import load_checkpoint
from charlm.cli import main
from charlm.config import tiny
from charlm.ensemble import SnapshotEnsemble, average_weights, combine_payloads, snapshot_paths
from charlm.generate import LoadedModel
from charlm.job import TrainJob, run_job
from tests.conftest import generated_text


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny stateful LSTM run with three SGDR snapshots."""
    work = tmp_path_factory.mktemp("snapshots")
    corpus = work / "corpus.txt"
    corpus.write_text(generated_text(1200, seed=7), encoding="utf-8")
    config = tiny("stateful_lstm").override({"schedule.1.cycles": 3})
    data = prepared.prepare(str(corpus), config, work / "store")
    run_job(TrainJob(config=config, data=data, checkpoint_dir=str(work / "run")))
    return {"dir": work / "run", "corpus": corpus, "data": prepared.load(data.dir)}


def loss(model: LoadedModel, run) -> float:
    return validation_metrics(model, run["data"])["val_loss"]


def test_an_ensemble_of_identical_members_is_its_member(run):
    path = run["dir"] / "cycle-2.pt"
    single = LoadedModel.from_checkpoint(path, device="cpu")
    twice = LoadedModel.from_checkpoints([path, path], combine="ensemble", device="cpu")
    assert isinstance(twice.model, SnapshotEnsemble)
    assert loss(twice, run) == pytest.approx(loss(single, run), abs=1e-6)
    assert twice.generate("the ", 60, temperature=0) == single.generate("the ", 60, temperature=0)


def test_an_ensemble_is_never_worse_than_its_members_on_average(run):
    """-log(mean p) <= mean(-log p) at every character (the log-sum inequality), so over the split too."""
    paths = snapshot_paths(run["dir"])
    members = [loss(LoadedModel.from_checkpoint(p, device="cpu"), run) for p in paths]
    ensemble = loss(LoadedModel.from_checkpoints(paths, combine="ensemble", device="cpu"), run)
    assert len(paths) == 3 and ensemble <= sum(members) / len(members) + 1e-9


def test_a_weight_average_of_one_snapshot_is_that_snapshot(run):
    payload = load_checkpoint(run["dir"] / "cycle-1.pt")
    alone = combine_payloads([payload], "average")
    assert alone["model"].keys() == payload["model"].keys()
    assert all(torch.equal(alone["model"][k], payload["model"][k]) for k in payload["model"])
    two = average_weights([payload["model"], load_checkpoint(run["dir"] / "cycle-2.pt")["model"]])
    name = next(iter(two))
    expected = (payload["model"][name] + load_checkpoint(run["dir"] / "cycle-2.pt")["model"][name]) / 2
    assert torch.allclose(two[name], expected)


def test_candidates_of_the_last_snapshots_are_built_and_evaluated(run):
    found = snapshot_candidates(snapshot_paths(run["dir"]), run["data"], sizes=(2, 3))
    assert [(c.kind, len(c.members)) for c in found] == [
        ("ensemble", 2),
        ("weight_average", 2),
        ("ensemble", 3),
        ("weight_average", 3),
    ]
    assert all(c.gen_chars_per_sec > 0 and c.val_loss > 0 for c in found)
    average = found[1]
    assert average.checkpoint is not None and load_checkpoint(average.checkpoint)  # its own checkpoint file
    assert loss(LoadedModel.from_checkpoint(average.checkpoint, device="cpu"), run) == pytest.approx(average.val_loss)


def test_the_cli_evaluates_and_generates_from_several_checkpoints(run, capsys):
    corpus = str(run["corpus"])
    assert main(["evaluate", "--snapshots", str(run["dir"]), "--last", "2", "--corpus", corpus]) == 0
    from_dir = json.loads(capsys.readouterr().out)
    paths = [str(p) for p in snapshot_paths(run["dir"], 2)]
    assert main(["evaluate", "--checkpoint", *paths, "--combine", "ensemble", "--corpus", corpus]) == 0
    from_files = json.loads(capsys.readouterr().out)
    assert from_dir["val_loss"] == pytest.approx(from_files["val_loss"]) and from_files["combine"] == "ensemble"
    argv = ["generate", "--snapshots", str(run["dir"]), "--combine", "average", "--prime", "the ", "-n", "30"]
    assert main([*argv, "--seed", "2"]) == 0
    first = capsys.readouterr().out
    assert main([*argv, "--seed", "2"]) == 0
    assert capsys.readouterr().out == first and len(first.strip()) >= 30  # deterministic with a seed


def test_later_evaluations_read_the_validation_batch_that_training_measured_with(tmp_path):
    """A run whose validation batch differs from its training batch (awd_sgdr: 32 columns to train,
    the notebook's 64 to validate): its best checkpoint re-evaluated — as a promotion candidate, by
    ``charlm evaluate``, by the registry's champion check — gives the loss training recorded, so a
    snapshot ensemble and the best model are compared on the same columns."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(generated_text(1200, seed=11), encoding="utf-8")
    config = tiny("stateful_lstm").override({"data.valid_batch_size": 4, "precision": "fp32"})
    data = prepared.prepare(str(corpus), config, tmp_path / "store")
    result = run_job(TrainJob(config=config, data=data, checkpoint_dir=str(tmp_path / "run")))
    best = LoadedModel.from_checkpoint(tmp_path / "run" / "best.pt", device="cpu")
    recorded = result.best_val_loss
    assert validation_metrics(best, prepared.load(data.dir))["val_loss"] == pytest.approx(recorded, rel=1e-5)
    by_text = best.evaluate_text(corpus.read_text(encoding="utf-8"))
    assert by_text["batch_size"] == 4
    assert by_text["val_loss"] == pytest.approx(recorded, rel=1e-5)
    # and the columns matter: 16 columns (the training batch) measure another loss
    other = best.evaluate_text(corpus.read_text(encoding="utf-8"), batch_size=16)["val_loss"]
    assert abs(other - recorded) > 1e-4
