"""The README's main command on the embedded defaults: Prefect's ephemeral mode (no
PREFECT_API_URL) and a local MLflow SQLite store (no MLFLOW_TRACKING_URI), in a fresh process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import generated_text

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]


def test_the_pipeline_runs_on_ephemeral_prefect_and_local_sqlite_mlflow(tmp_path):
    from mlflow.tracking import MlflowClient

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(generated_text(800, seed=3), encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "CHARLM_"))}
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), PYTHONPATH=str(ROOT))
    command = [sys.executable, "-m", "flows.pipeline", "--corpus-uri", str(corpus), "--preset", "tiny"]
    command += ["--arch", "char3", "stateful_gru"]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-4000:]
    out = done.stdout + done.stderr
    assert "charlm pipeline finished" in out and "is the new champion" in out
    for arch in ("char3", "stateful_gru"):  # one line per epoch per architecture, with its ETA
        assert f"{arch}: epoch 3/3  train " in out and "ETA 0m00s" in out, out[-3000:]
    assert "Task run 'train-char3'" in out  # task runs named by architecture
    noise = [line for line in out.splitlines() if "Warning" in line or "WARNING mlflow" in line]
    assert noise == [], "\n".join(noise)  # the console of a run shows no library warnings
    assert "Starting temporary server" in out  # Prefect's ephemeral mode, not a configured server
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")  # MLflow's default store, in the working directory
    champion = client.get_model_version_by_alias("charlm", "champion")
    assert champion.tags["charlm.architecture"] in {"char3", "stateful_gru"}
    assert (tmp_path / ".charlm" / "runs").is_dir()  # CHARLM_HOME's default, under the working directory


def test_a_temporary_prefect_server_that_does_not_start_in_time_ends_in_one_line(tmp_path):
    """A machine too busy to start Prefect's ephemeral server in time (here: no time allowed)."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(generated_text(200, seed=3), encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "CHARLM_"))}
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), PYTHONPATH=str(ROOT))
    env["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "0"
    command = [sys.executable, "-m", "flows.pipeline", "--corpus-uri", str(corpus), "--preset", "tiny"]
    command += ["--arch", "char3"]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    out = done.stdout + done.stderr
    assert done.returncode == 1, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    error = (
        "python -m flows.pipeline: error: Prefect's temporary API server did not start within 0 s (the machine "
        "may be too busy): raise PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, or set PREFECT_API_URL to a "
        "running Prefect server"
    )
    assert out.splitlines().count(error) == 1, out[-3000:]  # then only Prefect's line as the server stops
    assert [line for line in out.splitlines() if "error" in line.lower()] == [error]
