"""Typed, validated run configuration and named presets.

A misspelled field fails loudly (``extra="forbid"``); presets are plain functions
of the architecture name, looked up by name in :data:`PRESETS`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from charlm.models import get_architecture


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(_Strict):
    architecture: str
    embedding_dim: int = Field(42, ge=1)
    hidden_size: int = Field(256, ge=1)
    num_layers: int = Field(1, ge=1)
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="between stacked layers and before the output layer")
    embedding_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="drop whole characters' embeddings (AWD)")
    weight_drop: float = Field(0.0, ge=0.0, lt=1.0, description="DropConnect on hidden-to-hidden weights (AWD)")
    locked_dropout: bool = Field(
        False, description="variational dropout: one mask per sequence, shared by its time steps (AWD)"
    )
    input_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="on the embedding's outputs (AWD's dropouti)")
    output_dropout: float | None = Field(
        None, ge=0.0, lt=1.0, description="before the output layer (AWD's dropout); None: the same as dropout"
    )
    activation_reg: float = Field(
        0.0, ge=0.0, description="AR: this times the mean square of the last layer's dropped outputs (AWD's alpha)"
    )
    temporal_activation_reg: float = Field(
        0.0,
        ge=0.0,
        description="TAR: this times the mean square of the last layer's step-to-step output changes (AWD's beta)",
    )
    proj_size: int = Field(
        0,
        ge=0,
        description="LSTM only: each layer's output projected down to this size (nn.LSTM's proj_size, LSTMP); 0: none",
    )

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        arch = get_architecture(self.architecture)
        regularised = (
            self.dropout
            or self.embedding_dropout
            or self.weight_drop
            or self.input_dropout
            or self.output_dropout
            or self.activation_reg
            or self.temporal_activation_reg
        )
        if not arch.model_class.supports_layers and (self.num_layers != 1 or regularised or self.locked_dropout):
            raise ValueError(
                f"{self.architecture} is a single hand-written layer: num_layers must be 1, dropout, "
                f"embedding_dropout, weight_drop, input_dropout, output_dropout, activation_reg and "
                f"temporal_activation_reg 0 and locked_dropout off (got {self.num_layers}, {self.dropout}, "
                f"{self.embedding_dropout}, {self.weight_drop}, {self.input_dropout}, {self.output_dropout}, "
                f"{self.activation_reg}, {self.temporal_activation_reg}, {self.locked_dropout})"
            )
        if self.proj_size and not arch.model_class.projects:
            raise ValueError(f"proj_size is for an LSTM's layers; {self.architecture} has none")
        if self.proj_size >= self.hidden_size:
            raise ValueError(f"proj_size {self.proj_size} must be below hidden_size {self.hidden_size}")
        return self


class DataConfig(_Strict):
    batch_size: int = Field(64, ge=1)
    context: int = Field(8, ge=1, description="window length, sequence length or bptt, by layout")
    random_bptt: bool = Field(False, description="fastai's randomised bptt length (stream layout only)")
    random_offset: bool = Field(
        False,
        description="each training epoch starts its bptt spans at a random offset below the bptt, so the "
        "truncation boundaries move from epoch to epoch (stream layout only; with fixed_shape the columns' "
        "first few characters are skipped that epoch instead of making a short first batch)",
    )
    fixed_shape: bool = Field(
        False, description="every training batch the same shape: the ragged last batch of an epoch is dropped"
    )
    valid_batch_size: int | None = Field(
        None, ge=1, description="validation batch (columns of a stream); None: batch_size"
    )
    lowercase: bool = False
    min_freq: int = Field(1, ge=1)
    valid_fraction: float = Field(0.2, gt=0.0, lt=1.0)

    @property
    def validation_batch_size(self) -> int:
        """The columns (stream) or rows that validation reads: what training measured every epoch's
        ``val_loss`` with, so what every later evaluation of the run's models must use to compare."""
        return self.valid_batch_size or self.batch_size


class OptimConfig(_Strict):
    weight_decay: float = Field(0.0, ge=0.0)
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float | None = Field(None, gt=0.0)


