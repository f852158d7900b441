"""Promotion, the pyfunc and serving, against a real `mlflow server` on loopback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from charlm import registry
from charlm.config import tiny
from charlm.prepared import prepare_for
from charlm.tracking import log_checkpoint_model
from charlm.training import Trainer
from tests.conftest import generated_text
from tests.s3server import free_port
from tests.services import mlflow_server

pytestmark = pytest.mark.integration
NAME = "charlm-registry-test"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    work = tmp_path_factory.mktemp("registry")
    with mlflow_server(f"sqlite:///{work}/mlflow.db", str(work / "artifacts"), work) as url:
        saved = os.environ.get("MLFLOW_TRACKING_URI")
        os.environ["MLFLOW_TRACKING_URI"] = url
        mlflow.set_tracking_uri(url)
        try:
            yield {"url": url, "work": work}
        finally:
            if saved is None:
                os.environ.pop("MLFLOW_TRACKING_URI", None)
            else:
                os.environ["MLFLOW_TRACKING_URI"] = saved


@pytest.fixture(scope="module")
def candidates(server):
    """Three logged models of one tiny checkpoint; their val losses are set per candidate."""
    config = tiny("stateful_gru")
    out = server["work"] / "ckpt"
    Trainer(config, prepare_for(config, generated_text()), checkpoint_dir=out).fit()
    exp = mlflow.set_experiment("registry-test")
    client = MlflowClient(server["url"])
    run_id = client.create_run(exp.experiment_id).info.run_id
    result = {}
    for label, loss in [("first", 1.0), ("worse", 1.2), ("better", 0.8), ("twin", 0.7), ("new-a", 0.9), ("new-b", 0.9)]:
        model_id = log_checkpoint_model(out / "best.pt", f"cand-{label}", run_id=run_id, tags={"charlm.kind": "best"})
        result[label] = registry.Candidate(
            model_id=model_id,
            architecture="stateful_gru",
            kind="best",
            val_loss=loss,
            run_id=run_id,
            fingerprint=f"fp-{label}" if label != "twin" else "fp-better",  # twin: what a rerun of "better" logs
        )
    ensemble_id = log_checkpoint_model(
        [out / "cycle-0.pt", out / "cycle-1.pt"], "cand-ensemble", run_id=run_id, tags={"charlm.kind": "ensemble"}
    )
    result["ensemble"] = registry.Candidate(
        model_id=ensemble_id, architecture="stateful_gru", kind="ensemble", val_loss=0.9, run_id=run_id, members=2
    )
    assert client.get_run(run_id).info.status == "RUNNING"  # logging models never ended the run
    return result


@pytest.fixture(scope="module")
def served(candidates):
    """A registered model of its own whose champion is a snapshot ensemble (two members), for the
    loading and serving tests: an ensemble is served as a single model is."""
    name = f"{NAME}-served"
    decision = registry.promote(candidates["ensemble"], corpus_sha256="aaa", model_name=name)
    assert decision.promoted and MlflowClient().get_model_version(name, decision.version).tags["charlm.members"] == "2"
    return name


def aliases(client):
    return {a: registry.alias_version(client, NAME, a) for a in ("champion", "challenger", "previous")}


def version_of(v):
    return None if v is None else v.version


def test_champion_challenger_previous_and_rollback(server, candidates):
    client = MlflowClient(server["url"])
    first = registry.promote(candidates["first"], corpus_sha256="aaa", model_name=NAME)
    assert first.promoted and first.reason == "no champion yet"
    assert {k: version_of(v) for k, v in aliases(client).items()} == {
        "champion": first.version,
        "challenger": None,  # a challenger is a version that lost; the champion is never one
        "previous": None,
    }

    worse = registry.promote(candidates["worse"], corpus_sha256="aaa", model_name=NAME, margin=0.01)
    assert not worse.promoted and "does not beat" in worse.reason
    state = {k: version_of(v) for k, v in aliases(client).items()}
    assert state == {"champion": first.version, "challenger": worse.version, "previous": None}
    tags = client.get_model_version(NAME, worse.version).tags
    assert tags["charlm.decision"] == "kept as challenger" and tags["charlm.reason"] == worse.reason

    better = registry.promote(candidates["better"], corpus_sha256="aaa", model_name=NAME, margin=0.01)
    assert better.promoted and "beats champion" in better.reason
    assert {k: version_of(v) for k, v in aliases(client).items()} == {
        "champion": better.version,
        "challenger": None,  # "worse" lost to the old champion: no longer a challenger of this one
        "previous": first.version,
    }
    # The same candidate again, or a rerun's model with the same fingerprint: no new version.
    count = len(client.search_model_versions(f"name = '{NAME}'"))
    for again in (candidates["better"], candidates["twin"]):
        same = registry.promote(again, corpus_sha256="aaa", model_name=NAME)
        assert (same.registered, same.promoted, same.version) == (False, False, better.version)
        assert f"identical to v{better.version}" in same.reason
    assert len(client.search_model_versions(f"name = '{NAME}'")) == count
    assert version_of(aliases(client)["champion"]) == better.version

    back = registry.rollback(NAME)
    assert back.version == first.version
    assert {k: version_of(v) for k, v in aliases(client).items()} == {
        "champion": first.version,
        "challenger": better.version,
        "previous": None,
    }
    with pytest.raises(ValueError, match="no 'previous' version"):
        registry.rollback(NAME)


def test_a_champion_from_another_corpus_is_re_evaluated(server, candidates):
    seen = []

    def reevaluate(version):
        seen.append(version.version)
        return 0.5  # the champion does well on the new data

    decision = registry.promote(candidates["new-a"], corpus_sha256="bbb", model_name=NAME, reevaluate=reevaluate)
    assert seen and not decision.promoted and "re-evaluated on corpus bbb" in decision.reason
    with pytest.raises(ValueError, match="trained on another corpus"):
        registry.promote(candidates["new-b"], corpus_sha256="ccc", model_name=NAME)


def test_the_registered_version_is_linked_from_its_logged_model_and_has_a_signature(server, served):
    client = MlflowClient(server["url"])
    champion = client.get_model_version_by_alias(served, "champion")
    logged = mlflow.get_logged_model(champion.tags["charlm.model_id"])
    assert served in logged.tags.get("mlflow.modelVersions", "")  # the model's page says "Registered"
    info = mlflow.models.get_model_info(f"models:/{served}@champion")
    inputs = info.signature.inputs.to_dict()
    assert "prime" in json.dumps(inputs) and "length" in json.dumps(inputs)
    assert info.saved_input_example_info is not None


def test_a_comparison_never_ranks_losses_of_two_tasks():
    def candidate(arch, loss, task):
        return registry.Candidate(model_id=arch, architecture=arch, kind="best", val_loss=loss, run_id="r", task=task)

    cased, lower = "case-sensitive, min_freq 1, last 20% validation", "lowercased, min_freq 3, last 20% validation"
    candidates = [candidate("char3", 1.1, cased), candidate("lstm", 1.25, lower), candidate("gru", 1.3, lower)]
    # No champion: the task most candidates share, not the lowest loss of another vocabulary.
    task, ranked = registry.comparable(candidates, None)
    assert task == lower and [c.architecture for c in ranked] == ["lstm", "gru"]
    from mlflow.entities.model_registry import ModelVersion, ModelVersionTag

    champion = ModelVersion("m", "1", 0, tags=[ModelVersionTag("charlm.task", cased)])
    assert registry.comparable(candidates, champion) == (cased, [candidates[0]])


def test_pyfunc_loads_in_a_fresh_process_and_the_cli_generates(server, served):
    code = (
        "import mlflow; m = mlflow.pyfunc.load_model('models:/%s@champion'); "
        "print(m.predict([{'prime': 'the ', 'length': 25, 'seed': 3}])[0])" % served
    )
    env = {**os.environ, "MLFLOW_TRACKING_URI": server["url"]}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert len(out.stdout.rstrip("\n")) == 25
    cli = subprocess.run(
        [
            sys.executable,
            "-m",
            "charlm.cli",
            "generate",
            "--model",
            f"models:/{served}@champion",
            "--prime",
            "for thos",
            "-n",
            "40",
            "--seed",
            "1",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert cli.returncode == 0, cli.stderr[-2000:]
    assert cli.stdout.startswith("for thos") and len(cli.stdout.strip()) >= 40


def post(port: int, payload: object) -> tuple[int, dict]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/invocations",
        data=json.dumps(payload).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


BAD_REQUESTS = [
    ({"prime": "the ", "length": 10_000_000}, "length", "less than or equal to 10000"),
    ({"prime": 3}, "prime", "valid string"),
    ({"prime": "the ", "temperature": -1}, "temperature", "greater than or equal to 0"),
    ({"prime": "the ", "top_k": 0}, "top_k", "greater than or equal to 1"),
    ({"prime": "the ", "seed": "x"}, "seed", "valid integer"),
    ({"prime": "the ", "length": 5, "colour": "red"}, "colour", "Extra inputs are not permitted"),
]


def test_mlflow_models_serve_refuses_bad_requests_answers_good_ones_and_stops_on_sigterm(server, served):
    port = free_port()
    # `mlflow models serve` execs uvicorn from PATH: the environment's bin directory, as when it is activated.
    path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    env = {**os.environ, "MLFLOW_TRACKING_URI": server["url"], "PATH": path}
    log_path = server["work"] / "serve.log"
    log = open(log_path, "wb")  # noqa: SIM115 - closed below
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{served}@champion"]
    command += ["--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)]
    proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=5):
                    break
            except OSError as err:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise AssertionError(f"mlflow models serve: {err}\n{log_path.read_text()[-3000:]}") from None
                time.sleep(1)
        for row, field, rule in BAD_REQUESTS:  # each refused with a 400 naming the field, no server internals
            status, body = post(port, {"inputs": [row]})
            assert status == 400, (row, body)
            assert field in body["message"] and rule in body["message"], body["message"]
            internals = ("Traceback", 'File "', "site-packages", "/charlm/")
            assert "stack_trace" not in body and not any(x in body["message"] for x in internals), body
        status, body = post(port, {"inputs": [{"prime": "the spirit ", "length": 30, "seed": 1}]})
        assert status == 200 and len(body["predictions"][0]) == 30  # served right after the refusals
        again = post(port, {"inputs": [{"prime": "the spirit ", "length": 30, "seed": 1}]})[1]
        assert again == body  # the seed makes it reproducible
        os.kill(proc.pid, 15)  # SIGTERM to the server process alone, as `docker stop` or systemd sends it
        assert proc.wait(timeout=60) is not None
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
            proc.wait()
        log.close()


def test_the_ensemble_of_an_architectures_seeds_is_logged_on_the_parent_and_competes_for_promotion(server, tmp_path):
    """Two seeds of one architecture in child runs, their best checkpoints' ensemble on the parent run:
    evaluated (never worse than its members on average), a candidate of the promotion gate, left out
    when the gate accepts no ensemble of that size, and registered once only."""
    from charlm.experiment import end_run, log_seed_ensembles, start_parent_run, train_in_child_run
    from charlm.job import TrainJob
    from charlm.prepared import prepare

    corpus_file = tmp_path / "corpus.txt"
    corpus_file.write_text(generated_text(3000, seed=3))
    configs = [tiny("stateful_gru").override({"seed": seed}) for seed in (0, 1)]
    data = prepare(str(corpus_file), configs[0], root=tmp_path / "home")
    experiment_id, parent = start_parent_run("seeds-test", "pipeline-seeds", data.corpus, {})
    results = [
        train_in_child_run(
            TrainJob(config=c, data=data, checkpoint_dir=str(tmp_path / f"seed{c.seed}"), label=f"gru-seed{c.seed}"),
            experiment_id=experiment_id,
            parent_run_id=parent,
        )
        for c in configs
    ]
    client = MlflowClient(server["url"])
    assert [client.get_run(r.run_id).info.run_name for r in results] == ["gru-seed0", "gru-seed1"]
    (row,) = log_seed_ensembles(parent, results, [data])
    assert row["kind"] == "seed_ensemble" and row["seeds"] == [0, 1] and row["run_id"] == parent
    assert row["val_loss"] <= sum(r.best_val_loss for r in results) / 2 + 1e-4  # the mean of distributions
    (model,) = mlflow.search_logged_models(
        experiment_ids=[experiment_id], output_format="list", filter_string="tags.`charlm.kind` = 'seed_ensemble'"
    )
    assert model.source_run_id == parent and model.tags["charlm.members"] == "2"
    assert model.tags["charlm.member_runs"] == ",".join(r.run_id for r in results)
    assert float(model.tags["charlm.val_loss"]) == pytest.approx(row["val_loss"])
    served = mlflow.pyfunc.load_model(f"models:/{model.model_id}")  # served as one model
    assert len(served.predict([{"prime": "the ", "length": 12, "seed": 0}])[0]) == 12
    end_run(parent)

    name = f"{NAME}-seeds"
    kinds = {c.kind for c in registry.candidates_of(experiment_id, [parent] + [r.run_id for r in results])}
    assert kinds == {"best", "sgdr-snapshot", "ensemble", "weight_average", "seed_ensemble"}
    no_ensembles = registry.promote_run(parent, model_name=f"{name}-single", max_ensemble=1)
    assert no_ensembles.candidate["kind"] in ("best", "sgdr-snapshot", "weight_average")
    decision = registry.promote_run(parent, model_name=name)
    best = min(registry.candidates_of(experiment_id, [parent] + [r.run_id for r in results]), key=lambda c: c.val_loss)
    assert decision.candidate["model_id"] == best.model_id and decision.promoted
    if best.kind == "seed_ensemble":
        assert client.get_model_version(name, decision.version).tags["charlm.members"] == "2"
    again = registry.promote_run(parent, model_name=name)
    assert not again.registered and again.version == decision.version  # a retried promotion registers nothing new
