"""What can be checked of infra/, docker/ and prefect.yaml without a Docker engine."""

from __future__ import annotations

import importlib
import json
import re
from pathlib import Path

import yaml

from flows.deploy import DEFAULT_CRON

ROOT = Path(__file__).resolve().parents[1]


def load_yaml(path: str) -> dict:
    return yaml.safe_load((ROOT / path).read_text())


def test_compose_services_and_env_names_agree():
    compose = load_yaml("infra/compose.yaml")
    services = compose["services"]
    assert {"postgres", "minio", "minio-init", "mlflow", "prefect-server", "prefect-worker"} <= set(services)
    text = (ROOT / "infra/compose.yaml").read_text()
    used = set(re.findall(r"\$\{([A-Z0-9_]+)\}", text))
    example = {
        line.split("=", 1)[0]
        for line in (ROOT / "infra/.env.example").read_text().splitlines()
        if line and not line.startswith("#")
    }
    assert used == example, f"in compose, not in .env.example: {used - example}; unused: {example - used}"
    for name, service in services.items():
        for dep in service.get("depends_on", []):
            assert dep in services, f"{name} depends on unknown {dep}"
    for name in ("prefect-worker", "node-worker"):
        gpu = services[name]["deploy"]["resources"]["reservations"]["devices"][0]
        assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"]
    # the extra machines serve the pool of prefect.yaml's node deployment, on the host's network
    deployments = load_yaml("prefect.yaml")["deployments"]
    (node_pool,) = {d["work_pool"]["name"] for d in deployments if "ddp_node" in d["entrypoint"]}
    assert f"--pool {node_pool}" in services["node-worker"]["command"]
    assert services["node-worker"]["network_mode"] == "host" and services["node-worker"]["profiles"] == ["node"]
    assert "postgresql" in services["mlflow"]["command"] and "s3://" in services["mlflow"]["command"]
    assert services["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"].startswith(
        "postgresql+asyncpg://"
    )
    init = (ROOT / "infra/postgres/init.sql").read_text()
    assert "CREATE DATABASE mlflow" in init and "CREATE DATABASE prefect" in init
    for volume in services["postgres"]["volumes"]:
        source = volume.split(":")[0]
        if source.startswith("./"):
            assert (ROOT / "infra" / source).exists(), source


def test_dockerfiles_copy_real_paths_and_build_from_pyproject():
    compose = load_yaml("infra/compose.yaml")
    dockerfiles = {s["build"]["dockerfile"] for s in compose["services"].values() if "build" in s}
    assert dockerfiles == {"docker/Dockerfile.train", "docker/Dockerfile.cpu"}
    for dockerfile in dockerfiles:
        text = (ROOT / dockerfile).read_text()
        for line in text.splitlines():
            if line.startswith("COPY"):
                for source in line.split()[1:-1]:
                    assert (ROOT / source).exists(), f"{dockerfile}: COPY {source} does not exist"
        assert 'pip install ".[pipeline]"' in text
    assert "whl/cu" in (ROOT / "docker/Dockerfile.train").read_text()
    assert "whl/cpu" in (ROOT / "docker/Dockerfile.cpu").read_text()


def test_prefect_yaml_entrypoints_schedule_and_concurrency():
    spec = load_yaml("prefect.yaml")
    for deployment in spec["deployments"]:
        path, func = deployment["entrypoint"].split(":")
        assert (ROOT / path).is_file()
        module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
        flow = getattr(module, func)
        assert set(deployment.get("parameters", {})) <= set(flow.parameters.properties), deployment["name"]
        if flow.name == "charlm-pipeline":
            from flows.params import PipelineParams

            given = {k: v for k, v in deployment["parameters"]["params"].items() if "{{" not in str(v)}
            assert PipelineParams.model_validate(given).skip_if_unchanged  # the parameters are valid ones
            assert deployment["concurrency_limit"] == {"limit": 1, "collision_strategy": "CANCEL_NEW"}
            assert deployment["schedules"][0]["cron"] == DEFAULT_CRON
        else:  # the multi-node job's extra nodes: started by the pipeline, never on a schedule
            assert flow.name == "charlm-ddp-node" and "schedules" not in deployment


def test_kubernetes_gpu_work_pool_template():
    template = json.loads((ROOT / "infra/k8s/gpu-work-pool.json").read_text())
    container = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpus }}"
    assert template["variables"]["properties"]["gpus"]["default"] == 1
    placeholders = set(re.findall(r"\{\{ (\w+) \}\}", json.dumps(template["job_configuration"])))
    assert placeholders <= set(template["variables"]["properties"])