class DistillConfig(_Strict):
    """Train toward other models' predictions (knowledge distillation, Hinton et al. 2015): the
    training target at each character is ``weight`` × the teachers' mean next-character distribution
    + (1 − ``weight``) × the character itself. The teachers are checkpoints of stateful models on
    the same vocabulary (a run's seeds or snapshots); their distributions are computed once, before
    training, reading each training column from its start (see :mod:`charlm.distill`)."""

    teachers: tuple[str, ...] = Field(min_length=1, description="checkpoint files whose ensemble teaches")
    weight: float = Field(
        0.9, gt=0.0, le=1.0, description="share of the teachers' distribution in the target (1: theirs alone)"
    )


class AverageConfig(_Strict):
    """Serve a running average of the weights the optimiser visits (stochastic weight averaging,
    Izmailov et al. 2018; AWD-LSTM's averaged SGD): after ``start_epoch`` epochs, the average is
    updated after every optimiser step, and from then on the run's model — its ``val_loss``, its
    checkpoints, what it registers — is the average, while training goes on from the raw weights
    (their loss is logged as ``val_loss_raw``). Start it inside the last low-rate phase (after a
    warm restart, not before one: weights on either side of a restart are not one basin)."""

    start_epoch: int = Field(ge=0, description="epochs trained before averaging begins")
    decay: float | None = Field(
        None,
        gt=0.0,
        lt=1.0,
        description="None: the equal-weight mean of every step's weights since start_epoch (SWA); "
        "a float: an exponential moving average with this decay per step",
    )


class Phase(_Strict):
    """One part of the learning-rate schedule.

    ``constant``: ``lr`` for ``epochs`` epochs (a list of constant phases is the
    notebook's step-down ``set_lrs``). ``sgdr``: cosine annealing from ``lr`` to
    ``lr_min`` with warm restarts; cycle ``k`` lasts ``cycle_len * cycle_mult**k``
    epochs, and ``epochs`` is their sum.
    """

    kind: Literal["constant", "sgdr"] = "constant"
    lr: float = Field(gt=0.0)
    epochs: int | None = Field(None, ge=1)
    cycles: int = Field(1, ge=1)
    cycle_len: int = Field(1, ge=1)
    cycle_mult: int = Field(2, ge=1)
    lr_min: float = Field(0.0, ge=0.0)

    @model_validator(mode="after")
    def _check(self) -> Phase:
        if self.kind == "constant" and self.epochs is None:
            raise ValueError("a constant phase needs epochs")
        if self.kind == "sgdr":
            derived = sum(self.cycle_len * self.cycle_mult**k for k in range(self.cycles))
            if self.epochs is not None and self.epochs != derived:
                raise ValueError(
                    f"sgdr phase: {self.cycles} cycles of {self.cycle_len} epoch(s) × {self.cycle_mult}^k "
                    f"last {derived} epochs, not {self.epochs}"
                )
            if self.lr_min >= self.lr:
                raise ValueError(f"sgdr phase: lr_min {self.lr_min} must be below lr {self.lr}")
        return self

    @property
    def cycle_lengths(self) -> list[int]:
        if self.kind == "constant":
            return []
        return [self.cycle_len * self.cycle_mult**k for k in range(self.cycles)]

    @property
    def total_epochs(self) -> int:
        return self.epochs if self.kind == "constant" else sum(self.cycle_lengths)  # type: ignore[return-value]

    @classmethod
    def constant(cls, lr: float, epochs: int) -> Phase:
        return cls(kind="constant", lr=lr, epochs=epochs)

    @classmethod
    def sgdr(cls, lr: float, cycles: int, cycle_len: int = 1, cycle_mult: int = 2, lr_min: float = 0.0) -> Phase:
        return cls(kind="sgdr", lr=lr, cycles=cycles, cycle_len=cycle_len, cycle_mult=cycle_mult, lr_min=lr_min)


