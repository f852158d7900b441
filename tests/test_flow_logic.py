"""The flow's logic without a Prefect server: parameters, the derived command line, the
training queue, the summary, and the tasks' bodies (``task.fn()``)."""

from __future__ import annotations

import math
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

import pytest
from pydantic import ValidationError

from charlm.distributed import DistributedConfig
from charlm.prepared import PrepSettings
from charlm.storage import CorpusFetchError
from flows.cli import build_parser, parse
from flows.params import QUICK_ARCHITECTURES, PipelineParams, RunnerOptions
from flows.report import format_summary
from flows.runners import run_queued
from tests.conftest import generated_text

# --------------------------------------------------------------------------- parameters


def test_parameters_build_one_validated_config_per_architecture():
    params = PipelineParams(
        architectures=["char3", "stateful_lstm"],
        preset_name="tiny",
        overrides={"*": {"data.batch_size": 8}, "stateful_lstm": {"model.hidden_size": 24}},
    )
    char3, lstm = params.run_configs()
    assert (char3.data.batch_size, lstm.data.batch_size) == (8, 8)
    assert (char3.model.hidden_size, lstm.model.hidden_size) == (32, 24)
    assert not char3.progress  # no progress bars inside tasks


def test_seeds_make_one_task_per_architecture_and_seed_each_with_its_own_name():
    params = PipelineParams(
        architectures=["char3", "stateful_gru"], preset_name="tiny", seeds=2, overrides={"stateful_gru": {"seed": 7}}
    )
    configs = params.run_configs()
    assert [(c.architecture, c.seed) for c in configs] == [
        ("char3", 0),
        ("char3", 1),
        ("stateful_gru", 7),  # from the architecture's own seed on
        ("stateful_gru", 8),
    ]
    assert [params.job_name(c) for c in configs] == [
        "char3-seed0",
        "char3-seed1",
        "stateful_gru-seed7",
        "stateful_gru-seed8",
    ]
    assert PipelineParams(preset_name="tiny").job_name(configs[0]) is None  # one seed: the architecture's name
    cpu = PipelineParams(architectures=["char3"], seeds=4, distributed=DistributedConfig(nproc_per_node=2))
    assert cpu.cpu_plan(cores=4)[:1] == (2,)  # four tasks of two ranks on four cores: two at a time


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"architectures": ["char3", "no_such_arch"]}, "unknown \\['no_such_arch'\\]"),
        ({"architectures": []}, "at least 1 item"),
        ({"overrides": {"stateful_gru": {"seed": 1}}, "architectures": ["char3"]}, "not requested"),
        ({"overrides": ["model.no_such_field=3"]}, "no such config field 'no_such_field'"),
        ({"concurrency": 0}, "greater than or equal to 1"),
        ({"seeds": 0}, "greater than or equal to 1"),
        ({"distributed": {"nnodes": 2}}, "fixed host:port"),
        ({"distill": True, "architectures": ["stateful_gru"]}, "give --seeds 2 or more"),
        ({"distill": True, "seeds": 2, "architectures": ["char3", "stateful_gru"]}, "stateful .* only, not char3"),
        ({"distill": True, "seeds": 2, "architectures": ["stateful_gru"], "distill_weight": 0}, "greater than 0"),
    ],
)
def test_bad_parameters_are_refused_before_any_work(fields, message):
    with pytest.raises(ValidationError, match=message):
        PipelineParams(**fields)


def test_a_multinode_job_is_named_after_the_flow_run():
    params = PipelineParams(distributed=DistributedConfig(nnodes=2, rdzv_endpoint="node0:29400"))
    assert params.distribution("0123456789abcdef").rdzv_id == "charlm-01234567"
    assert PipelineParams().distribution("x") is None


def test_ddp_on_a_cpu_host_never_oversubscribes_it():
    params = PipelineParams(
        architectures=["char3", "stateful_gru", "stateful_lstm"],
        concurrency=2,
        distributed=DistributedConfig(nproc_per_node=2),
    )
    concurrency, dist, note = params.cpu_plan(cores=2)  # 2 tasks × 2 ranks on 2 cores: one task at a time
    assert (concurrency, dist.threads_per_rank) == (1, 1) and "would oversubscribe 2 cores" in note
    concurrency, dist, note = params.cpu_plan(cores=16)  # room for both: 4 threads per rank
    assert (concurrency, dist.threads_per_rank, note) == (2, 4, None)
    given = params.model_copy(update={"distributed": DistributedConfig(nproc_per_node=2, threads_per_rank=3)})
    assert given.cpu_plan(cores=16)[1].threads_per_rank == 3  # an explicit setting stands
    assert PipelineParams().cpu_plan(cores=2) == (2, None, None)  # in-process training: untouched
    seeds = PipelineParams(architectures=["stateful_lstm"], seeds=2, distributed=DistributedConfig(nproc_per_node=1))
    assert seeds.cpu_plan(cores=2)[1].threads_per_rank == 1  # two seeds side by side: a core each
    assert seeds.cpu_plan(cores=2, tasks=1)[1].threads_per_rank == 2  # their one student: both cores


