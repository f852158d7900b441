"""One training loop for every architecture.

The loop knows the forward contract (``charlm.models``) and the layout protocol
(``charlm.data``), nothing about architecture names, and nothing about tracking
libraries: MLflow, progress reporting and snapshots plug in through
:class:`Callback` hooks.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from charlm import stopping
from charlm.checkpoint import load_checkpoint, save_checkpoint
from charlm.config import RunConfig
from charlm.cudagraph import GraphedStep
from charlm.data import PAD_INDEX, Layout, PreparedCorpus, StreamLayout, make_layout
from charlm.device import (
    DeviceError,
    PrecisionError,
    autocast_dtype,
    faster_precision,
    flush_denormals,
    measure_precisions,
    resolve_device,
    resolve_precision,
)
from charlm.models import CharModel, State, build_model, count_parameters, get_architecture, map_state
from charlm.schedule import Schedule

T = TypeVar("T")


def bits_per_char(nats: float) -> float:
    return nats / math.log(2)


def char_loss(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy in nats per predicted character; logits (B, T, V), targets (B, T)."""
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=PAD_INDEX, reduction=reduction
    )


# Validation losses at which each run records the wall-clock seconds it first reached them
# (``time_to_val_loss_<target>_s``): round marks, and the notebook's GRU (1.3697) and best LSTM (1.2524).
QUALITY_TARGETS = (1.5, 1.4, 1.3697, 1.3, 1.2524)


def time_to_targets(
    history: Sequence[dict[str, float]], targets: Sequence[float] = QUALITY_TARGETS
) -> dict[str, float]:
    """``{"1.3697": seconds}``: the elapsed wall time of the first epoch whose validation loss
    reached each target (targets never reached are absent)."""
    reached: dict[str, float] = {}
    for target in targets:
        for h in history:
            if "elapsed_s" in h and h["val_loss"] <= target:
                reached[f"{target:g}"] = h["elapsed_s"]
                break
    return reached


def autocast(device: torch.device, dtype: torch.dtype | None) -> torch.autocast:
    """Autocast to ``dtype`` on ``device`` (off when ``dtype`` is None: fp32)."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


@torch.no_grad()
def evaluate(
    module: CharModel,
    layout: Layout,
    device: torch.device,
    all_reduce: bool = False,
    amp_dtype: torch.dtype | None = None,
) -> dict[str, float]:
    """Loss (nats/char), bits/char and accuracy of ``module`` over every batch of ``layout``
    (the forward pass autocast to ``amp_dtype`` when given; the loss in fp32)."""
    was_training = module.training
    module.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss, correct, count
    state: State = None
    for inputs, targets in layout.iterate(shuffle=False):
        inputs, targets = inputs.to(device), targets.to(device)
        state = module.carry_state(state, inputs.shape[0], device)
        with autocast(device, amp_dtype):
            logits, state = module(inputs, state)
        logits = logits.float()
        sums[0] += char_loss(logits, targets, "sum").double()
        sums[1] += (logits.argmax(-1) == targets).sum()
        sums[2] += targets.numel()
    if all_reduce:
        torch.distributed.all_reduce(sums)
    module.train(was_training)
    loss, correct, count = sums.tolist()
    loss = loss / max(count, 1)
    return {"val_loss": loss, "val_bpc": bits_per_char(loss), "val_accuracy": correct / max(count, 1)}


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in a distributed run (a single process by default).

    ``device`` is the rank's device when the launcher chose it (None: the config's);
    ``restarts``, ``nnodes`` and ``node_rank`` describe the job for its records.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str | None = None
    restarts: int = 0
    nnodes: int = 1
    node_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def share(self, obj: T) -> T:
        """The main rank's ``obj`` on every rank (a broadcast; every rank must call it)."""
        if self.world_size == 1:
            return obj
        box = [obj if self.is_main else None]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]  # type: ignore[return-value]


