"""Promotion to the MLflow model registry: challenger, champion, previous, rollback.

Aliases are unique per registered model, so there is never more than one
``champion``. Promotion moves ``previous`` first and ``champion`` last: a failure
in between leaves the old champion in place, never none.

Retries: MLflow's client retries its HTTP calls itself (``MLFLOW_HTTP_REQUEST_MAX_RETRIES``,
``MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR``); nothing here adds another layer. Registering
is idempotent per logged model — a candidate already registered gets its existing
version back — so a promotion that is retried whole never creates a duplicate.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import mlflow
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

DEFAULT_MODEL_NAME = "charlm"
CANDIDATE_KINDS = ("best", "sgdr-snapshot", "ensemble", "weight_average", "seed_ensemble")
ENSEMBLE_KINDS = ("ensemble", "seed_ensemble")  # served as several models: capped by max_ensemble
CHAMPION, CHALLENGER, PREVIOUS = "champion", "challenger", "previous"


@dataclass(frozen=True)
class Candidate:
    """A model of the run that may be promoted: a best checkpoint, an SGDR snapshot, an ensemble or a
    weight average of snapshots, or an ensemble of several seeds' best checkpoints (logged on the parent run)."""

    model_id: str  # MLflow logged model
    architecture: str
    kind: str  # one of CANDIDATE_KINDS
    val_loss: float
    run_id: str
    cycle: int | None = None
    task: str = ""  # what its validation loss measures (charlm.prepared.PrepSettings.task)
    fingerprint: str = ""  # corpus, settings, config and code that produced it
    members: int = 1  # an ensemble's models (its inference costs that many); 1 otherwise


@dataclass(frozen=True)
class Decision:
    model_name: str
    version: str | None  # None: nothing registered
    promoted: bool
    reason: str
    candidate: dict[str, Any]
    champion_version: str | None
    champion_val_loss: float | None
    registered: bool = True  # False: an identical version existed already, or nothing was comparable

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def candidates_of(experiment_id: str, run_ids: list[str], max_ensemble: int | None = None) -> list[Candidate]:
    """Every candidate model logged by the given runs — best checkpoints, snapshots, ensembles and
    weight averages of the child runs, ensembles of seeds on the parent — best first; ensembles of
    more than ``max_ensemble`` models left out (what a deployment accepts to pay at inference)."""
    models = mlflow.search_logged_models(experiment_ids=[experiment_id], output_format="list")
    out = []
    for m in models:
        tags = m.tags or {}
        if m.source_run_id in run_ids and tags.get("charlm.kind") in CANDIDATE_KINDS:
            cycle = tags.get("charlm.cycle")
            out.append(
                Candidate(
                    model_id=m.model_id,
                    architecture=tags["charlm.architecture"],
                    kind=tags["charlm.kind"],
                    val_loss=float(tags["charlm.val_loss"]),
                    run_id=m.source_run_id,
                    cycle=int(cycle) if cycle is not None else None,
                    task=tags.get("charlm.task", ""),
                    fingerprint=tags.get("charlm.fingerprint", ""),
                    members=int(tags.get("charlm.members", 1)),
                )
            )
    if max_ensemble is not None:
        out = [c for c in out if c.kind not in ENSEMBLE_KINDS or c.members <= max_ensemble]
    return sorted(out, key=lambda c: c.val_loss)


def comparable(candidates: list[Candidate], champion: ModelVersion | None) -> tuple[str, list[Candidate]]:
    """The task a promotion is decided on, and the candidates of that task (best first): the
    champion's task when it has one, else the task most candidates share (ties: the best's).
    Losses of different tasks (a case-sensitive and a lowercased vocabulary, another split)
    measure different things and are never ranked against each other."""
    if champion is not None and champion.tags.get("charlm.task"):
        task = champion.tags["charlm.task"]
    else:
        counts = Counter(c.task for c in candidates)
        task = max(counts, key=lambda t: (counts[t], -min(c.val_loss for c in candidates if c.task == t)))
    return task, [c for c in candidates if c.task == task]


