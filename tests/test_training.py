from __future__ import annotations

import math

import pytest
import torch

from charlm import prepared
from charlm.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from charlm.config import Phase, RunConfig, notebook, tiny
from charlm.job import TrainJob, run_job
from charlm.models import ARCHITECTURES, build_model
from charlm.prepared import prepare_for
from charlm.schedule import Schedule
from charlm.training import Callback, Trainer


@pytest.mark.parametrize("architecture", list(ARCHITECTURES))
def test_every_architecture_trains_and_its_loss_falls(architecture, small_text, tmp_path):
    config = tiny(architecture)
    trainer = Trainer(config, prepare_for(config, small_text), checkpoint_dir=tmp_path)
    untrained = trainer.evaluate()["val_loss"]
    result = trainer.fit()
    assert len(result.history) == config.epochs == 3
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert result.best_val_loss < 0.75 * untrained  # it learned something real about the text
    assert result.best_val_loss < math.log(len(trainer.vocab))  # better than uniform guessing
    assert {"last", "best", "cycle-0", "cycle-1"} <= set(result.checkpoints)


@pytest.mark.parametrize("architecture", list(ARCHITECTURES))
def test_forward_contract(architecture):
    config = notebook(architecture)
    model = build_model(architecture, 30, **config.model.model_dump(exclude={"architecture"}))
    batch, length = 4, config.data.context
    inputs = torch.randint(2, 30, (batch, length))
    state = model.carry_state(None, batch, torch.device("cpu"))
    logits, state = model(inputs, state)
    expected_t = 1 if model.layout == "window" else length
    assert logits.shape == (batch, expected_t, 30)
    assert (state is not None) == model.stateful
    if model.stateful:  # carried, detached, and replaced when the batch size changes
        carried = model.carry_state(state, batch, torch.device("cpu"))
        first = carried[0] if isinstance(carried, tuple) else carried
        assert not first.requires_grad
        fresh = model.carry_state(state, batch + 1, torch.device("cpu"))
        first = fresh[0] if isinstance(fresh, tuple) else fresh
        assert first.abs().sum() == 0 and batch + 1 in first.shape


def test_identity_initialisation():
    model = build_model("seq_rnn_identity", 20, embedding_dim=4, hidden_size=6, num_layers=2)
    assert torch.equal(model.rnn.weight_hh_l0, torch.eye(6))
    assert torch.equal(model.rnn.weight_hh_l1, torch.eye(6))


def _resume_config(architecture: str) -> RunConfig:
    config = tiny(architecture)
    if config.model.architecture == "stateful_lstm":  # dropout and random bptt make it the hard case
        config = config.override(  # AWD's dropouts too: embedding rows and DropConnect on the recurrence
            {"model.num_layers": 2, "model.dropout": 0.3, "model.embedding_dropout": 0.1, "model.weight_drop": 0.3}
        )
    if config.model.architecture == "stateful_gru":  # locked dropout: one RNN per layer, masks per batch
        config = config.override(
            {"model.num_layers": 2, "model.dropout": 0.3, "model.input_dropout": 0.1, "model.weight_drop": 0.3,
             "model.locked_dropout": True, "data.random_offset": True}
        )  # fmt: skip  # and the bptt cuts moved every epoch (a short first batch)
    return config


