"""Distillation: a student trained toward its teachers' predictions (charlm.distill)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from charlm.checkpoint import CheckpointError
from charlm.config import tiny
from charlm.data import PAD_INDEX
from charlm.distill import distill_loss, load_teachers, teacher_table
from charlm.prepared import prepare_for
from charlm.training import Trainer, char_loss


@pytest.fixture(scope="module")
def teachers(small_text, tmp_path_factory):
    """Two tiny stateful LSTMs trained a few steps on the small text (two seeds): best.pt of each."""
    paths = []
    for seed in (0, 1):
        config = tiny("stateful_lstm").override({"seed": seed, "progress": False})
        out = tmp_path_factory.mktemp(f"teacher{seed}")
        trainer = Trainer(config, prepare_for(config, small_text))
        trainer.fit(max_steps=40)
        paths.append(str(trainer.save_checkpoint(out / "teacher.pt")))
    return paths


def student_config(teachers, weight=1.0):
    return tiny("stateful_lstm").override(
        {"seed": 5, "progress": False, "distill": {"teachers": teachers, "weight": weight}}
    )


def test_the_teachers_table_is_what_they_predict_however_a_column_is_cut(teachers, small_text):
    config = student_config(teachers).override({"precision": "fp32"})  # the table's forward passes: fp32
    trainer = Trainer(config, prepare_for(config, small_text))
    assert trainer.soft_targets is None  # built when training starts
    table = trainer.teacher_targets()
    rows = trainer.train_layout.rows
    assert table is not None and table.shape == (*rows.shape, len(trainer.vocab))
    assert torch.allclose(table.sum(-1), torch.ones(rows.shape), atol=1e-5)  # distributions
    # Read again in spans of 7 with the state carried, as training's bptt cuts a column: the same.
    ensemble = load_teachers(teachers, trainer.vocab, torch.device("cpu"))
    state, pieces = None, []
    with torch.no_grad():
        for start in range(0, rows.shape[1], 7):
            state = ensemble.carry_state(state, rows.shape[0], torch.device("cpu"))
            log_probs, state = ensemble(rows[:, start : start + 7].long(), state)
            pieces.append(log_probs.exp())
    assert torch.allclose(torch.cat(pieces, dim=1), table, atol=1e-5)
    # ...and their mean: one teacher alone predicts something else.
    alone = teacher_table(load_teachers(teachers[:1], trainer.vocab, torch.device("cpu")), trainer.train_layout)
    assert (alone - table).abs().max() > 1e-3


def test_the_loss_mixes_the_teachers_and_the_character_and_reports_the_plain_cross_entropy():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 11)
    targets = torch.randint(2, 11, (3, 5))
    targets[0, 0] = PAD_INDEX  # ignored, as char_loss ignores it
    log_probs = torch.log_softmax(logits, -1)
    soft = torch.softmax(torch.randn(3, 5, 11), -1)
    plain = char_loss(logits, targets)

    loss, reported = distill_loss(log_probs, targets, soft, 0.25, PAD_INDEX)
    assert torch.allclose(reported, plain)
    keep = targets != PAD_INDEX
    soft_ce = -(soft * log_probs).sum(-1)[keep].mean()
    assert torch.allclose(loss, 0.25 * soft_ce + 0.75 * plain)
    # With the characters themselves as the teachers' distribution, it is the plain loss.
    one_hot = F.one_hot(targets, 11).float()
    assert torch.allclose(distill_loss(log_probs, targets, one_hot, 1.0, PAD_INDEX)[0], plain)


def test_a_distilled_student_learns_its_teachers_distribution(teachers, small_text, tmp_path):
    """After the same steps, the student trained toward the teachers predicts more like them (lower
    cross-entropy against their table) than the same model trained on the characters alone."""
    distilled = student_config(teachers)
    plain = distilled.override({"distill": None})
    corpus = prepare_for(distilled, small_text)
    teacher = Trainer(distilled, corpus)
    table, rows = teacher.teacher_targets(), teacher.train_layout.rows

    def against_teachers(trainer: Trainer) -> float:
        trainer.module.eval()
        with torch.no_grad():
            logits, _ = trainer.module(rows.long(), trainer.module.carry_state(None, rows.shape[0], trainer.device))
        return float(-(table * torch.log_softmax(logits.float(), -1)).sum(-1).mean())

    results = {}
    for name, config in (("distilled", distilled), ("plain", plain)):
        trainer = Trainer(config, corpus, checkpoint_dir=tmp_path / name)
        result = trainer.fit(max_steps=40)
        results[name] = (against_teachers(trainer), result, trainer)
    assert results["distilled"][0] < results["plain"][0] - 0.02
    trainer = results["distilled"][2]
    assert "distilled from 2 teachers (weight 1;" in trainer.distill_note
    assert trainer.config.flat()["distill.teachers"] == ",".join(teachers)


def test_a_distilled_run_resumes_exactly(teachers, small_text, tmp_path):
    config = student_config(teachers, weight=0.5)
    corpus = prepare_for(config, small_text)
    straight = Trainer(config, corpus)
    total = len(straight.train_layout.plan(0, config.seed, True)) + 5  # past an epoch's end
    straight.fit(max_steps=total)
    first = Trainer(config, corpus)
    first.fit(max_steps=total // 2)  # mid-epoch, with a carried hidden state
    first.save_checkpoint(tmp_path / "half.pt")
    resumed = Trainer.resume(tmp_path / "half.pt", corpus)
    resumed.fit(max_steps=total)
    for (name, a), b in zip(straight.module.state_dict().items(), resumed.module.state_dict().values()):
        assert torch.equal(a, b), name
    assert [h["train_loss"] for h in resumed.history] == [h["train_loss"] for h in straight.history]


def test_teachers_on_another_vocabulary_are_refused_by_name(teachers, small_text):
    other = small_text.translate(str.maketrans("aeiou", "áéíóú"))  # another alphabet
    config = student_config(teachers)
    with pytest.raises(CheckpointError, match=f"{teachers[0]}: a teacher on another vocabulary"):
        Trainer(config, prepare_for(config, other)).fit()


def test_only_stateful_models_distil(teachers):
    with pytest.raises(ValueError, match="distill needs a stateful model"):
        tiny("char_rnn").override({"distill": {"teachers": teachers}})
