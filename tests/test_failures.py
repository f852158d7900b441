"""Failures as a user meets them: one line, the last, naming the input; nothing lost.

The command-line cases run ``charlm`` in a fresh process, as a user would, and assert the
exit code, the last line on screen and that no traceback was printed."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from charlm import prepared
from charlm.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from charlm.config import tiny
from charlm.job import CheckpointDirError, TrainJob, run_job
from tests.conftest import generated_text

ROOT = Path(__file__).resolve().parents[1]


def charlm(*argv: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> tuple[int, str]:
    """Run ``charlm ARGV`` in a fresh process: (exit code, everything it printed)."""
    environ = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    done = subprocess.run(
        [sys.executable, "-m", "charlm.cli", *argv], capture_output=True, text=True, env=environ, cwd=cwd, timeout=300
    )
    return done.returncode, done.stdout + done.stderr


def assert_one_line(output: str, *fragments: str) -> None:
    last = output.strip().splitlines()[-1]
    assert "Traceback" not in output, output[-3000:]
    assert "error:" in last and all(f in last for f in fragments), output[-3000:]
    assert "weights_only=False" not in output  # never advise loading untrusted pickles


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    """A corpus and a tiny trained run, shared by the cases below."""
    work = tmp_path_factory.mktemp("failures")
    corpus = work / "corpus.txt"
    corpus.write_text(generated_text(800, seed=5), encoding="utf-8")
    config = tiny("seq_rnn")
    job = TrainJob(
        config=config, data=prepared.prepare(str(corpus), config, work / "store"), checkpoint_dir=str(work / "run")
    )
    run_job(job)
    return {"work": work, "corpus": corpus, "run": work / "run", "store": work / "store"}


def damaged_copies(trained: dict[str, Path]) -> dict[str, Path]:
    good = load_checkpoint(trained["run"] / "best.pt")
    out = trained["work"] / "damaged"
    out.mkdir(exist_ok=True)
    wrong_weights = {**good, "model": {"embedding.weight": torch.zeros(3, 3)}}
    save_checkpoint({k: v for k, v in wrong_weights.items() if k not in ("format", "version")}, out / "wrong.pt")
    no_vocab = {k: v for k, v in good.items() if k not in ("format", "version", "vocab")}
    save_checkpoint(no_vocab, out / "novocab.pt")
    with open(out / "pickled.pt", "wb") as handle:  # a pickle of an arbitrary object, as torch.save would write
        pickle.dump({"format": "charlm-checkpoint", "object": Path("x")}, handle)
    torch.save({"format": "charlm-checkpoint", "version": 1, "thing": Path("x")}, out / "object.pt")
    return {p.stem: p for p in out.iterdir()}


@pytest.mark.parametrize(
    ("case", "code", "fragments"),
    [
        ("device", 1, ["device 'cuda' requested but CUDA is not available"]),
        ("temperature-nan", 2, ["--temperature", "must be a finite number"]),
        ("temperature-inf", 2, ["--temperature", "must be a finite number"]),
        ("max-steps", 2, ["--max-steps", "must be at least 1"]),
        ("context", 2, ["--context", "must be at least 1"]),
        ("batch-size", 2, ["--batch-size", "must be at least 1"]),
        ("memory", 1, ["out of memory", "model.hidden_size=2000000"]),
        ("wrong-weights", 1, ["wrong.pt", "do not make a charlm model"]),
        ("no-vocab", 1, ["novocab.pt", "no vocab"]),
        ("pickled-object", 1, ["object.pt", "objects other than tensors"]),
        ("resume-conflict", 2, ["--resume continues", "drop --arch, --seed"]),
        ("out-is-a-file", 1, ["is a file, not a checkpoint directory"]),
        ("another-run", 1, ["holds the checkpoints of another run (seq_rnn", "--overwrite"]),
        ("missing-alias", 1, ["models:/charlm@nope: Registered Model with name=charlm not found"]),
        ("unreachable-mlflow", 1, ["MLflow:", "http://127.0.0.1:9", "unreachable"]),
        ("set-unknown-key", 2, ["no such config field 'nope'"]),
    ],
)
def test_a_user_error_ends_in_one_line(trained, case, code, fragments, tmp_path):
    corpus, run = str(trained["corpus"]), trained["run"]
    damaged = damaged_copies(trained)
    store = {"CHARLM_HOME": str(trained["store"])}
    tiny_train = ["train", "--preset", "tiny", "--corpus", corpus, "--out", str(tmp_path / "out")]
    generate = ["generate", "--prime", "the ", "-n", "5"]
    argv, env = {
        "device": ([*tiny_train, "--device", "cuda"], store),
        "temperature-nan": ([*generate, "--checkpoint", str(run / "best.pt"), "--temperature", "nan"], {}),
        "temperature-inf": ([*generate, "--checkpoint", str(run / "best.pt"), "--temperature", "inf"], {}),
        "max-steps": ([*tiny_train, "--max-steps", "-5"], store),
        "context": (["evaluate", "--checkpoint", str(run / "best.pt"), "--corpus", corpus, "--context", "0"], {}),
        "batch-size": (["evaluate", "--checkpoint", str(run / "best.pt"), "--corpus", corpus, "--batch-size", "0"], {}),
        "memory": ([*tiny_train, "--arch", "stateful_gru", "--set", "model.hidden_size=2000000"], store),
        "wrong-weights": ([*generate, "--checkpoint", str(damaged["wrong"])], {}),
        "no-vocab": ([*generate, "--checkpoint", str(damaged["novocab"])], {}),
        "pickled-object": ([*generate, "--checkpoint", str(damaged["object"])], {}),
        "resume-conflict": (
            ["train", "--resume", str(run / "last.pt"), "--corpus", corpus, "--arch", "char3", "--seed", "3"],
            store,
        ),
        "out-is-a-file": (["train", "--preset", "tiny", "--corpus", corpus, "--out", corpus], store),
        "another-run": (
            ["train", "--preset", "tiny", "--arch", "char3", "--corpus", corpus, "--out", str(run)],
            store,
        ),
        "missing-alias": (
            [*generate, "--model", "models:/charlm@nope"],
            {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"},
        ),
        "unreachable-mlflow": (
            [*generate, "--model", "models:/charlm@champion"],
            {"MLFLOW_TRACKING_URI": "http://127.0.0.1:9"},
        ),
        "set-unknown-key": ([*tiny_train, "--set", "model.nope=3"], store),
    }[case]
    returncode, output = charlm(*argv, env=env, cwd=tmp_path)
    assert returncode == code, output[-3000:]
    assert_one_line(output, *fragments)


def test_another_runs_checkpoints_are_never_replaced_without_asking(trained, tmp_path):
    before = {p.name: p.read_bytes() for p in trained["run"].glob("*.pt")}
    config = tiny("char3")
    data = prepared.prepare(str(trained["corpus"]), config, trained["store"])
    with pytest.raises(CheckpointDirError, match="holds the checkpoints of another run"):
        run_job(TrainJob(config=config, data=data, checkpoint_dir=str(trained["run"])))
    assert {p.name: p.read_bytes() for p in trained["run"].glob("*.pt")} == before  # nothing touched
    copy = tmp_path / "copy"
    copy.mkdir()
    for name, raw in before.items():
        (copy / name).write_bytes(raw)
    replaced = run_job(TrainJob(config=config, data=data, checkpoint_dir=str(copy), overwrite=True))
    assert replaced.architecture == "char3"
    # The same run again: resumed from its last.pt, not refused and not restarted.
    same = tiny("seq_rnn")
    again = run_job(
        TrainJob(
            config=same,
            data=prepared.prepare(str(trained["corpus"]), same, trained["store"]),
            checkpoint_dir=str(trained["run"]),
        )
    )
    assert again.steps == load_checkpoint(trained["run"] / "last.pt")["progress"]["step"]


@pytest.mark.parametrize("fault", ["best", "cycle-0"])
def test_a_kill_between_checkpoint_writes_loses_no_snapshot(trained, tmp_path, monkeypatch, fault):
    """Killed right after ``best.pt`` or ``cycle-0.pt`` of an epoch was written, before that epoch's
    ``last.pt``: the resumed run trains that epoch again and ends with every checkpoint it reports."""
    config = tiny("stateful_gru")
    data = prepared.prepare(str(trained["corpus"]), config, trained["store"])
    whole = run_job(TrainJob(config=config, data=data, checkpoint_dir=str(tmp_path / "whole")))
    out = tmp_path / "killed"
    monkeypatch.setenv("CHARLM_FAULT_INJECT", f"rank=0,checkpoint={fault},mode=raise")
    with pytest.raises(RuntimeError, match=f"after writing {fault}.pt"):
        run_job(TrainJob(config=config, data=data, checkpoint_dir=str(out)))
    monkeypatch.delenv("CHARLM_FAULT_INJECT")
    resumed = run_job(TrainJob(config=config, data=data, checkpoint_dir=str(out), resume="last"))
    assert resumed.best_val_loss == whole.best_val_loss and resumed.best_epoch == whole.best_epoch
    best = load_checkpoint(out / "best.pt")
    assert best["best"] == {"val_loss": resumed.best_val_loss, "epoch": resumed.best_epoch}
    assert {p.name for p in out.glob("cycle-*.pt")} == {"cycle-0.pt", "cycle-1.pt"}
    for cycle in (0, 1):
        assert load_checkpoint(out / f"cycle-{cycle}.pt")["progress"]["epoch"] == cycle + 2


def test_leftover_partial_writes_are_removed_on_the_next_start(trained, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / ".last.pt.x1y2.tmp").write_bytes(b"half a checkpoint")
    config = tiny("char3")
    run_job(
        TrainJob(
            config=config,
            data=prepared.prepare(str(trained["corpus"]), config, trained["store"]),
            checkpoint_dir=str(out),
        )
    )
    assert not list(out.glob("*.tmp"))


def test_a_flipped_byte_in_the_weights_is_refused_by_name(trained, tmp_path):
    path = tmp_path / "flipped.pt"
    raw = bytearray((trained["run"] / "best.pt").read_bytes())
    weights = load_checkpoint(trained["run"] / "best.pt")["model"]
    needle = next(t for t in weights.values() if t.numel() >= 64).numpy().tobytes()[:32]
    at = raw.find(needle)
    assert at > 0  # the weights are stored raw inside the archive
    raw[at + 16] ^= 0x01
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="flipped.pt: the weights do not match their checksum"):
        load_checkpoint(path)


def test_generation_streams_and_a_stop_keeps_what_was_written(trained):
    from charlm.generate import LoadedModel

    model = LoadedModel.from_checkpoint(trained["run"] / "best.pt")
    whole = model.generate("the ", 40, seed=3)
    stream = model.stream("the ", 40, seed=3)
    first = "".join(next(stream) for _ in range(10))
    assert first == whole[:10]  # characters come one by one, the same as the whole text
    with pytest.raises(ValueError, match="temperature must be a finite number"):
        model.stream("the ", 5, temperature=float("nan"))  # refused before the first character


@pytest.mark.parametrize(
    ("argv", "fragments"),
    [
        (["--corpus-uri", "s3:/x"], ["corpus_uri: s3:/x: expected s3://bucket/key"]),
        (["--corpus-uri", "missing.txt"], ["corpus_uri: missing.txt: no such corpus file"]),
        (["--quick", "--arch", "no_such_arch"], ["--quick sets the architectures and the preset"]),
        (["--arch", "no_such_arch"], ["architectures: unknown ['no_such_arch']"]),
        (["--concurrency", "0"], ["concurrency: Input should be greater than or equal to 1"]),
        (["--set", "model.nope=1"], ["no such config field 'nope'"]),
    ],
)
def test_a_bad_pipeline_command_fails_in_one_line_before_prefect_starts(argv, fragments, tmp_path):
    environ = {**os.environ, "PYTHONPATH": str(ROOT), "PREFECT_HOME": str(tmp_path / "prefect")}
    done = subprocess.run(
        [sys.executable, "-m", "flows.pipeline", *argv], capture_output=True, text=True, env=environ, cwd=tmp_path
    )
    assert done.returncode == 2, done.stderr[-3000:]
    assert_one_line(done.stdout + done.stderr, *fragments)
    assert "Starting temporary server" not in done.stdout + done.stderr  # refused before Prefect started


def test_an_unreachable_tracking_server_stops_the_pipeline_before_prefect_starts(tmp_path):
    environ = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": "http://127.0.0.1:9"}
    environ["PREFECT_HOME"] = str(tmp_path / "prefect")
    done = subprocess.run(
        [sys.executable, "-m", "flows.pipeline", "--quick", "--corpus-uri", "s3://bucket/key.txt"],
        capture_output=True,
        text=True,
        env=environ,
        cwd=tmp_path,
    )
    assert done.returncode == 1
    assert_one_line(done.stdout + done.stderr, "MLflow tracking server http://127.0.0.1:9 is unreachable")
    assert "Starting temporary server" not in done.stdout + done.stderr


def test_ctrl_c_during_generation_keeps_what_was_written(trained):
    import signal

    environ = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "charlm.cli", "generate", "--checkpoint", str(trained["run"] / "best.pt")]
    command += ["--prime", "the ", "-n", "10000000", "--seed", "1"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=environ)
    first = proc.stdout.read(200)  # streamed: text arrives long before ten million characters
    proc.send_signal(signal.SIGINT)
    rest, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and first.startswith(b"the ")
    assert err.decode().strip().splitlines()[-1] == "charlm: interrupted" and b"Traceback" not in err
    assert len(first + rest) > 200  # what was generated is kept, up to the stop