@pytest.mark.parametrize("architecture", ["stateful_lstm", "stateful_gru", "char_rnn", "seq_rnn"])
def test_resume_continues_exactly(architecture, small_text, tmp_path):
    config = _resume_config(architecture)
    corpus = prepare_for(config, small_text)
    straight = Trainer(config, corpus)
    steps_per_epoch = len(straight.train_layout.plan(0, config.seed, True))
    total = steps_per_epoch + steps_per_epoch // 2 + 3  # crosses an epoch end and a cycle end
    straight.fit(max_steps=total)

    first = Trainer(config, corpus)
    first.fit(max_steps=total // 2)  # stops mid-epoch, with a carried hidden state
    assert first.batch > 0
    first.save_checkpoint(tmp_path / "half.pt")
    del first
    resumed = Trainer.resume(tmp_path / "half.pt", corpus)
    resumed.fit(max_steps=total)

    assert resumed.step == straight.step == total
    for (name, a), b in zip(straight.module.state_dict().items(), resumed.module.state_dict().values()):
        assert torch.equal(a, b), name
    assert [h["train_loss"] for h in resumed.history] == [h["train_loss"] for h in straight.history]


def test_training_is_deterministic_given_a_seed(small_text):
    config = tiny("stateful_gru")
    corpus = prepare_for(config, small_text)
    ta, tb, c = Trainer(config, corpus), Trainer(config, corpus), Trainer(config.override({"seed": 1}), corpus)
    for trainer in (ta, tb, c):
        trainer.fit(max_steps=20)
    assert all(torch.equal(x, y) for x, y in zip(ta.module.parameters(), tb.module.parameters()))
    assert not all(torch.equal(x, y) for x, y in zip(ta.module.parameters(), c.module.parameters()))


def test_checkpoint_carries_everything_to_rebuild(small_text, tmp_path):
    config = tiny("stateful_lstm")
    trainer = Trainer(config, prepare_for(config, small_text), checkpoint_dir=tmp_path)
    trainer.fit()
    payload = load_checkpoint(tmp_path / "best.pt")  # weights_only=True inside
    assert RunConfig.model_validate(payload["config"]) == config
    assert payload["vocab"] == trainer.vocab.to_dict()
    assert payload["progress"]["epoch"] >= 1
    assert {"model", "optimizer", "rng", "history", "best"} <= set(payload)


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint({"config": {}, "vocab": {}, "model": {"w": torch.tensor([1.0])}}, path)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"config": {}, "vocab": {}, "model": {"w": torch.tensor([2.0])}}, path)
    assert load_checkpoint(path)["model"]["w"].item() == 1.0
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary file left behind


def test_bad_checkpoints_are_named(tmp_path):
    with pytest.raises(CheckpointError, match="nope.pt: no such checkpoint"):
        load_checkpoint(tmp_path / "nope.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a zip")
    with pytest.raises(CheckpointError, match="junk.pt: cannot read checkpoint"):
        load_checkpoint(junk)
    torch.save({"weights": torch.zeros(1)}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="foreign.pt: not a charlm checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")


# ----------------------------------------------------------------------------- schedules and hooks


def test_step_down_schedule():
    schedule = Schedule((Phase.constant(1e-3, 6), Phase.constant(1e-4, 3)))
    assert schedule.total_epochs == 9
    assert schedule.lr(0.0) == schedule.lr(5.99) == 1e-3
    assert schedule.lr(6.0) == schedule.lr(8.5) == 1e-4


def test_sgdr_schedule_cycles_double_and_restart():
    schedule = Schedule((Phase.constant(1e-2, 2), Phase.sgdr(1e-2, cycles=4, cycle_mult=2)))
    assert schedule.total_epochs == 2 + 1 + 2 + 4 + 8
    assert schedule.lr(2.0) == pytest.approx(1e-2)  # cycle 0 starts at the top
    assert schedule.lr(2.5) == pytest.approx(5e-3)  # half way down a one-epoch cycle
    assert schedule.lr(3.0) == pytest.approx(1e-2)  # warm restart
    assert schedule.lr(4.0) == pytest.approx(5e-3)  # middle of the two-epoch cycle
    assert schedule.lr(16.999) < 1e-6
    ends = {e: schedule.cycle_ending_at(e) for e in range(17) if schedule.cycle_ending_at(e) is not None}
    assert ends == {2: 0, 4: 1, 8: 2, 16: 3}


def test_invalid_schedules_are_rejected():
    with pytest.raises(ValueError, match="last 7 epochs, not 5"):
        Phase(kind="sgdr", lr=1e-2, cycles=3, epochs=5)
    with pytest.raises(ValueError, match="needs epochs"):
        Phase(kind="constant", lr=1e-2)


def test_cycle_end_hook_and_per_step_hook(small_text, tmp_path):
    calls: dict[str, list] = {"cycles": [], "steps": [], "checkpoints": []}

    class Recorder(Callback):
        def on_step_end(self, trainer, step, loss, lr):
            calls["steps"].append((step, lr))

        def on_cycle_end(self, trainer, cycle, metrics):
            calls["cycles"].append((cycle, metrics["epoch"]))

        def on_checkpoint(self, trainer, kind, path, metrics):
            calls["checkpoints"].append(kind)

    config = tiny("stateful_gru")
    Trainer(config, prepare_for(config, small_text), callbacks=[Recorder()], checkpoint_dir=tmp_path).fit()
    assert calls["cycles"] == [(0, 2), (1, 3)]
    assert all(step % config.log_every == 0 for step, _ in calls["steps"])
    lrs = [lr for _, lr in calls["steps"]]
    assert max(lrs) == pytest.approx(1e-2) and min(lrs) < 2e-3  # cosine annealing within the cycles
    assert calls["checkpoints"].count("last") == 3 and "cycle-1" in calls["checkpoints"]


