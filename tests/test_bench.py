"""The benchmark scripts run end to end and print their figures.

Each script in ``bench/`` is what the README quotes a figure from, so one that no longer runs
against the library (a changed signature, a renamed field) would leave those figures without a
command that reproduces them. Here every CPU script runs on a small generated corpus with the
fewest steps it accepts, as a subprocess the way a user starts it; the figures themselves mean
nothing at this size — what is checked is that each part of the report is printed and, where the
script compares two things, that both sides ran.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
# one constant epoch and two one-epoch cycles: two cycle snapshots to ensemble
SHORT = '[{"kind":"constant","lr":0.003,"epochs":1},{"kind":"sgdr","lr":0.003,"cycles":2,"cycle_len":1}]'

pytestmark = pytest.mark.slow


def bench(script: str, *args: str, timeout: float = 240) -> str:
    """Run ``bench/<script>`` with one torch thread; its stdout, after checking it succeeded."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, f"{script} {' '.join(args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def test_step_costs_prints_every_share(corpus_file: Path) -> None:
    out = bench(
        "step_costs.py", "--corpus", str(corpus_file), "--only", "stateful_lstm:tiny", "--steps", "2", "--trials", "1"
    )
    for part in ("steps", "batches", "loop", "validation", "checkpoints"):
        assert f"  {part} " in out, out
    assert "speed ratio" in out and "s an epoch" in out, out


def test_throughput_compares_library_and_bare_loop_at_one_precision(corpus_file: Path, tmp_path: Path) -> None:
    report = tmp_path / "throughput.json"
    args = ["--corpus", str(corpus_file), "--arch", "stateful_gru", "--steps", "3", "--warmup", "1", "--trials", "1"]
    out = bench("throughput.py", *args, "--json", str(report))
    assert "stateful_gru on cpu, fp32" in out and "ratio of medians" in out, out
    row = json.loads(report.read_text())["architectures"]["stateful_gru"]
    assert row["precision"] == "fp32"
    assert row["library_chars_per_sec"][0] > 0 and row["bare_chars_per_sec"][0] > 0


def test_precision_reports_both_precisions_and_autos_choice(corpus_file: Path) -> None:
    args = ["--corpus", str(corpus_file), "--models", "notebook:stateful_gru"]
    out = bench("precision.py", *args, "--steps", "2", "--warmup", "1", "--trials", "1")
    line = next(line for line in out.splitlines() if line.startswith("notebook:stateful_gru"))
    assert "fp32" in line and "bf16" in line and "auto:" in line, out


def test_openmp_threads_times_each_place_it_was_asked_for(corpus_file: Path) -> None:
    out = bench("openmp_threads.py", "--corpus", str(corpus_file), "--steps", "3", "--order", "main,thread")
    assert [line.split(":")[0].strip() for line in out.splitlines() if "chars/s" in line] == ["main", "thread"], out


def test_quality_trains_and_reports_the_median(corpus_file: Path, tmp_path: Path) -> None:
    report = tmp_path / "quality.json"
    out = bench("quality.py", "--corpus", str(corpus_file), "--preset", "tiny", "--json", str(report))
    assert "median_best_val_loss" in out, out
    assert json.loads(report.read_text())


def test_snapshots_compares_every_combination(corpus_file: Path) -> None:
    out = bench("snapshots.py", "--corpus", str(corpus_file), "--seeds", "0", "--hidden-size", "8")
    for row in ("ensemble of the last 2 snapshots", "weight average of the last 4 snapshots"):
        assert row in out, out


def test_time_to_quality_runs_both_parts(corpus_file: Path, tmp_path: Path) -> None:
    report = tmp_path / "ttq.json"
    args = ["--corpus", str(corpus_file), "--seeds", "0", "--lstm", "--snapshots", "--workdir", str(tmp_path)]
    out = bench(
        "time_to_quality.py", *args, "--set", "model.hidden_size=8", "--set", f"schedule={SHORT}", "--json", str(report)
    )
    assert "target 1.3697 (the notebook's GRU)" in out and "median best" in out, out
    parts = json.loads(report.read_text())
    assert {r["preset"] for r in parts["gru"]["runs"]} == {"notebook", "short_sgdr"}
    assert parts["lstm"]["runs"][0]["snapshot_candidates"], "no snapshot ensemble was evaluated"
    # the LSTM summary names the settings it ran with, so a run with overrides is not read as the preset's
    assert "stateful_lstm awd_sgdr + model.hidden_size=8 schedule=" in out, out


def time_to_quality_module() -> Any:
    """bench/time_to_quality.py imported as a module (bench/ is scripts, not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("time_to_quality", ROOT / "bench" / "time_to_quality.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_plot_names_the_settings_a_run_had_beyond_its_preset() -> None:
    module = time_to_quality_module()
    run = {"variant": "awd_sgdr", "architecture": "stateful_lstm", "seed": 1, "overrides": []}
    assert module.run_label(run) == "awd_sgdr stateful_lstm seed 1"
    run["overrides"] = ["model.activation_reg=2", "model.dropout=0.5", f"schedule={SHORT}"]
    assert module.run_label(run) == (
        'awd_sgdr stateful_lstm seed 1 (activation_reg=2, dropout=0.5, schedule=[{"kind":"constant","lr":0.0...)'
    )


def test_the_plot_names_the_notebooks_figures_it_draws_across(tmp_path: Path) -> None:
    module = time_to_quality_module()
    history = [{"elapsed_s": 60.0 * i, "val_loss": loss} for i, loss in enumerate((1.5, 1.35, 1.26, 1.24), 1)]
    run = {"variant": "awd_ar_sgdr", "architecture": "stateful_lstm", "seed": 0, "overrides": [], "history": history}
    fig = module.plot([run], str(tmp_path / "plot.png"))
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.texts] == ["notebook's GRU 1.3697", "notebook's best LSTM 1.2524"]
    assert ax.get_lines()[0].get_label() == "awd_ar_sgdr stateful_lstm seed 0"
    assert (tmp_path / "plot.png").stat().st_size > 0


def test_time_to_quality_compares_a_variant_side_by_side(corpus_file: Path, tmp_path: Path) -> None:
    args = ["--corpus", str(corpus_file), "--seeds", "0", "1", "--lstm-only", "--parallel", "--workdir", str(tmp_path)]
    out = bench(
        "time_to_quality.py",
        *args,
        "--variant",
        "light=model.dropout=0.1",
        "--set",
        "model.hidden_size=8",
        "--set",
        f"schedule={SHORT}",
    )
    assert "variants against awd_sgdr" in out, out
    assert "light seed 0" in out and "light seed 1" in out and "light median difference" in out, out


def test_gpu_quality_script_runs_the_preset_and_a_variant_on_a_cpu(corpus_file: Path, tmp_path: Path) -> None:
    """bench/gpu_quality.sh, the lent GPU's quality call, as its dry run on a CPU: a shell error there
    would cost a GPU session's device time. On a CPU it skips the graph check and trains eagerly."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "DEVICE": "cpu", "SEEDS": "0"}
    env.update(CORPUS=str(corpus_file), LOGS=str(tmp_path), SET=f"model.hidden_size=8 schedule={SHORT}", LIMIT="200")
    script = ROOT / "bench" / "gpu_quality.sh"
    done = subprocess.run(
        ["bash", str(script), "model.dropout=0.1"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240
    )
    log = (tmp_path / "quality.log").read_text()
    assert done.returncode == 0 and "exit 0" in log, f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}\n{log[-3000:]}"
    assert "graph check" not in log  # GRAPH=off on a CPU
    assert "v1: awd_sgdr + model.dropout=0.1" in log and "variants against awd_sgdr" in log, log
    assert "v1 seed 0" in done.stdout and "ensemble of the last 2 cycle snapshots" in done.stdout, done.stdout
    assert json.loads((tmp_path / "quality.json").read_text())["lstm"]


def test_ddp_scaling_launches_each_rank_count(corpus_file: Path, tmp_path: Path) -> None:
    report = tmp_path / "ddp.json"
    args = ["--corpus", str(corpus_file), "--trials", "1", "--set", "model.hidden_size=32", "--json", str(report)]
    out = bench("ddp_scaling.py", *args)
    assert "stateful_gru (notebook), 2 rank(s): median" in out and "speed-up" in out, out
    written = json.loads(report.read_text())
    figures = written["chars_per_sec"]
    assert set(figures) == {"1", "2"} and all(f[0] > 0 for f in figures.values())
    assert written["preset"] == "notebook" and written["set"] == ["model.hidden_size=32"]


def test_pipeline_overhead_times_the_library_and_the_flow(corpus_file: Path, tmp_path: Path) -> None:
    report = tmp_path / "overhead.json"
    relative = os.path.relpath(corpus_file, ROOT)  # the script changes directory: a relative path must still work
    args = ["--corpus", relative, "--arch", "stateful_gru", "--trials", "1", "--json", str(report)]
    out = bench("pipeline_overhead.py", *args)
    assert "stateful_gru, one epoch of" in out and "overhead" in out, out
    figures = json.loads(report.read_text())
    assert figures["library_s"][0] > 0 and figures["pipeline_s"][0] > 0


def test_last_cycle_continues_a_run_with_each_variant(corpus_file: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    train = [sys.executable, "-m", "charlm.cli", "train", "--arch", "stateful_lstm", "--preset", "awd_sgdr"]
    train += ["--corpus", str(corpus_file), "--out", str(run), "--quiet", "--set", "model.hidden_size=8"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([*train, "--set", f"schedule={SHORT}"], cwd=ROOT, env=env, check=True, timeout=240)
    args = ["--corpus", str(corpus_file), "--checkpoint", str(run / "cycle-0.pt")]  # epoch 2 of 4
    variants = ["--variant", "heavier=model.dropout=0.5 model.weight_drop=0.5", "--variant", "long=data.context=64"]
    report = tmp_path / "last.json"
    out = bench("last_cycle.py", *args, *variants, "--json", str(report))
    assert "control      from epoch 2 (unchanged)" in out and "heavier      from epoch 2" in out, out
    runs = json.loads(report.read_text())
    assert [r["variant"] for r in runs] == ["control", "heavier", "long"]
    assert all([h["epoch"] for h in r["history"]] == [3, 4] for r in runs)
    assert runs[1]["history"][0]["val_loss"] != runs[0]["history"][0]["val_loss"]
    # the control retrained here is the run itself continued: the run's own last.pt read as the reference agrees
    out = bench("last_cycle.py", *args, "--reference", str(run / "last.pt"), "--json", str(report))
    reference = json.loads(report.read_text())[0]
    assert reference["history"][0]["val_loss"] == pytest.approx(runs[0]["history"][0]["val_loss"], abs=1e-6)
    assert "best" in out and "wall" in out, out
    with pytest.raises(AssertionError, match="parameters differ"):
        bench("last_cycle.py", *args, "--variant", "wide=model.hidden_size=16")