class RunConfig(_Strict):
    model: ModelConfig
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    schedule: tuple[Phase, ...] = Field(min_length=1)
    seed: int = 0
    device: str = Field("auto", description="'auto' (CUDA when available), 'cpu', 'cuda' or 'cuda:N'")
    log_every: int = Field(10, ge=1, description="steps between training-loss reports to hooks")
    checkpoint_every: int | None = Field(None, ge=1, description="also checkpoint every N steps mid-epoch")
    checkpoint_minutes: float | None = Field(
        5.0, gt=0, description="also checkpoint last.pt mid-epoch after this many minutes of training (None: off)"
    )
    progress: bool = Field(True, description="show a progress bar when stderr is a terminal")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto",
        description="autocast: 'auto' is bf16 on a CPU with AVX512-BF16/AMX where the trainer measures the "
        "model's step faster in it, and fp32 elsewhere, a GPU included (measured faster there for these "
        "models); 'bf16' or 'fp16' (with a gradient scaler) asks for it",
    )
    cuda_graph: bool = Field(
        False, description="capture the whole training step in a CUDA graph (needs data.fixed_shape and one GPU)"
    )
    distill: DistillConfig | None = Field(None, description="train toward teacher checkpoints' predictions")
    average: AverageConfig | None = Field(None, description="serve a running average of the weights (SWA / EMA)")

    @model_validator(mode="after")
    def _check(self) -> RunConfig:
        arch = get_architecture(self.model.architecture)
        if self.model.architecture == "char3" and self.data.context != 3:
            raise ValueError(f"char3 reads exactly 3 characters: data.context must be 3, got {self.data.context}")
        for flag in ("random_bptt", "random_offset"):
            if getattr(self.data, flag) and arch.layout != "stream":
                raise ValueError(f"{flag} applies to stateful models only, not {self.model.architecture}")
        if self.data.fixed_shape and self.data.random_bptt:
            raise ValueError("data.fixed_shape needs a fixed bptt: set data.random_bptt=false")
        if self.cuda_graph and not self.data.fixed_shape:
            raise ValueError(
                "cuda_graph replays one recorded step, so every batch must have its shape: "
                "set data.fixed_shape=true (and data.random_bptt=false)"
            )
        if self.distill is not None and arch.layout != "stream":
            raise ValueError(
                f"distill needs a stateful model (the teachers read whole columns), not {self.model.architecture}"
            )
        if self.distill is not None and self.cuda_graph:
            raise ValueError("distill runs its steps eagerly: set cuda_graph=false")
        if self.average is not None and self.average.start_epoch >= self.epochs:
            raise ValueError(
                f"average.start_epoch {self.average.start_epoch} leaves nothing to average: "
                f"the schedule lasts {self.epochs} epochs"
            )
        if self.cuda_graph and self.device == "cpu":
            raise ValueError("cuda_graph needs a CUDA device, not device='cpu'")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        return self

    @property
    def architecture(self) -> str:
        return self.model.architecture

    @property
    def epochs(self) -> int:
        return sum(p.total_epochs for p in self.schedule)

    def flat(self) -> dict[str, Any]:
        """Dotted keys → values, for experiment-tracking parameters."""
        out: dict[str, Any] = {}
        for section in ("model", "data", "optim"):
            for key, value in getattr(self, section).model_dump().items():
                out[f"{section}.{key}"] = value
        for i, phase in enumerate(self.schedule):  # a constant phase has no SGDR fields
            fields = ("kind", "lr", "epochs") if phase.kind == "constant" else tuple(Phase.model_fields)
            for key in fields:
                out[f"schedule.{i}.{key}"] = phase.total_epochs if key == "epochs" else getattr(phase, key)
        if self.distill is not None:
            out.update({"distill.teachers": ",".join(self.distill.teachers), "distill.weight": self.distill.weight})
        if self.average is not None:
            average = self.average
            out.update({"average.kind": "ema" if average.decay else "swa", "average.start_epoch": average.start_epoch})
            if average.decay is not None:
                out["average.decay"] = average.decay
        out.update(seed=self.seed, epochs=self.epochs)
        return out

    def override(self, assignments: dict[str, Any] | list[str]) -> RunConfig:
        """A copy with dotted-key overrides (``{"model.hidden_size": 128}`` or ``["model.hidden_size=128"]``)."""
        if isinstance(assignments, list):
            assignments = self.parse_overrides(assignments)
        data = self.model_dump()
        data["schedule"] = list(data["schedule"])
        for key, value in assignments.items():
            *path, leaf = key.split(".")
            node: Any = data
            for part in path:  # a schedule phase by its index: schedule.0.lr
                if isinstance(node, list) and part.isdigit() and int(part) < len(node):
                    node = node[int(part)]
                elif isinstance(node, dict) and part in node:
                    node = node[part]
                else:
                    raise ValueError(f"override {key!r}: no such config section {part!r}")
            if not isinstance(node, dict) or leaf not in node:
                raise ValueError(f"override {key!r}: no such config field {leaf!r}")
            node[leaf] = value
        return RunConfig.model_validate(data)

    @staticmethod
    def parse_overrides(items: list[str]) -> dict[str, Any]:
        """``["model.hidden_size=128"]`` → ``{"model.hidden_size": 128}``."""
        pairs: dict[str, Any] = {}
        for item in items:
            key, sep, value = item.partition("=")
            if not sep:
                raise ValueError(f"override {item!r}: expected key=value")
            pairs[key.strip()] = _parse_scalar(value.strip())
        return pairs