def test_config_validation_names_the_problem():
    with pytest.raises(ValueError, match="unknown architecture 'gpt'"):
        tiny("gpt")
    with pytest.raises(ValueError, match="char3 reads exactly 3 characters"):
        tiny("char3").override({"data.context": 8})
    with pytest.raises(ValueError, match="num_layers must be 1"):
        tiny("char_loop").override({"model.num_layers": 2})
    with pytest.raises(ValueError, match="extra_forbidden|Extra inputs"):
        RunConfig.model_validate({**tiny("char3").model_dump(), "epochz": 3})
    with pytest.raises(ValueError, match="no such config field 'hiden'"):
        tiny("char3").override(["model.hiden=3"])
    assert tiny("stateful_lstm").override(["model.hidden_size=64"]).model.hidden_size == 64


def test_notebook_presets_match_the_notebook():
    lstm = notebook("stateful_lstm")
    assert (lstm.model.hidden_size, lstm.model.num_layers, lstm.model.dropout) == (512, 2, 0.5)
    assert lstm.model.output_dropout == 0.0  # nn.LSTM's dropout acts between its layers; none before l_out
    assert lstm.epochs == 2 + 15 and lstm.optim.weight_decay == 1e-5
    gru = notebook("stateful_gru")
    assert (gru.model.embedding_dim, gru.model.hidden_size, gru.data.batch_size, gru.data.context) == (42, 256, 64, 8)
    assert [(p.lr, p.epochs) for p in gru.schedule] == [(1e-3, 6), (1e-4, 3)]


def test_a_long_epoch_is_checkpointed_every_few_minutes(small_text, tmp_path):
    """checkpoint_minutes: last.pt is written mid-epoch once that much training time has passed
    (here a few milliseconds, so every log_every steps), not only at the epoch's end."""
    config = tiny("stateful_gru").override({"checkpoint_minutes": 1e-9, "log_every": 5})
    written = []

    class Recorder(Callback):
        def on_checkpoint(self, trainer, kind, path, metrics):
            written.append((kind, trainer.step, trainer.batch))

    trainer = Trainer(config, prepare_for(config, small_text), callbacks=[Recorder()], checkpoint_dir=tmp_path)
    trainer.fit()
    mid_epoch = [w for w in written if w[0] == "last" and w[2] > 0]
    assert len(mid_epoch) >= 3 and all(step % 5 == 0 for _, step, _ in mid_epoch)  # at log_every steps
    quiet = tiny("stateful_gru").override({"checkpoint_minutes": None})
    written.clear()
    Trainer(quiet, prepare_for(quiet, small_text), callbacks=[Recorder()], checkpoint_dir=tmp_path / "q").fit()
    assert [w for w in written if w[0] == "last" and w[2] > 0] == []  # off: epoch ends only


def test_the_epoch_lines_name_the_job_so_two_seeds_can_be_told_apart(corpus_file, tmp_path, caplog):
    """``--seeds 2`` runs two jobs of one architecture side by side: each epoch line starts with the
    job's name (its seed), not the architecture both share."""
    config = tiny("stateful_gru").override({"seed": 1})
    data = prepared.prepare(str(corpus_file), config, tmp_path / "store")
    with caplog.at_level("INFO", logger="charlm.progress"):
        run_job(TrainJob(config=config, data=data, log_epochs=True, label="stateful_gru-seed1"))
    lines = [r.getMessage() for r in caplog.records if r.name == "charlm.progress"]
    assert len(lines) == 1 + config.epochs, lines  # the opening line and one an epoch
    assert all(line.startswith("stateful_gru-seed1: ") for line in lines), lines
    assert lines[-1].startswith(f"stateful_gru-seed1: epoch {config.epochs}/{config.epochs} ")
    caplog.clear()
    with caplog.at_level("INFO", logger="charlm.progress"):
        run_job(TrainJob(config=config, data=data, log_epochs=True))  # no label: the architecture
    unlabelled = [r.getMessage() for r in caplog.records if r.name == "charlm.progress"]
    assert len(unlabelled) == 1 + config.epochs, unlabelled
    assert all(line.startswith("stateful_gru: ") for line in unlabelled), unlabelled