def alias_version(client: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    """The model version behind ``alias``, or None."""
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as err:
        if "RESOURCE_DOES_NOT_EXIST" in str(err.error_code) or "not found" in str(err).lower():
            return None
        raise


def identical_version(client: MlflowClient, model_name: str, candidate: Candidate) -> ModelVersion | None:
    """The version of ``model_name`` that registers this logged model, or the same kind of candidate
    (best, snapshot K, ensemble or average of M) of a run with the same fingerprint (the same corpus,
    settings, configuration and code), if there is one."""
    try:
        versions = client.search_model_versions(f"name = '{model_name}'")
    except MlflowException as err:
        if "RESOURCE_DOES_NOT_EXIST" in str(err.error_code):
            return None
        raise
    same_kind = {
        "charlm.kind": candidate.kind,
        "charlm.cycle": None if candidate.cycle is None else str(candidate.cycle),
        "charlm.members": str(candidate.members),
    }
    for v in versions:
        if v.tags.get("charlm.model_id") == candidate.model_id:
            return v
        same_run = bool(candidate.fingerprint) and v.tags.get("charlm.fingerprint") == candidate.fingerprint
        if same_run and all(v.tags.get(k, "1" if k == "charlm.members" else None) == w for k, w in same_kind.items()):
            return v
    return None


def promote(
    candidate: Candidate,
    *,
    corpus_sha256: str,
    model_name: str = DEFAULT_MODEL_NAME,
    margin: float = 0.0,
    reevaluate: Callable[[ModelVersion], float] | None = None,
    parent_run_id: str | None = None,
    run_fingerprint: str | None = None,
    client: MlflowClient | None = None,
) -> Decision:
    """Register ``candidate`` as a new version; make it ``champion`` if there is none, or if it
    beats the champion's validation loss by more than ``margin``, else ``challenger``.

    ``challenger`` only ever names a version that lost the gate: a promoted version is
    ``champion`` alone (the one alias the registry's list shows first), its predecessor
    ``previous``. A candidate identical to a registered version (same logged model, or the
    same fingerprint) registers nothing. When the champion was trained on another corpus
    (its ``charlm.corpus_sha256`` tag differs), ``reevaluate(champion_version)`` measures it
    on this run's validation split.
    """
    client = client or MlflowClient()
    champion = alias_version(client, model_name, CHAMPION)
    same = identical_version(client, model_name, candidate)
    if same is not None:
        decision = Decision(
            model_name=model_name,
            version=same.version,
            promoted=False,
            reason=f"identical to v{same.version} (same corpus, settings, configuration and code): no new version",
            candidate=asdict(candidate),
            champion_version=champion.version if champion else None,
            champion_val_loss=None,
            registered=False,
        )
        _record(client, decision, parent_run_id, tag_version=False)
        return decision

    champion_loss: float | None = None
    if champion is None:
        promoted, reason = True, "no champion yet"
    else:
        same_data = champion.tags.get("charlm.corpus_sha256") == corpus_sha256
        if same_data:
            champion_loss = float(champion.tags["charlm.val_loss"])
            basis = "recorded on the same corpus"
        elif reevaluate is not None:
            champion_loss = float(reevaluate(champion))
            basis = f"re-evaluated on corpus {corpus_sha256[:12]}"
        else:
            raise ValueError("the champion was trained on another corpus: pass reevaluate= to compare fairly")
        promoted = candidate.val_loss < champion_loss - margin
        verb = "beats" if promoted else "does not beat"
        reason = (
            f"{candidate.val_loss:.4f} {verb} champion v{champion.version} ({champion_loss:.4f}, {basis}) "
            f"by more than the margin {margin}"
        )

    tags = {
        "charlm.architecture": candidate.architecture,
        "charlm.kind": candidate.kind,
        "charlm.corpus_sha256": corpus_sha256,
        "charlm.run_id": candidate.run_id,
        "charlm.val_loss": repr(float(candidate.val_loss)),
        "charlm.model_id": candidate.model_id,
        "charlm.task": candidate.task,
        "charlm.fingerprint": candidate.fingerprint,
        "charlm.members": str(candidate.members),
    }
    if parent_run_id:
        tags["charlm.parent_run_id"] = parent_run_id
    if run_fingerprint:
        tags["charlm.run_fingerprint"] = run_fingerprint
    if candidate.cycle is not None:
        tags["charlm.cycle"] = str(candidate.cycle)
    # The path that also tags the logged model with its version (its page then says "Registered").
    version = mlflow.register_model(f"models:/{candidate.model_id}", model_name, tags=tags)
    if promoted:
        if champion is not None:
            client.set_registered_model_alias(model_name, PREVIOUS, champion.version)
        client.set_registered_model_alias(model_name, CHAMPION, version.version)
        if alias_version(client, model_name, CHALLENGER) is not None:  # it lost to the old champion: stale
            client.delete_registered_model_alias(model_name, CHALLENGER)
    else:
        client.set_registered_model_alias(model_name, CHALLENGER, version.version)
    decision = Decision(
        model_name=model_name,
        version=version.version,
        promoted=promoted,
        reason=reason,
        candidate=asdict(candidate),
        champion_version=champion.version if champion else None,
        champion_val_loss=champion_loss,
    )
    _record(client, decision, parent_run_id)
    return decision


def rollback(model_name: str = DEFAULT_MODEL_NAME, *, client: MlflowClient | None = None) -> Decision:
    """Make the ``previous`` version champion again; the demoted version keeps ``challenger``."""
    client = client or MlflowClient()
    previous = alias_version(client, model_name, PREVIOUS)
    if previous is None:
        raise ValueError(f"registered model {model_name!r} has no '{PREVIOUS}' version to roll back to")
    current = alias_version(client, model_name, CHAMPION)
    client.set_registered_model_alias(model_name, CHAMPION, previous.version)
    client.delete_registered_model_alias(model_name, PREVIOUS)
    if current is not None:
        client.set_registered_model_alias(model_name, CHALLENGER, current.version)
    reason = f"rollback: v{previous.version} restored as champion" + (
        f", v{current.version} demoted" if current is not None else ""
    )
    decision = Decision(
        model_name=model_name,
        version=previous.version,
        promoted=True,
        reason=reason,
        candidate={},
        champion_version=current.version if current else None,
        champion_val_loss=None,
    )
    _record(client, decision, None)
    return decision


def _record(client: MlflowClient, decision: Decision, parent_run_id: str | None, tag_version: bool = True) -> None:
    if not decision.registered:
        outcome = "not registered"
    else:
        outcome = "promoted to champion" if decision.promoted else "kept as challenger"
    for key, value in {"charlm.decision": outcome, "charlm.reason": decision.reason}.items():
        if tag_version and decision.version is not None:
            client.set_model_version_tag(decision.model_name, decision.version, key, value)
        if parent_run_id:
            client.set_tag(parent_run_id, key, value)


def promote_run(
    parent_run_id: str,
    *,
    model_name: str = DEFAULT_MODEL_NAME,
    margin: float = 0.0,
    read_corpus: Callable[[], str] | None = None,
    max_ensemble: int | None = 3,
    client: MlflowClient | None = None,
) -> Decision:
    """Promote the best candidate of a finished pipeline run (see :func:`promote`).

    ``read_corpus`` returns the run's corpus text; it is called only to re-evaluate a
    champion that was trained on another corpus.
    """
    from charlm.tracking import load_registered

    client = client or MlflowClient()
    parent = client.get_run(parent_run_id)
    sha256 = parent.data.tags["charlm.corpus_sha256"]
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'"
    )
    runs = [parent_run_id] + [c.info.run_id for c in children]  # the parent holds the seeds' ensembles
    candidates = candidates_of(parent.info.experiment_id, runs, max_ensemble)
    if not candidates:
        raise ValueError(f"run {parent_run_id}: no candidate models (best checkpoints or snapshots) were logged")
    champion = alias_version(client, model_name, CHAMPION)
    task, same_task = comparable(candidates, champion)
    if not same_task:
        decision = Decision(
            model_name=model_name,
            version=None,
            promoted=False,
            reason=f"no candidate was validated on the champion's task ({task}): nothing compared or registered",
            candidate={},
            champion_version=champion.version if champion else None,
            champion_val_loss=None,
            registered=False,
        )
        _record(client, decision, parent_run_id)
        return decision

    def reevaluate(version: ModelVersion) -> float:
        if read_corpus is None:
            raise ValueError("the champion was trained on another corpus: give the corpus to re-evaluate it")
        loaded = load_registered(f"models:/{model_name}/{version.version}")
        return float(loaded.evaluate_text(read_corpus())["val_loss"])

    return promote(
        same_task[0],
        corpus_sha256=sha256,
        run_fingerprint=parent.data.tags.get("charlm.fingerprint"),
        model_name=model_name,
        margin=margin,
        reevaluate=reevaluate,
        parent_run_id=parent_run_id,
        client=client,
    )
