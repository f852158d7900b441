"""Weight averaging (config.average): SWA's equal-weight mean or an EMA of the weights, served as
the run's model once it begins."""

from __future__ import annotations

import pytest
import torch

from charlm.checkpoint import load_checkpoint
from charlm.config import tiny
from charlm.ensemble import read_model
from charlm.prepared import prepare_for
from charlm.training import Callback, Trainer, evaluate


def averaging(start_epoch=1, decay=None, architecture="stateful_lstm"):
    config = tiny(architecture).override({"progress": False, "log_every": 1, "precision": "fp32"})
    if architecture == "stateful_lstm":  # AWD's DropConnect: the averaged copy must carry the raw matrices
        config = config.override({"model.num_layers": 2, "model.dropout": 0.2, "model.weight_drop": 0.3})
    return config.override({"average": {"start_epoch": start_epoch, "decay": decay}})


class Recorder(Callback):
    """The trained weights after every step of the averaged epochs."""

    def __init__(self, start_epoch):
        self.start_epoch, self.weights = start_epoch, []

    def on_step_end(self, trainer, step, loss, lr):
        if trainer.epoch >= self.start_epoch:
            self.weights.append([p.detach().clone() for p in trainer.module.parameters()])


@pytest.mark.parametrize("decay", [None, 0.9])
def test_the_average_is_the_mean_or_the_moving_average_of_every_step_since_its_start(decay, small_text):
    config = averaging(start_epoch=1, decay=decay)
    recorder = Recorder(start_epoch=1)
    trainer = Trainer(config, prepare_for(config, small_text), callbacks=[recorder])
    trainer.fit()
    plans = [len(trainer.train_layout.plan(epoch, config.seed, True)) for epoch in (1, 2)]
    assert len(recorder.weights) == sum(plans)  # epochs 2 and 3: the tiny schedule's last two
    assert int(trainer.average.n_averaged) == sum(plans)
    expected = [w.clone() for w in recorder.weights[0]]  # the first update copies the weights
    for weights in recorder.weights[1:]:
        for e, w in zip(expected, weights):
            if decay is None:
                continue
            e.mul_(decay).add_(w, alpha=1 - decay)
    if decay is None:
        expected = [torch.stack(ws).mean(0) for ws in zip(*recorder.weights)]
    for e, a in zip(expected, trainer.average.module.parameters()):
        assert torch.allclose(e, a, atol=1e-6)
    trained = list(trainer.module.parameters())
    assert any(not torch.equal(a, t) for a, t in zip(trainer.average.module.parameters(), trained))


def test_the_average_is_the_runs_model_from_its_start(small_text, tmp_path):
    config = averaging(start_epoch=1)
    corpus = prepare_for(config, small_text)
    trainer = Trainer(config, corpus, checkpoint_dir=tmp_path)
    result = trainer.fit()
    first, *averaged = result.history
    assert "val_loss_raw" not in first  # before the average begins: one model, one loss
    for metrics in averaged:
        assert metrics["val_loss_raw"] != metrics["val_loss"]  # the trained weights, logged beside
    served = evaluate(trainer.average.module, trainer.valid_layout, trainer.device)
    raw = evaluate(trainer.module, trainer.valid_layout, trainer.device)
    assert averaged[-1]["val_loss"] == pytest.approx(served["val_loss"], abs=1e-9)
    assert averaged[-1]["val_loss_raw"] == pytest.approx(raw["val_loss"], abs=1e-9)
    # Every checkpoint's model is the average (what evaluate, generate and the registry load);
    # the trained weights travel beside it for a resume.
    last = load_checkpoint(tmp_path / "last.pt")
    for key, value in trainer.average.module.state_dict().items():
        assert torch.equal(last["model"][key], value), key
    for key, value in trainer.module.state_dict().items():
        assert torch.equal(last["training_model"][key], value), key
    assert last["average"]["count"] == int(trainer.average.n_averaged)
    best = load_checkpoint(tmp_path / "best.pt")
    loaded, _, _ = read_model(tmp_path / "best.pt", torch.device("cpu"))
    again = evaluate(loaded, trainer.valid_layout, trainer.device)
    assert again["val_loss"] == pytest.approx(best["best"]["val_loss"], abs=1e-6)


def test_an_averaging_run_resumes_exactly(small_text, tmp_path):
    config = averaging(start_epoch=1, decay=0.95)
    corpus = prepare_for(config, small_text)
    straight = Trainer(config, corpus)
    steps = len(straight.train_layout.plan(0, config.seed, True))
    total = 2 * steps + steps // 2  # stops mid-way through the second averaged epoch
    straight.fit(max_steps=total)
    first = Trainer(config, corpus)
    first.fit(max_steps=steps + steps // 2)  # mid-epoch, averaging under way
    first.save_checkpoint(tmp_path / "half.pt")
    resumed = Trainer.resume(tmp_path / "half.pt", corpus)
    assert int(resumed.average.n_averaged) == steps // 2 > 0
    resumed.fit(max_steps=total)
    for model in ("module", "average"):
        ours, theirs = getattr(straight, model).state_dict(), getattr(resumed, model).state_dict()
        for name, value in ours.items():
            assert torch.equal(value, theirs[name]), f"{model}.{name}"
    assert [h["val_loss"] for h in resumed.history] == [h["val_loss"] for h in straight.history]


def test_an_average_that_would_never_start_is_refused_by_name():
    with pytest.raises(ValueError, match="average.start_epoch 3 leaves nothing to average: the schedule lasts 3"):
        averaging(start_epoch=3)
    with pytest.raises(ValueError, match="decay"):
        averaging(decay=1.0)


def test_the_average_is_a_run_parameter():
    assert averaging(start_epoch=2).flat()["average.kind"] == "swa"
    flat = averaging(start_epoch=1, decay=0.999).flat()
    assert (flat["average.kind"], flat["average.start_epoch"], flat["average.decay"]) == ("ema", 1, 0.999)
    assert "average.kind" not in tiny("stateful_lstm").flat()