# --------------------------------------------------------------------------- command line


def test_every_parameter_has_an_option_derived_from_its_field():
    dests = {action.dest for action in build_parser()._actions}
    assert set(PipelineParams.model_fields) | set(RunnerOptions.model_fields) <= dests
    assert set(DistributedConfig.model_fields) <= dests


def test_the_command_line_builds_the_parameters(monkeypatch):
    monkeypatch.setenv("CHARLM_CORPUS_URI", "s3://bucket/from-env.txt")
    monkeypatch.setenv("CHARLM_MAX_RESTARTS", "2")
    params, runner = parse(
        ["--quick", "--set", "data.batch_size=8", "--no-promote", "--margin", "0.01", "--ddp", "--nproc-per-node", "2"]
    )
    assert params.corpus_uri == "s3://bucket/from-env.txt"
    assert (params.architectures, params.preset_name) == (QUICK_ARCHITECTURES, "tiny")
    assert params.overrides == {"*": {"data.batch_size": 8}}
    assert (params.promote_best, params.promotion_margin) == (False, 0.01)
    assert params.distributed == DistributedConfig(nproc_per_node=2, max_restarts=2)
    assert runner.task_runner == "thread"
    explicit, _ = parse(["--corpus-uri", "s3://b/x.txt", "--arch", "char3", "--max-restarts", "0"])
    assert explicit.corpus_uri == "s3://b/x.txt" and explicit.architectures == ["char3"]
    assert explicit.distributed == DistributedConfig(max_restarts=0)  # a DDP flag alone turns DDP on


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--quick", "--arch", "char3"], "--quick sets the architectures and the preset: drop --arch"),
        (["--arch", "no_such_arch"], "error: architectures: unknown ['no_such_arch']; known: char3"),
        (["--concurrency", "0"], "concurrency: Input should be greater than or equal to 1"),
        (["--set", "schedule"], "expected key=value"),
        (["--nnodes", "2"], "fixed host:port"),
        (["--corpus-uri", "s3:/x"], "corpus_uri: s3:/x: expected s3://bucket/key"),
        (["--corpus-uri", "no/such/corpus.txt"], "corpus_uri: no/such/corpus.txt: no such corpus file"),
        (["--corpus-uri", "ftp://host/x"], "unsupported scheme 'ftp'"),
    ],
)
def test_bad_command_lines_fail_with_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        parse(argv)
    assert exit_.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("python -m flows.pipeline: error: ") and message in last


# --------------------------------------------------------------------------- queue


def test_the_queue_runs_at_most_concurrency_tasks_and_collects_failures():
    submitted, running_when_waiting = [], []

    def work(index: int) -> int:
        if index == 3:
            raise ValueError("architecture 3 broke")
        return index * 10

    def first_done(futures):
        running_when_waiting.append(len(futures))
        done, _ = wait(futures, return_when=FIRST_COMPLETED)
        return next(iter(done))

    with ThreadPoolExecutor(max_workers=5) as pool:

        def submit(index: int, item: str):
            submitted.append(item)
            return pool.submit(work, index)

        results, failures = run_queued(["a", "b", "c", "d", "e"], submit, 2, wait=first_done)
    assert submitted == ["a", "b", "c", "d", "e"]  # in order
    assert running_when_waiting == [2, 2, 2, 2, 1]  # never more than two at once, refilled as each ends
    assert sorted(results) == [0, 10, 20, 40]
    assert failures == ["ValueError: architecture 3 broke"]  # a failure never stops the others


# --------------------------------------------------------------------------- summary


