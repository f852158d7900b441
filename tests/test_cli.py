from __future__ import annotations

import json
import shutil

import pytest

from charlm.cli import main


@pytest.fixture(autouse=True)
def store(tmp_path, monkeypatch):
    """charlm train keeps its prepared data in the store ($CHARLM_HOME)."""
    monkeypatch.setenv("CHARLM_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_train_evaluate_generate_round_trip(corpus_file, tmp_path, capsys, store):
    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--arch",
                "stateful_gru",
                "--preset",
                "tiny",
                "--corpus",
                str(corpus_file),
                "--out",
                str(out),
                "--precision",  # evaluate's fp32 then reproduces training's validation exactly;
                "fp32",  # under bf16 autocast (auto, on a CPU with AMX) they differ by ~1e-4
                "--json",
                "--quiet",
            ]
        )
        == 0
    )
    summary = json.loads(capsys.readouterr().out)
    assert summary["architecture"] == "stateful_gru" and len(summary["history"]) == 3
    assert (out / "best.pt").exists() and (out / "cycle-1.pt").exists()
    assert len(list((store / "prepared").iterdir())) == 1 and len(list((store / "corpora").iterdir())) == 1

    assert main(["evaluate", "--checkpoint", str(out / "best.pt"), "--corpus", str(corpus_file)]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert abs(evaluated["val_loss"] - summary["best_val_loss"]) < 1e-9

    assert main(["generate", "--checkpoint", str(out / "best.pt"), "--prime", "the ", "-n", "50", "--seed", "7"]) == 0
    first = capsys.readouterr().out
    assert main(["generate", "--checkpoint", str(out / "best.pt"), "--prime", "the ", "-n", "50", "--seed", "7"]) == 0
    assert capsys.readouterr().out == first and first.startswith("the ")


def test_stop_and_resume_from_the_cli(corpus_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--arch",
                "seq_rnn",
                "--preset",
                "tiny",
                "--corpus",
                str(corpus_file),
                "--out",
                str(out),
                "--max-steps",
                "7",
                "--quiet",
            ]
        )
        == 0
    )
    hint = capsys.readouterr().out
    assert f"resume with: charlm train --resume {out / 'last.pt'}" in hint and f"--out {out}" in hint
    # seven steps end inside the first epoch: no validation ran, and the summary says so rather than "inf at epoch -1"
    assert "no epoch finished, so no validation loss yet" in hint and "inf" not in hint
    again = tmp_path / "again"  # the same stop, resumed with the epoch table: its first line says from where
    shutil.copytree(out, again)
    args = ["train", "--resume", str(again / "last.pt"), "--corpus", str(corpus_file), "--out", str(again)]
    assert main(args) == 0
    header = capsys.readouterr().out.splitlines()[0]
    # seven steps stopped it in the first epoch
    assert header.startswith("seq_rnn: ") and header.endswith(", 3 epochs, resuming at epoch 1"), header
    assert (
        main(
            [
                "train",
                "--resume",
                str(out / "last.pt"),
                "--corpus",
                str(corpus_file),
                "--out",
                str(out),
                "--json",
                "--quiet",
            ]
        )
        == 0
    )
    assert len(json.loads(capsys.readouterr().out)["history"]) == 3


def test_bad_input_gives_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe\x00oops")
    assert main(["train", "--preset", "tiny", "--corpus", str(bad)]) == 1  # an input that fails at run time
    assert "bad.txt: not UTF-8" in capsys.readouterr().err
    assert main(["config", "--arch", "char3", "--set", "model.hidden_size=-1"]) == 2  # a usage error
    assert capsys.readouterr().err.strip() == (
        "charlm: error: model.hidden_size: Input should be greater than or equal to 1"
    )
    assert main(["generate", "--checkpoint", str(tmp_path / "missing.pt"), "--prime", "x"]) == 1
    assert "missing.pt: no such checkpoint" in capsys.readouterr().err
    corpus = tmp_path / "small.txt"
    corpus.write_text("a small text, read twice. " * 200)
    teacher = str(tmp_path / "teacher.pt")
    args = ["train", "--arch", "stateful_lstm", "--preset", "tiny", "--corpus", str(corpus), "--teacher", teacher]
    assert main([*args, "--out", str(tmp_path / "student")]) == 1  # a teacher that is not there
    assert capsys.readouterr().err.strip() == f"charlm: error: {teacher}: no such checkpoint file"
    assert main([*args[:2], "char3", *args[3:]]) == 2  # a student that cannot read whole columns
    assert "distill needs a stateful model" in capsys.readouterr().err