class Callback:
    """Hooks the trainer calls; override what you need. Only the main rank calls them
    in a distributed run, unless ``all_ranks`` is true."""

    all_ranks = False

    def on_fit_start(self, trainer: Trainer) -> None: ...
    def on_step_end(self, trainer: Trainer, step: int, loss: float, lr: float) -> None: ...
    def on_epoch_end(self, trainer: Trainer, epoch: int, metrics: dict[str, float]) -> None: ...
    def on_cycle_end(self, trainer: Trainer, cycle: int, metrics: dict[str, float]) -> None: ...
    def on_checkpoint(self, trainer: Trainer, kind: str, path: Path, metrics: dict[str, float]) -> None: ...
    def on_fit_end(self, trainer: Trainer, result: FitResult) -> None: ...


@dataclass
class FitResult:
    history: list[dict[str, float]]
    best_val_loss: float
    best_epoch: int
    steps: int
    wall_time: float
    parameters: int
    checkpoints: dict[str, str] = field(default_factory=dict)
    stopped_early: bool = False

    @property
    def final(self) -> dict[str, float]:
        return self.history[-1] if self.history else {}


class EpochLogger(Callback):
    """One line per epoch on the ``charlm.progress`` logger: the console of a long run (the
    pipeline routes it to Prefect's logs) — epoch, losses, speed and the time left."""

    def __init__(self, name: str | None = None) -> None:
        self.log = logging.getLogger("charlm.progress")
        self.name = name  # what each line starts with: the job's name (`stateful_lstm-seed1`), else the architecture
        self._started = 0.0
        self._first_epoch = 0

    def on_fit_start(self, trainer: Trainer) -> None:
        self._started, self._first_epoch = time.perf_counter(), trainer.epoch
        self.log.info(
            "%s: %s parameters on %s (%s), %d epochs%s%s%s",
            self.name or trainer.config.architecture,
            f"{trainer.parameters:,}",
            trainer.device,
            trainer.precision_note,
            trainer.schedule.total_epochs,
            trainer.distill_note,
            trainer.average_note,
            trainer.resume_note,
        )

    def on_epoch_end(self, trainer: Trainer, epoch: int, metrics: dict[str, float]) -> None:
        total = trainer.schedule.total_epochs
        done = epoch + 1 - self._first_epoch
        left = (time.perf_counter() - self._started) / max(done, 1) * (total - epoch - 1)
        self.log.info(
            "%s: epoch %d/%d  train %.4f  val %.4f (%.3f bits/char)%s  %s chars/s  ETA %s",
            self.name or trainer.config.architecture,
            epoch + 1,
            total,
            metrics["train_loss"],
            metrics["val_loss"],
            metrics["val_bpc"],
            f", trained weights {metrics['val_loss_raw']:.4f}" if "val_loss_raw" in metrics else "",
            f"{metrics['chars_per_sec']:,.0f}",
            _duration(left),
        )


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return (
        f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"
    )


class _ProgressBar(Callback):
    """tqdm over the steps of each epoch, shown only on a terminal."""

    def __init__(self) -> None:
        from tqdm.auto import tqdm

        self._tqdm, self._bar = tqdm, None

    def start_epoch(self, epoch: int, total: int, done: int) -> None:
        self.close()
        self._bar = self._tqdm(total=total, initial=done, desc=f"epoch {epoch + 1}", unit="batch", leave=False)

    def on_step_end(self, trainer: Trainer, step: int, loss: float, lr: float) -> None:
        if self._bar is not None:
            self._bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", refresh=False)

    def advance(self) -> None:
        if self._bar is not None:
            self._bar.update(1)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


# fp32's and bf16's measured step seconds, per (model config, vocabulary size, batch shape, device, threads).
_MEASURED: dict[tuple[Any, ...], dict[str, float]] = {}


