"""Promotion to the MLflow model registry: challenger, champion, previous, rollback.

Aliases are unique per registered model, so there is never more than one
``champion``. Promotion moves ``previous`` first and ``champion`` last: a failure
in between leaves the old champion in place, never none.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

from mlflow.exceptions import MlflowException, RestException
from mlflow.tracking import MlflowClient

DEFAULT_MODEL_NAME = "charlm"
CHAMPION, CHALLENGER, PREVIOUS = "champion", "challenger", "previous"

T = TypeVar("T")


def with_retries(call: Callable[[], T], *, attempts: int = 4, delay: float = 1.0) -> T:
    """Retry a registry call on transient failures (connection errors, 5xx, 429), not on 4xx."""
    for attempt in range(1, attempts + 1):
        try:
            return call()
        except RestException as err:
            status = getattr(err, "get_http_status_code", lambda: 500)()
            if (status < 500 and status != 429) or attempt == attempts:
                raise
        except (MlflowException, ConnectionError, OSError) as err:
            if isinstance(err, MlflowException) and "RESOURCE_DOES_NOT_EXIST" in str(err.error_code):
                raise
            if attempt == attempts:
                raise
        time.sleep(delay * 2 ** (attempt - 1))
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class Candidate:
    """A model of the run that may be promoted: a best checkpoint or an SGDR snapshot."""

    model_id: str  # MLflow logged model
    architecture: str
    kind: str  # "best" or "sgdr-snapshot"
    val_loss: float
    run_id: str
    cycle: int | None = None


@dataclass(frozen=True)
class Decision:
    model_name: str
    version: str
    promoted: bool
    reason: str
    candidate: dict[str, Any]
    champion_version: str | None
    champion_val_loss: float | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def candidates_of(experiment_id: str, run_ids: list[str]) -> list[Candidate]:
    """Every logged model (best checkpoints and snapshots) of the given child runs."""
    import mlflow

    models = mlflow.search_logged_models(experiment_ids=[experiment_id], output_format="list")
    out = []
    for m in models:
        tags = m.tags or {}
        if m.source_run_id in run_ids and tags.get("charlm.kind") in ("best", "sgdr-snapshot"):
            cycle = tags.get("charlm.cycle")
            out.append(
                Candidate(
                    model_id=m.model_id,
                    architecture=tags["charlm.architecture"],
                    kind=tags["charlm.kind"],
                    val_loss=float(tags["charlm.val_loss"]),
                    run_id=m.source_run_id,
                    cycle=int(cycle) if cycle is not None else None,
                )
            )
    return sorted(out, key=lambda c: c.val_loss)


def alias_version(client: MlflowClient, name: str, alias: str):
    """The model version behind ``alias``, or None."""
    try:
        return with_retries(lambda: client.get_model_version_by_alias(name, alias))
    except MlflowException as err:
        if "RESOURCE_DOES_NOT_EXIST" in str(err.error_code) or "not found" in str(err).lower():
            return None
        raise


def promote(
    candidate: Candidate,
    *,
    corpus_sha256: str,
    model_name: str = DEFAULT_MODEL_NAME,
    margin: float = 0.0,
    reevaluate: Callable[[Any], float] | None = None,
    parent_run_id: str | None = None,
    client: MlflowClient | None = None,
) -> Decision:
    """Register ``candidate`` as a new version with alias ``challenger``; make it ``champion``
    if there is none, or if it beats the champion's validation loss by more than ``margin``.

    When the champion was trained on another corpus (its ``charlm.corpus_sha256`` tag
    differs), ``reevaluate(champion_version)`` measures it on this run's validation split.
    """
    client = client or MlflowClient()
    tags = {
        "charlm.architecture": candidate.architecture,
        "charlm.kind": candidate.kind,
        "charlm.corpus_sha256": corpus_sha256,
        "charlm.run_id": candidate.run_id,
        "charlm.val_loss": repr(float(candidate.val_loss)),
        "charlm.model_id": candidate.model_id,
    }
    if parent_run_id:
        tags["charlm.parent_run_id"] = parent_run_id
    if candidate.cycle is not None:
        tags["charlm.cycle"] = str(candidate.cycle)

    def ensure_model() -> None:
        try:
            client.get_registered_model(model_name)
        except MlflowException as err:
            if "RESOURCE_DOES_NOT_EXIST" not in str(err.error_code):
                raise
            client.create_registered_model(model_name, tags={"charlm": "character-level language models"})

    with_retries(ensure_model)
    version = with_retries(
        lambda: client.create_model_version(
            model_name,
            source=f"models:/{candidate.model_id}",
            run_id=candidate.run_id,
            tags=tags,
            model_id=candidate.model_id,
        )
    )
    with_retries(lambda: client.set_registered_model_alias(model_name, CHALLENGER, version.version))

    champion = alias_version(client, model_name, CHAMPION)
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

    if promoted:
        if champion is not None:
            with_retries(lambda: client.set_registered_model_alias(model_name, PREVIOUS, champion.version))
        with_retries(lambda: client.set_registered_model_alias(model_name, CHAMPION, version.version))
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
    with_retries(lambda: client.set_registered_model_alias(model_name, CHAMPION, previous.version))
    with_retries(lambda: client.delete_registered_model_alias(model_name, PREVIOUS))
    if current is not None:
        with_retries(lambda: client.set_registered_model_alias(model_name, CHALLENGER, current.version))
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


def _record(client: MlflowClient, decision: Decision, parent_run_id: str | None) -> None:
    outcome = "promoted to champion" if decision.promoted else "kept as challenger"
    for key, value in {"charlm.decision": outcome, "charlm.reason": decision.reason}.items():
        with_retries(
            lambda key=key, value=value: client.set_model_version_tag(decision.model_name, decision.version, key, value)
        )
        if parent_run_id:
            with_retries(lambda key=key, value=value: client.set_tag(parent_run_id, key, value))
