"""The comparison ranks like with like: losses of two tasks are never ranked against each other."""

from __future__ import annotations

from charlm import compare
from charlm.job import TrainResult

LOWER, CASED = "lowercased, min_freq 3, last 20% validation", "case-sensitive, min_freq 1, last 20% validation"


def result(arch: str, loss: float, task: str, vocab: int) -> TrainResult:
    history = [{"val_loss": loss + 0.5, "chars_per_sec": 1000.0}, {"val_loss": loss, "chars_per_sec": 3000.0}]
    return TrainResult(
        architecture=arch,
        history=history,
        best_val_loss=loss,
        best_epoch=2,
        steps=10,
        parameters=1000,
        wall_time_s=12.345678,
        task=task,
        vocab_size=vocab,
        valid_chars=120_179,
    )


RESULTS = [result("char3", 1.10, CASED, 84), result("gru", 1.37, LOWER, 58), result("lstm", 1.25, LOWER, 58)]


def test_the_primary_task_is_the_champions_or_the_one_most_share():
    assert compare.primary_task(RESULTS) == LOWER  # not char3's lower loss on another vocabulary
    assert compare.primary_task(RESULTS, champion_task=CASED) == CASED
    assert compare.primary_task(RESULTS, champion_task="a task nobody trained on") == LOWER


def test_the_table_ranks_within_each_task_primary_first():
    table = compare.comparison_table(RESULTS)
    assert list(zip(table["architecture"], table["rank"], table["task"])) == [
        ("lstm", 1, LOWER),
        ("gru", 2, LOWER),
        ("char3", 1, CASED),  # ranked among its own task only
    ]
    assert list(table["vocab_size"]) == [58, 58, 84] and set(table["valid_chars"]) == {120_179}
    assert compare.rounded(table)["wall_time_s"].tolist() == [12.3, 12.3, 12.3]
    assert table["best_val_loss"].tolist() == [1.25, 1.37, 1.10]  # full precision kept for metrics


def test_the_description_has_one_table_per_task():
    text = compare.markdown(compare.comparison_table(RESULTS))
    assert text.index(f"*{LOWER}* — vocabulary 58, 120,179 validation characters") < text.index(f"*{CASED}*")
    assert "| 1 | lstm | best checkpoint | 1.25 |" in text and "| 2 | gru | best checkpoint | 1.37 |" in text
    assert "| 1 | char3 | best checkpoint | 1.1 |" in text


def test_ensembles_and_averages_get_rows_of_their_own():
    lstm = RESULTS[2].model_copy(
        update={
            "candidates": [
                {
                    "kind": "ensemble",
                    "members": ["a", "b"],
                    "label": "ensemble of the last 2 snapshots",
                    "val_loss": 1.20,
                    "val_bpc": 1.73,
                    "gen_chars_per_sec": 500.0,
                },
                {
                    "kind": "weight_average",
                    "members": ["a", "b"],
                    "label": "weight average of the last 2 snapshots",
                    "val_loss": 1.30,
                    "val_bpc": 1.88,
                    "gen_chars_per_sec": 1000.0,
                },
            ]
        }
    )
    table = compare.comparison_table([RESULTS[0], RESULTS[1], lstm])
    lower = table[table["task"] == LOWER]
    assert list(zip(lower["architecture"], lower["candidate"], lower["rank"])) == [
        ("lstm", "ensemble of the last 2 snapshots", 1),
        ("lstm", "best checkpoint", 2),
        ("lstm", "weight average of the last 2 snapshots", 3),
        ("gru", "best checkpoint", 4),
    ]
    assert list(lower["parameters"]) == [2000, 1000, 1000, 1000]  # an ensemble holds both members


def test_seeds_and_their_ensemble_get_rows_of_their_own():
    seeds = [
        RESULTS[2].model_copy(update={"name": f"lstm-seed{i}", "seed": i, "best_val_loss": loss, "run_id": f"r{i}"})
        for i, loss in ((0, 1.25), (1, 1.27))
    ]
    ensemble = {
        "kind": "seed_ensemble",
        "label": "ensemble of 2 seeds' best",
        "members": ["r0/best.pt", "r1/best.pt"],
        "architecture": "lstm",
        "task": LOWER,
        "val_loss": 1.23,
        "val_bpc": 1.77,
        "parameters": 2000,
        "epochs": 2,
        "vocab_size": 58,
        "valid_chars": 120_179,
        "gen_chars_per_sec": 400.0,
        "wall_time_s": 24.7,
        "run_id": "parent",
    }
    gru = RESULTS[1].model_copy(update={"run_id": "g"})
    table = compare.comparison_table([gru, *seeds], seed_ensembles=[ensemble])
    assert list(zip(table["candidate"], table["rank"], table["run_id"])) == [
        ("ensemble of 2 seeds' best", 1, "parent"),
        ("best checkpoint, seed 0", 2, "r0"),
        ("best checkpoint, seed 1", 3, "r1"),
        ("best checkpoint", 4, "g"),
    ]
    assert table["parameters"].tolist()[0] == 2000 and table["target_reached"].tolist()[0] == ""
    text = compare.markdown(table)
    assert (
        "| 1 | lstm | ensemble of 2 seeds' best | 1.23 | 1.77 | 2,000 | 2 | — |" in text
    )  # no training speed of its own


def test_the_plot_is_written(tmp_path):
    path = compare.plot_validation_curves(RESULTS, tmp_path / "curves.png", "s3://corpora/x.txt, preset tiny")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_best_checkpoint_that_is_a_weight_average_says_so():
    lstm = RESULTS[2]
    averaged = lstm.model_copy(update={"history": [lstm.history[0], {**lstm.history[1], "val_loss_raw": 1.26}]})
    before = lstm.model_copy(
        update={"history": [*lstm.history, {"val_loss": 1.3, "val_loss_raw": 1.31, "chars_per_sec": 3000.0}]}
    )
    assert compare.rows_of(averaged)[0]["candidate"] == "best checkpoint (weight average)"
    assert compare.rows_of(before)[0]["candidate"] == "best checkpoint"  # its best came before the average began