class Trainer:
    """Train one model of any architecture on a prepared corpus.

    ``checkpoint_dir`` receives ``last.pt`` (every epoch, and every
    ``config.checkpoint_every`` steps), ``best.pt`` (lowest validation loss) and
    ``cycle-K.pt`` at the end of each SGDR cycle (the notebook's ``on_cycle_end``).
    """

    def __init__(
        self,
        config: RunConfig,
        corpus: PreparedCorpus,
        *,
        callbacks: Sequence[Callback] = (),
        checkpoint_dir: str | os.PathLike[str] | None = None,
        device: torch.device | str | None = None,
        dist: DistInfo | None = None,
    ) -> None:
        self.config = config
        self.corpus = corpus
        self.vocab = corpus.vocab
        self.dist = dist or DistInfo()
        self.device = (
            torch.device(device) if device is not None else resolve_device(config.device, self.dist.local_rank)
        )
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.arch = get_architecture(config.architecture)
        self.schedule = Schedule(config.schedule)
        data = config.data
        rank, world_size = self.dist.rank, self.dist.world_size
        cuda = self.device.type == "cuda"
        if config.cuda_graph and not cuda:
            raise DeviceError(f"cuda_graph needs a CUDA device; this run is on {self.device}")
        if config.cuda_graph and world_size > 1:
            raise ValueError("cuda_graph is for a single-GPU run; a DDP job runs its steps eagerly")
        # The prepared corpus (a few hundred KB) lives on the device: every batch is a slice there.
        self.train_layout: Layout = make_layout(
            self.arch.layout,
            corpus.train.to(self.device),
            batch_size=data.batch_size,
            context=data.context,
            random_bptt=data.random_bptt,
            random_offset=data.random_offset,
            name="training split",
            rank=rank,
            world_size=world_size,
            fixed_shape=data.fixed_shape,
        )
        self.valid_layout: Layout = make_layout(
            self.arch.layout,
            corpus.valid.to(self.device),
            batch_size=data.validation_batch_size,
            context=data.context,
            name="validation split",
            even=False,
            rank=rank,
            world_size=world_size,
        )
        if cuda and data.fixed_shape:
            torch.backends.cudnn.benchmark = True  # one shape: the autotuned kernels are chosen once

        if not cuda:  # this thread at least; charlm's entry points flush before torch's pool starts
            flush_denormals()
        torch.manual_seed(config.seed)  # same initial weights on every rank
        self.module: CharModel = build_model(
            config.architecture, len(self.vocab), **config.model.model_dump(exclude={"architecture"})
        ).to(self.device)
        cell = getattr(type(self.module), "cell", None)  # the recurrent layer's class, if torch's
        self.precision = resolve_precision(
            config.precision,
            self.device,
            cell if isinstance(cell, type) and issubclass(cell, nn.RNNBase) else nn.Linear,
        )
        # ``auto``'s bf16 on a CPU is a candidate: kept only where this model's step measures faster in it.
        self.precision_seconds: dict[str, float] | None = None
        self._auto_choices: tuple[str, ...] = (self.precision,)
        self._precision_kept = False  # set on resuming: the precision is the checkpoint's, not this timing's
        measuring = time.perf_counter()
        if config.precision == "auto" and self.precision == "bf16" and not cuda:
            self.precision_seconds = self.dist.share(self._measure_precisions())  # rank 0's: one choice
            self._auto_choices = ("fp32", "bf16")
            self.precision = faster_precision(self.precision_seconds) if self.precision_seconds else "fp32"
        measured_s = time.perf_counter() - measuring if self.precision_seconds else 0.0
        if config.cuda_graph and self.precision == "fp16":
            raise PrecisionError("cuda_graph with fp16 (a dynamic gradient scaler): set precision=bf16 or fp32")
        self.amp_dtype = autocast_dtype(self.precision)
        # fp16 needs loss scaling; a fused optimizer takes the scale and the inf check on the GPU (no sync).
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        self.model: nn.Module = self.module
        if self.dist.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if cuda else None
            self.model = DistributedDataParallel(self.module, device_ids=ids)
        torch.manual_seed(config.seed + self.dist.rank)  # per-rank dropout streams
        lr0 = self.schedule.lr(0.0)
        fast: dict[str, Any] = {}
        if config.cuda_graph:  # a graph replays the optimizer too: its step count and lr live on the GPU
            fast = {"capturable": True, "foreach": True, "lr": torch.tensor(lr0, device=self.device)}
        elif cuda:
            fast = {"fused": True}
        self.optimizer = torch.optim.Adam(
            self.module.parameters(),
            **{"lr": lr0, **fast},
            betas=config.optim.betas,
            weight_decay=config.optim.weight_decay,
        )
        self._graphed: GraphedStep | None = GraphedStep(self) if config.cuda_graph else None
        # Weight averaging (config.average): a copy of the model whose weights are the running average,
        # updated after each step from epoch ``start_epoch`` on; it is the run's model once it has begun.
        self.average: AveragedModel | None = None
        if config.average is not None:
            decay = config.average.decay
            ema = get_ema_multi_avg_fn(decay) if decay is not None else None  # type: ignore[no-untyped-call]
            self.average = AveragedModel(self.module, multi_avg_fn=ema)
        # Distilling: the teachers' next-character distributions over this rank's training columns,
        # built when training starts (a resumed run's precision is known by then).
        self.soft_targets: torch.Tensor | None = None
        self.distill_seconds = 0.0
        self.callbacks = [c for c in callbacks if self.dist.is_main or c.all_ranks]
        self._progress = _ProgressBar() if config.progress and self.dist.is_main and sys.stderr.isatty() else None

        # Position: the next batch to run is batch `batch` of epoch `epoch`.
        self.step, self.epoch, self.batch = 0, 0, 0
        self.state: State = None
        self.history: list[dict[str, float]] = []
        self.best_val_loss, self.best_epoch = math.inf, -1
        self._loss_sum = torch.zeros((), device=self.device)  # running sums of the current epoch
        self._chars, self._train_seconds = 0, 0.0
        self.checkpoints: dict[str, str] = {}
        self._last_write = time.monotonic()  # for checkpoint_minutes
        # Wall time across resumes; it counts the precision measurement (and, in fit, the teachers'
        # table), part of this run's cost.
        self._elapsed_base, self._fit_started = measured_s, time.perf_counter()

    def _measure_precisions(self) -> dict[str, float] | None:
        """fp32's and bf16's seconds for one forward and backward pass of a copy of this model on
        its first training batch (the RNG is reseeded after, so training is unchanged by it); None
        when there is no batch to measure. One measurement per model, vocabulary size, batch shape
        and thread count in a process: two trainers of the same run agree."""
        first = next(iter(self.train_layout.iterate(shuffle=False)), None)
        if first is None:
            return None
        inputs, targets = first
        model = json.dumps(self.config.model.model_dump(mode="json"), sort_keys=True)
        key = (model, len(self.vocab), tuple(inputs.shape), str(self.device), torch.get_num_threads())
        if key not in _MEASURED:
            probe = copy.deepcopy(self.module).train()

            def step(dtype: torch.dtype | None) -> None:
                with autocast(self.device, dtype):
                    logits, _ = probe(inputs, None)
                loss, penalty = char_loss(logits.float(), targets), probe.take_penalty()
                (loss if penalty is None else loss + penalty).backward()  # type: ignore[no-untyped-call]
                probe.zero_grad(set_to_none=True)

            _MEASURED[key] = measure_precisions(step)
        return dict(_MEASURED[key])

    @property
    def bf16_step_ratio(self) -> float | None:
        """bf16's measured step time over fp32's where ``auto`` measured them (a CPU), else None."""
        if not self.precision_seconds:
            return None
        return self.precision_seconds["bf16"] / self.precision_seconds["fp32"]

    @property
    def distill_note(self) -> str:
        """``, distilled from 2 teachers (weight 0.9; their table took 31 s)``, or nothing."""
        distill = self.config.distill
        if distill is None:
            return ""
        count = len(distill.teachers)
        return (
            f", distilled from {count} teacher{'s' if count > 1 else ''} (weight {distill.weight:g}; "
            f"their table took {self.distill_seconds:.0f} s)"
        )

    @property
    def average_note(self) -> str:
        """``, serving the weights' mean from epoch 49 (SWA)``, or nothing."""
        average = self.config.average
        if average is None:
            return ""
        how = "mean (SWA)" if average.decay is None else f"moving average (EMA, decay {average.decay:g})"
        return f", serving the weights' {how} from epoch {average.start_epoch + 1}"

    @property
    def resume_note(self) -> str:
        """``, resuming at epoch 33`` for a trainer restored from a checkpoint, or nothing."""
        return f", resuming at epoch {self.epoch + 1}" if self.step else ""

    @property
    def precision_note(self) -> str:
        """The precision, and for ``auto`` on a CPU what decided it:
        ``fp32 (auto: a bf16 step took 1.33x fp32's here)``; for a resumed run, the one it began in,
        whatever this process measured: ``bf16 (auto, as the run began; a bf16 step took 0.95x fp32's here)``."""
        ratio = self.bf16_step_ratio
        if ratio is None:
            return self.precision
        if self._precision_kept:
            return f"{self.precision} (auto, as the run began; a bf16 step took {ratio:.2f}x fp32's here)"
        return f"{self.precision} (auto: a bf16 step took {ratio:.2f}x fp32's here)"

    # ------------------------------------------------------------------ metrics

    @property
    def parameters(self) -> int:
        return count_parameters(self.module)

    @property
    def averaged(self) -> bool:
        """Whether the weight average has begun: from then on it is the run's model."""
        return self.average is not None and int(self.average.n_averaged) > 0

    @property
    def served(self) -> CharModel:
        """The model this run offers now: the weight average once it has begun, else the trained one."""
        if self.average is not None and self.averaged:
            return cast(CharModel, self.average.module)
        return self.module

    def evaluate(self, layout: Layout | None = None, module: CharModel | None = None) -> dict[str, float]:
        """Validation metrics of ``module`` (default: :attr:`served`) over the whole validation
        split, summed across ranks."""
        module = self.served if module is None else module
        return evaluate(module, layout or self.valid_layout, self.device, self.dist.world_size > 1, self.amp_dtype)

    @property
    def elapsed(self) -> float:
        """Wall-clock seconds this training has run (validation and checkpoints included; a resumed
        run continues its checkpoint's count)."""
        return self._elapsed_base + time.perf_counter() - self._fit_started

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            if isinstance(group["lr"], torch.Tensor):
                group["lr"].fill_(lr)  # on the device: no host round trip
            else:
                group["lr"] = lr

    def train_step(self, inputs: torch.Tensor, targets: torch.Tensor, soft: torch.Tensor | None = None) -> torch.Tensor:
        """One optimisation step on one batch; the loss, still on the device (no sync). ``soft``:
        the teachers' distributions for these targets, when distilling (see :meth:`soft_batch`)."""
        if self._graphed is not None:
            return self._graphed(inputs, targets)
        return self.eager_step(inputs, targets, soft)

    def teacher_targets(self) -> torch.Tensor | None:
        """When distilling, the teachers' table (:func:`charlm.distill.teacher_table`), built on
        first use under this run's autocast; None otherwise."""
        if self.config.distill is not None and self.soft_targets is None:
            from charlm.distill import load_teachers, teacher_table

            assert isinstance(self.train_layout, StreamLayout)  # RunConfig refuses distill otherwise
            building = time.perf_counter()
            teachers = load_teachers(self.config.distill.teachers, self.vocab, self.device)
            self.soft_targets = teacher_table(teachers, self.train_layout, self.amp_dtype)
            self.distill_seconds = time.perf_counter() - building
        return self.soft_targets

    def soft_batch(self, item: tuple[int, int]) -> torch.Tensor | None:
        """The teachers' distributions for the targets of the batch ``item`` of a training plan."""
        if self.soft_targets is None:
            return None
        start, length = item
        return self.soft_targets[:, start : start + length]

    def forward(self, inputs: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """The forward pass under autocast; the logits in fp32 whatever it ran in."""
        with autocast(self.device, self.amp_dtype):
            logits, state = self.model(inputs, state)
        return logits.float(), state

    def forward_loss(self, inputs: torch.Tensor, targets: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """The forward pass under autocast, and the loss in fp32 whatever the forward ran in."""
        logits, state = self.forward(inputs, state)
        return char_loss(logits, targets), state

    def objective(self, loss: torch.Tensor) -> torch.Tensor:
        """What a step differentiates: ``loss`` plus the penalty the model's forward pass left
        (AWD's AR and TAR, when configured). The step still reports ``loss`` alone."""
        penalty = self.module.take_penalty()
        return loss if penalty is None else loss + penalty

    def eager_step(self, inputs: torch.Tensor, targets: torch.Tensor, soft: torch.Tensor | None = None) -> torch.Tensor:
        module, optimizer, clip = self.module, self.optimizer, self.config.optim.grad_clip
        self.state = module.carry_state(self.state, inputs.shape[0], self.device)
        if soft is None:
            loss, self.state = self.forward_loss(inputs, targets, self.state)
            reported = loss
        else:
            from charlm.distill import distill_loss

            assert self.config.distill is not None  # soft targets exist only when distilling
            logits, self.state = self.forward(inputs, self.state)
            log_probs = torch.log_softmax(logits, dim=-1)
            loss, reported = distill_loss(log_probs, targets, soft, self.config.distill.weight, PAD_INDEX)
        optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(self.objective(loss)).backward()  # type: ignore[no-untyped-call]
        if clip is not None:
            self.scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(module.parameters(), clip)
        self.scaler.step(optimizer)
        self.scaler.update()
        return reported.detach()

    # ------------------------------------------------------------------ training

    def _call(self, hook: str, *args: Any) -> None:
        for cb in self.callbacks:
            getattr(cb, hook)(self, *args)

    def fit(self, max_steps: int | None = None) -> FitResult:
        """Train to the end of the schedule (or stop after ``max_steps`` total steps)."""
        started = self._fit_started = time.perf_counter()
        self.teacher_targets()  # within the run's wall time: part of its cost
        self._call("on_fit_start")
        if self._progress:
            self.callbacks.append(self._progress)
        stopped = False
        try:
            while self.epoch < self.schedule.total_epochs:
                if max_steps is not None and self.step >= max_steps:
                    stopped = True
                    break
                stopped = not self._run_epoch(max_steps)
                if stopped:
                    break
        finally:
            if self._progress:
                self._progress.close()
                self.callbacks.remove(self._progress)
        result = FitResult(
            history=list(self.history),
            best_val_loss=self.best_val_loss,
            best_epoch=self.best_epoch,
            steps=self.step,
            wall_time=time.perf_counter() - started,
            parameters=self.parameters,
            checkpoints=dict(self.checkpoints),
            stopped_early=stopped,
        )
        self._call("on_fit_end", result)
        return result

    def _run_epoch(self, max_steps: int | None) -> bool:
        """Run the rest of the current epoch; False if ``max_steps`` stopped it early."""
        epoch, seed = self.epoch, self.config.seed
        plan = self.train_layout.plan(epoch, seed, shuffle=True)
        if self.batch == 0:
            self.state = None  # a fresh hidden state each epoch (fastai's model.reset())
        if self._progress:
            self._progress.start_epoch(epoch, len(plan), self.batch)
        device, log_every = self.device, self.config.log_every
        layout, lr_at = self.train_layout, self.schedule.lr
        average = self.average if self.config.average and epoch >= self.config.average.start_epoch else None
        tick = time.perf_counter()
        for index in range(self.batch, len(plan)):
            inputs, targets = layout.batch(plan[index])  # slices of the device-resident corpus
            self.set_lr(lr_at(epoch + (layout.progress(plan, index - 1) if index else 0.0)))
            loss = self.train_step(inputs, targets, self.soft_batch(plan[index]))
            if average is not None:
                average.update_parameters(self.module)

            self.step += 1
            self.batch = index + 1
            count = targets.numel()
            self._loss_sum += loss * count
            self._chars += count
            if self._progress:
                self._progress.advance()
            if self.step % log_every == 0 and self.callbacks:
                self._call("on_step_end", self.step, loss.item(), self.lr)
            every = self.config.checkpoint_every
            due = every and self.step % every == 0
            if self.step % log_every == 0 and not due:  # a stop or a restart loses minutes, not an epoch
                due = self._checkpoint_is_due()
            if due and self.batch < len(plan):
                self._train_seconds += time.perf_counter() - tick
                tick = time.perf_counter()
                self.checkpoint()
            if max_steps is not None and self.step >= max_steps and self.batch < len(plan):
                self._train_seconds += time.perf_counter() - tick
                return False
            if stopping.requested() is not None:
                self._train_seconds += time.perf_counter() - tick
                self._stop()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        self._train_seconds += time.perf_counter() - tick
        self._end_epoch()
        return True

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def _checkpoint_is_due(self) -> bool:
        """``checkpoint_minutes`` of training since the last write (every rank agrees: rank 0's clock)."""
        minutes = self.config.checkpoint_minutes
        if minutes is None or self.checkpoint_dir is None:
            return False
        due = time.monotonic() - self._last_write >= minutes * 60
        if self.dist.world_size > 1:
            flag = torch.tensor([float(due)], device=self.device)
            torch.distributed.broadcast(flag, src=0)
            due = bool(flag.item())
        return due

    def _stop(self) -> None:
        """A stop was requested: leave a checkpoint to resume from exactly, then raise. (A DDP rank
        does not: its peers may be gone, and ``last.pt`` of the last epoch or mid-epoch checkpoint
        is a consistent one.)"""
        reason = stopping.requested() or "stop requested"
        if self.dist.world_size == 1:
            self.checkpoint()
        raise stopping.TrainingStopped(f"{self.config.architecture}: stopped at step {self.step} ({reason})")

    def _end_epoch(self) -> None:
        epoch = self.epoch
        sums = torch.stack(
            [self._loss_sum.double(), torch.tensor(float(self._chars), dtype=torch.float64, device=self.device)]
        )
        if self.dist.world_size > 1:
            torch.distributed.all_reduce(sums)
        loss_sum, chars = sums.tolist()
        train_loss = loss_sum / max(chars, 1)
        metrics = {
            "epoch": epoch + 1,
            "train_loss": train_loss,
            "train_bpc": bits_per_char(train_loss),
            **self.evaluate(),
            **({"val_loss_raw": self.evaluate(module=self.module)["val_loss"]} if self.averaged else {}),
            "chars_per_sec": chars / max(self._train_seconds, 1e-9),
            "lr": self.lr,
            "step": self.step,
            "elapsed_s": self.elapsed,
        }
        self.history.append(metrics)
        self.epoch, self.batch = epoch + 1, 0
        self.state = None
        self._loss_sum.zero_()
        self._chars, self._train_seconds = 0, 0.0
        improved = metrics["val_loss"] < self.best_val_loss
        if improved:
            self.best_val_loss, self.best_epoch = metrics["val_loss"], epoch + 1
        self._call("on_epoch_end", epoch, metrics)
        # last.pt is the resume point, so it is written after the files it vouches for: a run killed in
        # between resumes from the previous last.pt, trains this epoch again and writes them again.
        if improved:
            self._write("best", metrics)
        cycle = self.schedule.cycle_ending_at(epoch)
        if cycle is not None:
            self._write(f"cycle-{cycle}", metrics)
        self._write("last", metrics)
        if cycle is not None:
            self._call("on_cycle_end", cycle, metrics)

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        rng = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {
            "config": self.config.model_dump(mode="json"),
            "precision": self.precision,  # what `auto` chose: a resumed run continues in it
            "vocab": self.vocab.to_dict(),
            "model": self.served.state_dict(),  # what the run offers (never the DDP wrapper)
            "optimizer": self.optimizer.state_dict(),
            "progress": {"step": self.step, "epoch": self.epoch, "batch": self.batch, "elapsed_s": self.elapsed},
            "scaler": self.scaler.state_dict(),
            "state": map_state(self.state, lambda s: s.detach().cpu()),
            "epoch_sums": {
                "loss_sum": float(self._loss_sum),
                "chars": self._chars,
                "train_seconds": self._train_seconds,
            },
            "rng": rng,
            "history": self.history,
            "best": {"val_loss": self.best_val_loss, "epoch": self.best_epoch},
            "world_size": self.dist.world_size,
            # Averaging: "model" is the average; training resumes from these weights.
            **(
                {"training_model": self.module.state_dict(), "average": {"count": int(self.average.n_averaged)}}
                if self.average is not None and self.averaged
                else {}
            ),
        }

    def save_checkpoint(self, path: str | os.PathLike[str]) -> Path:
        return save_checkpoint(self.state_dict(), path)

    def checkpoint(self) -> None:
        """``last.pt`` where training stands (mid-epoch too); every rank takes part (the sums are global)."""
        if self.checkpoint_dir is None:
            return
        sums = {"loss_sum": float(self._loss_sum), "chars": self._chars}
        if self.dist.world_size > 1:
            both = torch.tensor([sums["loss_sum"], float(sums["chars"])], dtype=torch.float64, device=self.device)
            torch.distributed.all_reduce(both)
            sums = {"loss_sum": both[0].item(), "chars": int(both[1].item())}
        self._write("last", {}, epoch_sums=sums)

    def _write(self, kind: str, metrics: dict[str, float], epoch_sums: dict[str, Any] | None = None) -> None:
        if self.checkpoint_dir is None or not self.dist.is_main:
            return
        payload = self.state_dict()
        if epoch_sums is not None:
            payload["epoch_sums"].update(epoch_sums)
        path = save_checkpoint(payload, self.checkpoint_dir / f"{kind}.pt")
        self._last_write = time.monotonic()
        self.checkpoints[kind] = str(path)
        self._call("on_checkpoint", kind, path, metrics)

    def load_state_dict(self, payload: dict[str, Any]) -> None:
        if payload["vocab"] != self.vocab.to_dict():
            raise ValueError("checkpoint vocabulary differs from the corpus vocabulary: cannot resume on this data")
        self.module.load_state_dict(payload.get("training_model", payload["model"]))
        if self.average is not None and "average" in payload:
            self.average.module.load_state_dict(payload["model"])
            self.average.n_averaged.fill_(payload["average"]["count"])
        self.optimizer.load_state_dict(payload["optimizer"])
        for group in self.optimizer.param_groups:  # a graph's lr is a device tensor, an eager one a float
            lr = float(group["lr"])
            group["lr"] = torch.tensor(lr, device=self.device) if self._graphed is not None else lr
        saved = payload.get("precision")
        if self.config.precision == "auto" and saved in self._auto_choices:  # not a timing's second opinion
            self.precision, self.amp_dtype = saved, autocast_dtype(saved)
            self._precision_kept = True
        progress = payload["progress"]
        self.step, self.epoch, self.batch = progress["step"], progress["epoch"], progress["batch"]
        self._elapsed_base = progress.get("elapsed_s", 0.0)  # fit() restarts the clock
        if payload.get("scaler"):
            self.scaler.load_state_dict(payload["scaler"])
        single = self.dist.world_size == 1 and payload.get("world_size", 1) == 1
        # The carried hidden state is rank 0's; in a distributed run every rank restarts its rows from zero.
        self.state = map_state(payload["state"], lambda s: s.to(self.device)) if single and self.batch else None
        sums = payload["epoch_sums"]
        # Mid-epoch sums are global (reduced before saving): rank 0 carries them, the others start at zero.
        keep = self.dist.is_main
        self._loss_sum = torch.tensor(sums["loss_sum"] if keep else 0.0, device=self.device)
        self._chars, self._train_seconds = (sums["chars"] if keep else 0), sums["train_seconds"]
        self.history = list(payload["history"])
        self.best_val_loss, self.best_epoch = payload["best"]["val_loss"], payload["best"]["epoch"]
        torch.set_rng_state(payload["rng"]["torch"])
        if "cuda" in payload["rng"] and self.device.type == "cuda":
            torch.cuda.set_rng_state(payload["rng"]["cuda"], self.device)
        if not single:  # rank 0's dropout stream was saved: give each rank its own again
            torch.manual_seed(self.config.seed + 7919 * self.step + self.dist.rank)

    @classmethod
    def resume(cls, path: str | os.PathLike[str], corpus: PreparedCorpus, **kwargs: Any) -> Trainer:
        """Rebuild a trainer from a checkpoint and continue exactly where it stopped."""
        payload = load_checkpoint(path)
        trainer = cls(RunConfig.model_validate(payload["config"]), corpus, **kwargs)
        trainer.load_state_dict(payload)
        return trainer


__all__ = [
    "Callback",
    "DistInfo",
    "EpochLogger",
    "FitResult",
    "Trainer",
    "bits_per_char",
]