def _parse_scalar(text: str) -> Any:
    if text[:1] in ("[", "{"):  # a list or a section as JSON: schedule=[{"kind": "sgdr", "lr": 0.003, …}]
        try:
            return json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"override value {text!r}: not valid JSON ({err.msg} at column {err.colno})") from None
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


# --------------------------------------------------------------------------- presets

_STATEFUL_DATA = DataConfig(batch_size=64, context=8, random_bptt=True, lowercase=True, min_freq=3)
_WINDOW_DATA = DataConfig(batch_size=512, context=8)

# The notebook's settings per architecture (fast.ai 2018 lesson 6, lesson6-rnn.ipynb):
# sizes, batch layout, Adam learning rates and the epochs of each step-down stage.
_NOTEBOOK: dict[str, tuple[ModelConfig, DataConfig, OptimConfig, tuple[Phase, ...]]] = {
    "char3": (
        ModelConfig(architecture="char3"),
        DataConfig(batch_size=512, context=3),
        OptimConfig(),
        (Phase.constant(1e-2, 1), Phase.constant(1e-3, 1)),
    ),
    "char_loop": (
        ModelConfig(architecture="char_loop"),
        _WINDOW_DATA,
        OptimConfig(),
        (Phase.constant(1e-2, 1), Phase.constant(1e-3, 1)),
    ),
    "char_loop_concat": (
        ModelConfig(architecture="char_loop_concat"),
        _WINDOW_DATA,
        OptimConfig(),
        (Phase.constant(1e-3, 1), Phase.constant(1e-4, 1)),
    ),
    "char_rnn": (
        ModelConfig(architecture="char_rnn"),
        _WINDOW_DATA,
        OptimConfig(),
        (Phase.constant(1e-3, 4), Phase.constant(1e-4, 2)),
    ),
    "seq_rnn": (
        ModelConfig(architecture="seq_rnn"),
        _WINDOW_DATA,
        OptimConfig(),
        (Phase.constant(1e-3, 4), Phase.constant(1e-4, 1)),
    ),
    "seq_rnn_identity": (
        ModelConfig(architecture="seq_rnn_identity"),
        _WINDOW_DATA,
        OptimConfig(),
        (Phase.constant(1e-2, 4), Phase.constant(1e-3, 4)),
    ),
    "stateful_rnn": (
        ModelConfig(architecture="stateful_rnn"),
        _STATEFUL_DATA,
        OptimConfig(),
        (Phase.constant(1e-3, 4), Phase.constant(1e-4, 2)),
    ),
    "stateful_rnn_cell": (
        ModelConfig(architecture="stateful_rnn_cell"),
        _STATEFUL_DATA,
        OptimConfig(),
        (Phase.constant(1e-3, 4), Phase.constant(1e-4, 2)),
    ),
    "stateful_gru": (
        ModelConfig(architecture="stateful_gru"),
        _STATEFUL_DATA,
        OptimConfig(),
        (Phase.constant(1e-3, 6), Phase.constant(1e-4, 3)),
    ),
    # LayerOptimizer(Adam, 1e-2, wd=1e-5): 2 epochs, then CosAnneal(cycle_mult=2) for 2**4-1 epochs.
    # nn.LSTM(..., dropout=0.5) drops out between the layers; nothing drops out before l_out.
    "stateful_lstm": (
        ModelConfig(architecture="stateful_lstm", hidden_size=512, num_layers=2, dropout=0.5, output_dropout=0.0),
        _STATEFUL_DATA,
        OptimConfig(weight_decay=1e-5),
        (Phase.constant(1e-2, 2), Phase.sgdr(1e-2, cycles=4, cycle_len=1, cycle_mult=2)),
    ),
}


