"""Real services on loopback for the integration tests: S3 (moto's server mode),
``mlflow server``, ``prefect server`` and throwaway PostgreSQL databases. Each starts and stops here."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

from tests.s3server import CREDENTIALS, free_port, moto_server

__all__ = ["CREDENTIALS", "mlflow_server", "moto_server", "postgres_database", "prefect_server"]

POSTGRES_DSN = os.environ.get("CHARLM_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432")


@contextlib.contextmanager
def postgres_database() -> Iterator[str]:
    """A fresh database on the machine's PostgreSQL, dropped afterwards; yields its SQLAlchemy URI."""
    import psycopg2

    name = f"charlm_test_{uuid.uuid4().hex[:10]}"
    admin = psycopg2.connect(f"{POSTGRES_DSN}/postgres")
    admin.autocommit = True
    try:
        with admin.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{name}"')
        yield f"{POSTGRES_DSN.replace('postgresql://', 'postgresql+psycopg2://')}/{name}"
    finally:
        with admin.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


@contextlib.contextmanager
def serve(
    name: str, command: list[str], env: dict[str, str], workdir: Path, health: str, timeout: float
) -> Iterator[None]:
    """Run a server as its own process group until the ``with`` block ends; enter once ``health`` answers 200."""
    log = open(workdir / f"{name}.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=workdir, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}; see {log.name}")
            try:
                with urllib.request.urlopen(health, timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name} did not answer {health} in {timeout}s; see {log.name}")
            time.sleep(0.5)
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 15)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
        log.close()


@contextlib.contextmanager
def mlflow_server(
    backend_uri: str, artifacts_destination: str, workdir: Path, s3_endpoint: str | None = None, timeout: float = 120.0
) -> Iterator[str]:
    """``mlflow server`` as its own process; yields its URL once /health answers."""
    port = free_port()
    env = {**os.environ, **CREDENTIALS, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    if s3_endpoint:
        env["MLFLOW_S3_ENDPOINT_URL"] = s3_endpoint
    command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port)]
    command += ["--workers", "1", "--backend-store-uri", backend_uri, "--artifacts-destination", artifacts_destination]
    url = f"http://127.0.0.1:{port}"
    with serve(f"mlflow-server-{port}", command, env, workdir, f"{url}/health", timeout):
        yield url


@contextlib.contextmanager
def prefect_server(database_uri: str, workdir: Path, timeout: float = 180.0) -> Iterator[str]:
    """``prefect server start`` as its own process, its state in ``database_uri`` (PostgreSQL, as in
    production: infra/compose.yaml); yields the API URL once /api/health answers."""
    port = free_port()
    home = workdir / f"prefect-home-{port}"
    home.mkdir()
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_API_DATABASE_CONNECTION_URL": database_uri.replace("+psycopg2", "+asyncpg"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
    }
    env.pop("PREFECT_API_URL", None)
    command = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    url = f"http://127.0.0.1:{port}/api"
    with serve(f"prefect-server-{port}", command, env, workdir, f"{url}/health", timeout):
        yield url
