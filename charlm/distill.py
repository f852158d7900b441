"""Knowledge distillation: one model trained toward the predictions of others (Hinton, Vinyals
and Dean 2015, "Distilling the Knowledge in a Neural Network"; a student of its teachers' own
size: Furlanello et al. 2018, "Born-Again Neural Networks").

An ensemble of seeds is charlm's best model, but it costs its members' time at every character
it generates. A student trained with ``distill.teachers`` set to the seeds' checkpoints learns from
their averaged next-character distribution and costs one model.

The teachers are stateful models that do not train, so their distribution after each character
of a training column does not depend on how the column is cut into bptt spans: it is computed
once, before the first step, by reading every column from its start with the state carried
(in eval mode: no dropout). Each step then slices the student's targets out of that table, so
distilling costs one forward pass over the training split per teacher, not one per step. The
table holds ``characters × vocabulary`` floats (about 108 MB for the Nietzsche corpus's 480,714
training characters and 56 symbols, on the training device). With ``data.random_offset`` and
``data.fixed_shape`` the student skips a column's first characters in some epochs, where the
teachers read them: the teachers then know more of the column than the student, which only makes
their distribution a better target.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence

import torch

from charlm.checkpoint import CheckpointError, load_checkpoint, weights_digest
from charlm.data import StreamLayout, Vocabulary
from charlm.ensemble import SnapshotEnsemble, read_model

CHUNK = 256  # characters a column per forward pass while the table is built


def teacher_digests(paths: Sequence[str]) -> list[str]:
    """The sha256 of each teacher's weights (what a student's fingerprint depends on, not where the
    files lie): the digest a checkpoint carries, else computed."""
    out = []
    for path in paths:
        stat = os.stat(path) if os.path.isfile(path) else None
        out.append(_digest(str(path), stat.st_mtime_ns if stat else 0, stat.st_size if stat else 0))
    return out


@functools.lru_cache(maxsize=64)
def _digest(path: str, mtime_ns: int, size: int) -> str:
    payload = load_checkpoint(path)  # a missing or damaged file: CheckpointError, naming it
    return str(payload.get("checksum") or weights_digest(payload["model"]))


def load_teachers(paths: Sequence[str], vocab: Vocabulary, device: torch.device) -> SnapshotEnsemble:
    """The teachers' ensemble in eval mode; each must be a stateful model on ``vocab``."""
    members = []
    for path in paths:
        model, config, own = read_model(path, device)
        if own != vocab:
            raise CheckpointError(
                f"{path}: a teacher on another vocabulary ({len(own)} symbols, the corpus has "
                f"{len(vocab)}): distill from models trained on this corpus's vocabulary"
            )
        if model.layout != "stream":
            raise CheckpointError(
                f"{path}: a teacher must be a stateful model, not {config.architecture} (it reads windows)"
            )
        members.append(model)
    teachers = SnapshotEnsemble(members).to(device).eval()
    teachers.requires_grad_(False)
    return teachers


@torch.no_grad()
def teacher_table(
    teachers: SnapshotEnsemble, layout: StreamLayout, amp_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """``(rows, column_length, vocabulary)`` fp32: the teachers' mean probability of each next
    character after each position of each of this rank's columns, read from the column's start
    (their forward passes under autocast to ``amp_dtype``, as training's and validation's)."""
    rows = layout.rows
    count, length = rows.shape
    device = rows.device
    table: torch.Tensor | None = None
    state = None
    for start in range(0, length, CHUNK):
        tokens = rows[:, start : start + CHUNK].long()
        state = teachers.carry_state(state, count, device)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            log_probs, state = teachers(tokens, state)
        if table is None:
            table = torch.empty((count, length, log_probs.shape[-1]), dtype=torch.float32, device=device)
        table[:, start : start + tokens.shape[1]] = log_probs.float().exp()
    assert table is not None  # a layout has at least one character a column
    return table


def distill_loss(
    log_probs: torch.Tensor, targets: torch.Tensor, soft: torch.Tensor, weight: float, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss to optimise (cross-entropy against ``weight`` × ``soft`` + (1 − ``weight``) × the
    target character) and the plain cross-entropy against the targets (what the run reports as
    its training loss, comparable with a run that does not distil). ``log_probs`` ``(B, T, V)``
    fp32; positions whose target is ``ignore_index`` count in neither."""
    keep = (targets != ignore_index).float()
    kept = keep.sum().clamp_min(1.0)
    hard = -(log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1) * keep).sum() / kept
    soft_ce = -((soft * log_probs).sum(-1) * keep).sum() / kept
    return weight * soft_ce + (1.0 - weight) * hard, hard