def notebook(architecture: str) -> RunConfig:
    """The notebook's sizes, layout and schedule for ``architecture``."""
    get_architecture(architecture)
    model, data, optim, schedule = _NOTEBOOK[architecture]
    return RunConfig(model=model, data=data, optim=optim, schedule=schedule, progress=True)


def notebook_full(architecture: str) -> RunConfig:
    """The notebook's LSTM trained as far as the notebook trained it, to its best figure (1.2524):
    all three of its fits — 2 epochs at 1e-2, then ``CosAnneal(cycle_mult=2)`` for 2**4-1 epochs,
    then a fresh ``CosAnneal(cycle_mult=2)`` for 2**6-1 — 80 epochs on its model (dropout 0.5
    between the layers, none before the output), layout (64 columns, random bptt around 8) and
    optimiser (Adam 1e-2, weight decay 1e-5, no clipping). The notebook ran the third fit for its
    LSTM only, so the other architectures are refused."""
    if architecture != "stateful_lstm":
        raise ValueError(f"preset notebook_full is the notebook's stateful_lstm training, not {architecture}")
    base = notebook(architecture)
    third_fit = Phase.sgdr(1e-2, cycles=6, cycle_len=1, cycle_mult=2)
    return base.model_copy(update={"schedule": (*base.schedule, third_fit)})


def tiny(architecture: str) -> RunConfig:
    """Small enough to train in seconds on a CPU: one constant epoch, then two one-epoch SGDR cycles.
    Every architecture gets the same task (lowercased text, ``min_freq`` 1), so tiny runs compare."""
    base = notebook(architecture)
    return RunConfig(
        model=base.model.model_copy(update={"embedding_dim": 8, "hidden_size": 32, "dropout": 0.0, "num_layers": 1}),
        data=base.data.model_copy(
            update={
                "batch_size": 16 if base.data.batch_size < 512 else 64,
                "lowercase": True,
                "min_freq": 1,
                "context": 3 if architecture == "char3" else 8,
            }
        ),
        optim=base.optim,
        schedule=(Phase.constant(1e-2, 1), Phase.sgdr(1e-2, cycles=2, cycle_len=1, cycle_mult=1)),
        log_every=5,
        progress=False,
    )


def awd_sgdr(architecture: str) -> RunConfig:
    """Toward the notebook's best LSTM figure (1.2524), for the stateful models, chosen by
    measurement on a 2-core CPU (``bench/time_to_quality.py --lstm-only``; the README quotes the
    figures, and whether 1.2524 is reached): the notebook's task, validation and 2 × 512 LSTM,
    regularised where AWD-LSTM puts it (embedding dropout 0.05, dropout 0.3 between the layers
    and before the output, weight-drop 0.3 on the hidden-to-hidden matrices), a fixed bptt of 32
    (one batch shape: CUDA-graph ready) on 32 columns, Adam at 3e-3 with clipping, one epoch at
    3e-3 and then the notebook's last fit: SGDR cycles of 1, 2, 4, 8, 16 and 32 epochs (64 in
    all), whose cycle snapshots the pipeline ensembles. Measured: a wider model (2 × 768) with
    lighter dropouts on the first 16 of these epochs ends higher than this one does by epoch 32.

    The other stateful models get the same recipe at their notebook sizes (a hand-written cell
    without the dropouts); only the LSTM's was measured.
    """
    base = _stateful_base("awd_sgdr", architecture)
    model = base.model
    if _layered(architecture):
        model = model.model_copy(
            update={"dropout": 0.3, "embedding_dropout": 0.05, "weight_drop": 0.3, "output_dropout": None}
        )  # output_dropout None: 0.3 before the output layer too
    return RunConfig(
        model=model,
        data=base.data.model_copy(update={"batch_size": 32, "context": 32}),
        optim=OptimConfig(weight_decay=1e-6, grad_clip=0.5),
        schedule=(Phase.constant(3e-3, 1), Phase.sgdr(3e-3, cycles=6, cycle_len=1, cycle_mult=2)),
    )