def test_the_summary_names_the_best_where_to_look_and_the_decision():
    lower, cased = "lowercased, min_freq 3, last 20% validation", "case-sensitive, min_freq 1, last 20% validation"
    common = {"parameters": 150_000, "epochs": 9, "chars_per_sec": 30_000.4, "valid_chars": 120_179}
    gru = {"rank": 1, "architecture": "stateful_gru", "best_val_loss": 1.3712, "best_val_bpc": 1.978, **common}
    gru |= {"candidate": "best checkpoint", "gen_chars_per_sec": 800.2}
    char3 = {"rank": 1, "architecture": "char3", "best_val_loss": 1.1, "best_val_bpc": 1.6, **common}
    summary = {
        "tracking_uri": "sqlite:///mlflow.db",
        "table": [gru | {"task": lower, "vocab_size": 58}, char3 | {"task": cased, "vocab_size": 84}],
        "best": gru | {"task": lower},
        "experiment_id": "1",
        "parent_run_id": "abc",
        "output_dir": ".charlm/runs/x",
        "promotion": {"model_name": "charlm", "version": "3", "promoted": False, "reason": "1.37 does not beat"},
    }
    text = format_summary(summary)
    assert f"task: {lower} (vocabulary 58, 120,179 validation chars)" in text
    assert f"task: {cased} (vocabulary 84, 120,179 validation chars)" in text  # ranked apart, not below
    gru_line = next(line for line in text.splitlines() if line.startswith("   1 stateful_gru"))
    expected = "1 stateful_gru best checkpoint 1.3712 1.9780 150,000 9 30,000 800"
    assert gru_line.split() == expected.split()
    assert f"best: stateful_gru (best checkpoint) with validation loss 1.3712 nats/char ({lower})" in text
    assert (
        "MLflow runs: mlflow ui --backend-store-uri sqlite:///mlflow.db   then open "
        "http://127.0.0.1:5000/#/experiments/1/runs?workflowType=machine_learning"
    ) in text
    assert "registry: charlm v3 stays challenger (1.37 does not beat)" in text
    summary["tracking_uri"] = "http://mlflow:5000"
    assert "MLflow runs: http://mlflow:5000/#/experiments/1/runs?workflowType=machine_learning" in format_summary(
        summary
    )


def test_the_summary_keeps_its_columns_with_seeds_and_their_ensemble():
    task = "lowercased, min_freq 3, last 20% validation"
    common = {"architecture": "stateful_gru", "task": task, "vocab_size": 58, "valid_chars": 120_179, "epochs": 3}
    common |= {"parameters": 6_410, "best_val_bpc": 2.6, "gen_chars_per_sec": 900.0}
    rows = [
        common
        | {"rank": 1, "candidate": "ensemble of 2 seeds' best", "best_val_loss": 1.7674, "chars_per_sec": math.nan},
        common | {"rank": 2, "candidate": "weight average of the last 2 snapshots, seed 1", "best_val_loss": 1.8282},
    ]
    rows[1]["chars_per_sec"] = 17_847.0
    summary = {
        "tracking_uri": "sqlite:///mlflow.db",
        "table": rows,
        "best": rows[0],
        "experiment_id": "1",
        "parent_run_id": "abc",
        "output_dir": "x",
    }
    lines = [line for line in format_summary(summary).splitlines() if line.startswith(("rank", "   "))]
    assert len(lines) == 3 and len({len(line) for line in lines}) == 1  # one width: the columns line up
    assert lines[1].split()[-2:] == ["—", "900"]  # an ensemble of seeds has no training speed of its own


# --------------------------------------------------------------------------- task bodies


def test_fetch_keeps_the_bytes_and_prepare_reuses_its_directory(tmp_path):
    import shutil

    from flows.pipeline import fetch, prepare

    source = tmp_path / "corpus.txt"
    source.write_text(generated_text(300), encoding="utf-8")
    root = str(tmp_path / "store")
    corpus = fetch.fn(str(source), None, root)
    assert corpus.size == source.stat().st_size and corpus.read_text() == source.read_text()
    settings = PrepSettings(lowercase=True)
    first = prepare.fn(corpus, settings, root)
    again = prepare.fn(corpus, settings, root)
    assert again == first  # the same directory, statistics and timestamp: nothing was prepared again
    assert first.stats["vocab_size"] < prepare.fn(corpus, PrepSettings(), root).stats["vocab_size"]
    shutil.rmtree(first.dir)
    redone = prepare.fn(corpus, settings, root)
    assert redone.dir == first.dir and redone.stats["prepared_at"] > first.stats["prepared_at"]


def test_fetch_retries_only_what_may_pass():
    from prefect.states import Failed

    from flows.pipeline import _transient

    def failed(err: Exception):
        return Failed(data=err)

    assert _transient(None, None, failed(CorpusFetchError("s3://b/k: connection reset", transient=True)))
    assert not _transient(None, None, failed(CorpusFetchError("s3://b/k: key 'k' not found")))
    assert not _transient(None, None, failed(ValueError("not a fetch error")))
