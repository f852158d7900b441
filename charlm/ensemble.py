"""Candidates built from a run's SGDR snapshots, with no further training.

The notebook saves a model at the end of every SGDR cycle; annealed snapshots are
better together than alone (Huang et al. 2017, "Snapshot Ensembles: Train 1, get M
for free"; Izmailov et al. 2018, stochastic weight averaging). Two ways to combine
the last M snapshots:

* :class:`SnapshotEnsemble` — the next-character distribution is the mean of the
  members' probabilities; each member carries its own hidden state. M models' cost.
* :func:`average_weights` — one model whose weights are the members' mean: the cost
  of one model. None of charlm's architectures has normalisation statistics (batch
  norm's running means) to recompute after averaging; an architecture that had them
  would need a pass over the training data here.

Both keep the forward contract of :mod:`charlm.models`, so training's evaluation,
generation and the served pyfunc use them as they use a single model.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, cast

import torch
from torch import nn

from charlm.checkpoint import CheckpointError, first_line, load_checkpoint
from charlm.config import RunConfig
from charlm.data import Vocabulary
from charlm.models import CharModel, State, build_model

Combine = Literal["ensemble", "average"]


class SnapshotEnsemble(CharModel):
    """The mean of the members' next-character probabilities, as log-probabilities (so the
    cross-entropy of its output is the loss of the averaged distribution). Its state is the
    tuple of the members' states."""

    def __init__(self, members: Sequence[CharModel]) -> None:
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        layouts = {m.layout for m in members}
        if len(layouts) != 1:
            raise ValueError(f"ensemble members must share one batch layout, got {sorted(layouts)}")
        self.members = nn.ModuleList(members)
        self.layout = members[0].layout  # type: ignore[misc]  # an instance's, from its members
        self.stateful = members[0].stateful  # type: ignore[misc]

    def init_state(self, batch_size: int, device: torch.device) -> State:
        return cast(State, tuple(m.init_state(batch_size, device) for m in self._members()))

    def carry_state(self, state: State, batch_size: int, device: torch.device) -> State:
        states = state if isinstance(state, tuple) else (None,) * len(self.members)
        carried = (m.carry_state(s, batch_size, device) for m, s in zip(self._members(), states, strict=True))
        return cast(State, tuple(carried))

    def forward(self, tokens: torch.Tensor, state: State = None) -> tuple[torch.Tensor, State]:
        states = state if isinstance(state, tuple) else (None,) * len(self.members)
        log_probs, new_states = [], []
        for member, member_state in zip(self._members(), states, strict=True):
            logits, new_state = member(tokens, member_state)
            log_probs.append(torch.log_softmax(logits.float(), dim=-1))
            new_states.append(new_state)
        count = torch.tensor(float(len(log_probs)), device=tokens.device).log()
        mixed = torch.logsumexp(torch.stack(log_probs), dim=0) - count  # log of the mean probability
        return mixed, cast(State, tuple(new_states))

    def _members(self) -> list[CharModel]:
        return list(self.members)  # type: ignore[arg-type]


def average_weights(states: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The element-wise mean of state dicts with the same keys (integer buffers: the first's)."""
    if not states:
        raise ValueError("nothing to average")
    keys = list(states[0])
    if any(list(s) != keys for s in states[1:]):
        raise ValueError("state dicts of different models cannot be averaged")
    out = {}
    for key in keys:
        first = states[0][key]
        if first.is_floating_point():
            out[key] = torch.stack([s[key].to(torch.float64) for s in states]).mean(0).to(first.dtype)
        else:
            out[key] = first.clone()
    return out


def snapshot_paths(directory: str | os.PathLike[str], last: int | None = None) -> list[Path]:
    """A run's cycle snapshots (``cycle-K.pt``) in cycle order; the last ``last`` of them."""
    found = sorted(Path(directory).glob("cycle-*.pt"), key=lambda p: int(p.stem.removeprefix("cycle-")))
    if not found:
        raise CheckpointError(f"{directory}: no SGDR snapshots (cycle-K.pt) in it")
    return found[-last:] if last else found


def combine_payloads(payloads: Sequence[dict[str, Any]], combine: Combine) -> dict[str, Any]:
    """One checkpoint-like payload for ``average`` (the members' config and vocabulary, averaged
    weights); ``ensemble`` is built by :func:`charlm.generate.LoadedModel.from_checkpoints`."""
    first = payloads[0]
    for p in payloads[1:]:
        if p["vocab"] != first["vocab"] or p["config"]["model"] != first["config"]["model"]:
            raise ValueError("snapshots of different models or vocabularies cannot be combined")
    if combine != "average":
        raise ValueError(f"combine {combine!r}: only 'average' makes one payload")
    kept = {k: v for k, v in first.items() if k in ("config", "vocab", "history", "best", "progress", "world_size")}
    return {**kept, "model": average_weights([p["model"] for p in payloads])}


def model_from_payload(payload: dict[str, Any]) -> tuple[CharModel, RunConfig, Vocabulary]:
    """The model a checkpoint payload describes, its weights loaded, with its config and vocabulary."""
    config = RunConfig.model_validate(payload["config"])
    vocab = Vocabulary.from_dict(payload["vocab"])
    model = build_model(config.architecture, len(vocab), **config.model.model_dump(exclude={"architecture"}))
    model.load_state_dict(payload["model"])
    return model, config, vocab


def read_model(
    path: str | os.PathLike[str], device: torch.device | str = "cpu"
) -> tuple[CharModel, RunConfig, Vocabulary]:
    """:func:`model_from_payload` of a checkpoint file; a readable file with the wrong contents is
    refused by name."""
    payload = load_checkpoint(path, map_location=device)
    try:
        return model_from_payload(payload)
    except (KeyError, RuntimeError, ValueError, TypeError) as err:
        raise CheckpointError(f"{path}: its contents do not make a charlm model: {first_line(err)}") from None


def load_payloads(paths: Sequence[str | os.PathLike[str]], device: torch.device | str = "cpu") -> list[dict[str, Any]]:
    return [load_checkpoint(p, map_location=device) for p in paths]