def wide_awd_sgdr(architecture: str) -> RunConfig:
    """``awd_sgdr``'s LSTM made wide for a GPU: 2 × 1024 with dropout 0.5 between the layers and
    before the output (the rest — embedding dropout 0.05, weight-drop 0.3, bptt 32 on 32 columns,
    Adam 3e-3 with clipping, 64 epochs of SGDR — is ``awd_sgdr``'s). Chosen by measurement on an
    H200 (``bench/gpu_quality.sh``, fp32, as a CUDA graph): two seeds ended at 1.2327 and 1.2413
    against 1.2524 and 1.2540 for 2 × 768 at dropout 0.4 in the same run; the README quotes the
    runs. On a GPU add ``cuda_graph=true`` (its fixed shape allows one, about 5x eager's speed
    there); on a 2-core CPU a step of it costs about 5x ``awd_sgdr``'s (README). Only the LSTM
    was measured, so the other architectures are refused."""
    if architecture != "stateful_lstm":
        raise ValueError(f"preset wide_awd_sgdr is awd_sgdr's stateful_lstm made wide, not {architecture}")
    base = awd_sgdr(architecture)
    return base.model_copy(update={"model": base.model.model_copy(update={"hidden_size": 1024, "dropout": 0.5})})


def awd_ar_sgdr(architecture: str) -> RunConfig:
    """``awd_sgdr``'s 2 × 512 LSTM with AWD-LSTM's activation regularisation added: AR 2 (an L2
    penalty on the last layer's dropped outputs) and TAR 1 (on the change of its undropped outputs
    from step to step), AWD-LSTM's word-level values; the rest — dropouts, bptt 32 on 32 columns,
    Adam 3e-3 with clipping, 64 epochs of SGDR — is ``awd_sgdr``'s. Chosen by measurement on a
    2-core CPU (``bench/time_to_quality.py --lstm-only --seeds 0 1 --set model.activation_reg=2
    --set model.temporal_activation_reg=1``, bf16): two seeds ended at best 1.2507 and 1.2303
    (median 1.2405) against ``awd_sgdr``'s 1.2592 and 1.2594, first below the notebook's 1.2524 at
    53 and 23 minutes with the whole machine per seed; three more seeds of the preset (two on
    another 2-core CPU) ended at 1.2305, 1.2490 and 1.2353 (five seeds: median best 1.2353, 1.2524
    first at a median 32.2 minutes, epoch 46); the README quotes the runs. AR and TAR cost no
    measurable time a step (``bench/precision.py``: within 1% of ``awd_sgdr``'s chars/s).
    Only the LSTM was measured, so the other architectures are refused."""
    if architecture != "stateful_lstm":
        raise ValueError(f"preset awd_ar_sgdr is awd_sgdr's stateful_lstm with AR and TAR, not {architecture}")
    base = awd_sgdr(architecture)
    model = base.model.model_copy(update={"activation_reg": 2.0, "temporal_activation_reg": 1.0})
    return base.model_copy(update={"model": model})


def awd_ar_sgdr_batch64(architecture: str) -> RunConfig:
    """``awd_ar_sgdr`` on a batch twice as large — 64 columns instead of 32 — with the learning
    rate scaled by its square root (3e-3 x sqrt(2) = 4.24e-3, in the first epoch and every SGDR
    cycle); the model, dropouts, AR and TAR, bptt 32 and 64 epochs are ``awd_ar_sgdr``'s. Half the
    updates an epoch, each a larger matrix product: in bf16 on a CPU with AVX512-BF16 or AMX an
    epoch costs about 0.8x ``awd_ar_sgdr``'s, and the notebook's best LSTM figure (1.2524) comes
    sooner. Chosen by measurement on a 2-core CPU (``bench/time_to_quality.py --lstm-only
    --lstm-preset awd_ar_sgdr_batch64``, bf16, the whole machine per seed): on an Intel Xeon with
    AMX seeds 0 / 1 / 2 first went below 1.2524 at 13.1 / 13.2 / 14.1 minutes (epochs 25, 25, 24)
    and ended at best 1.2264 / 1.2311 / 1.2241 in 34–36 minutes a seed, where ``awd_ar_sgdr``'s
    five seeds took a median 32.2 minutes to 1.2524 (epoch 46) and ended at a median best 1.2353;
    on a Zen 4 seed 0 passed 1.2524 at 20.5 minutes. The README quotes the runs. Only the LSTM was
    measured, so the other architectures are refused."""
    if architecture != "stateful_lstm":
        raise ValueError(f"preset awd_ar_sgdr_batch64 is awd_ar_sgdr's stateful_lstm on 64 columns, not {architecture}")
    base = awd_ar_sgdr(architecture)
    lr = 4.24e-3  # 3e-3 x sqrt(64 / 32), rounded as measured
    return base.model_copy(
        update={
            "data": base.data.model_copy(update={"batch_size": 64}),
            "schedule": tuple(phase.model_copy(update={"lr": lr}) for phase in base.schedule),
        }
    )


def _layered(architecture: str) -> bool:
    return get_architecture(architecture).model_class.supports_layers


def short_sgdr(architecture: str) -> RunConfig:
    """The notebook GRU's quality (1.3697) in the least wall time, for the stateful models, chosen
    by measurement on a 2-core CPU (``bench/time_to_quality.py``): a wider model than the notebook's
    GRU, no dropout (too few epochs to overfit), a fixed bptt, Adam at 4e-3 with clipping, and a
    schedule two or three epochs long that ends on a cosine to zero.

    * ``stateful_lstm`` — one layer of 512 on 32 columns with a bptt of 32 (twice the updates per
      epoch of 64 columns, and the fastest shape on a CPU): one epoch at 4e-3, then one cosine epoch;
    * ``stateful_gru`` (and the other stateful models) — hidden 384, 64 columns, a bptt of 16, one
      cosine cycle of 3 epochs.
    """
    base = _stateful_base("short_sgdr", architecture)
    lstm = architecture == "stateful_lstm"
    data = base.data.model_copy(update={"batch_size": 32, "context": 32} if lstm else {"batch_size": 64, "context": 16})
    optim = OptimConfig(grad_clip=0.5)
    if lstm:
        model = base.model.model_copy(update={"hidden_size": 512, "num_layers": 1, "dropout": 0.0})
        schedule: tuple[Phase, ...] = (Phase.constant(4e-3, 1), Phase.sgdr(4e-3, cycles=1, cycle_len=1))
    else:
        model = base.model.model_copy(update={"hidden_size": 384})
        schedule = (Phase.sgdr(4e-3, cycles=1, cycle_len=3),)
    return RunConfig(model=model, data=data, optim=optim, schedule=schedule)


def _stateful_base(name: str, architecture: str) -> RunConfig:
    """The notebook's config of a stateful model on its task, with a fixed bptt (one batch shape:
    CUDA-graph ready) and validation measured with the notebook's 64 columns."""
    if get_architecture(architecture).layout != "stream":
        stateful = ", ".join(n for n in _NOTEBOOK if get_architecture(n).layout == "stream")
        raise ValueError(f"preset {name} is for the stateful architectures ({stateful}), not {architecture}")
    base = notebook(architecture)
    data = base.data.model_copy(update={"random_bptt": False, "fixed_shape": True, "valid_batch_size": 64})
    return base.model_copy(update={"data": data})


PRESETS: dict[str, Callable[[str], RunConfig]] = {
    "notebook": notebook,
    "notebook_full": notebook_full,
    "tiny": tiny,
    "awd_sgdr": awd_sgdr,
    "short_sgdr": short_sgdr,
    "wide_awd_sgdr": wide_awd_sgdr,
    "awd_ar_sgdr": awd_ar_sgdr,
    "awd_ar_sgdr_batch64": awd_ar_sgdr_batch64,
}


def preset(name: str, architecture: str) -> RunConfig:
    try:
        factory = PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}") from None
    return factory(architecture)
