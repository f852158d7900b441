"""The whole training step — forward, loss, backward, clipping, Adam — as one CUDA graph.

A char-RNN step on a GPU is hundreds of small kernels; launching them from Python costs
more than running them. With ``RunConfig.cuda_graph`` (which needs ``data.fixed_shape``:
one batch shape for the whole run) the step is recorded once and replayed, following
PyTorch's "whole network capture" recipe (torch.cuda.graphs):

* a few eager warm-up steps on a side stream (real steps on real batches: they train);
* static input, target and hidden-state buffers; each step copies its batch in and replays;
* Adam built with ``capturable=True`` and its learning rate a GPU tensor (set with ``fill_``),
  so the schedule moves without re-recording;
* the carried hidden state is copied into its buffer inside the graph, after the backward
  pass, so truncated BPTT needs no host work between steps.

Dropout, embedding dropout and weight-drop draw from the default CUDA generator, which
PyTorch advances per replay. fp16 (a dynamic gradient scaler) and DDP are refused by the
trainer; bf16 and fp32 are supported.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from charlm.config import RunConfig
from charlm.device import DeviceError
from charlm.models import CharModel, State, map_state

WARMUP_STEPS = 3


def _copy_state(dst: State, src: State) -> None:
    if dst is None or src is None:
        return
    pairs = zip(dst, src) if isinstance(dst, tuple) else [(dst, src)]
    for d, s in pairs:
        d.copy_(s.detach())  # type: ignore[union-attr]


class Steps(Protocol):
    """What a graphed step needs of the trainer (``charlm.training.Trainer``)."""

    state: State

    @property
    def device(self) -> torch.device: ...
    @property
    def config(self) -> RunConfig: ...
    @property
    def module(self) -> CharModel: ...
    @property
    def optimizer(self) -> torch.optim.Optimizer: ...

    def eager_step(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor: ...

    def forward_loss(self, inputs: torch.Tensor, targets: torch.Tensor, state: State) -> tuple[torch.Tensor, State]: ...

    def objective(self, loss: torch.Tensor) -> torch.Tensor: ...


class GraphedStep:
    """Callable like :meth:`Trainer.eager_step`: ``(inputs, targets) -> loss`` on the device."""

    def __init__(self, trainer: Steps, warmup: int = WARMUP_STEPS) -> None:
        self.trainer = trainer
        self.warmup_left = warmup
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_inputs = self.static_targets = self.static_loss = torch.empty(0)
        self.static_state: State = None

    def __call__(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        t = self.trainer
        if self.graph is None and self.warmup_left > 0:
            self.warmup_left -= 1
            side = torch.cuda.Stream(t.device)  # type: ignore[no-untyped-call]
            side.wait_stream(torch.cuda.current_stream(t.device))
            with torch.cuda.stream(side):
                loss = t.eager_step(inputs, targets)
            # weight-drop's masked matrices hold this step's graph: the next step's (a new side stream)
            # would reuse its AccumulateGrad nodes, which torch warns of as a stream mismatch
            t.module.release_graph()
            torch.cuda.current_stream(t.device).wait_stream(side)
            return loss
        if self.graph is None:
            self._capture(inputs, targets)
        else:
            self.static_inputs.copy_(inputs)
            self.static_targets.copy_(targets)
            if t.state is None:  # a new epoch: fresh zero state
                map_state(self.static_state, lambda s: s.zero_())
            elif t.state is not self.static_state:  # resumed, or warm-up state
                _copy_state(self.static_state, t.state)
        assert self.graph is not None
        self.graph.replay()
        t.state = self.static_state
        return self.static_loss

    def _capture(self, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        t = self.trainer
        self.static_inputs, self.static_targets = inputs.clone(), targets.clone()
        # Replacing the trainer's state drops the warm-up's autograd graph (its AccumulateGrad nodes
        # belong to the side stream; torch asks that none be alive at capture); the model's own
        # references went with release_graph after each warm-up step.
        t.state = t.module.carry_state(t.state, inputs.shape[0], t.device)
        self.static_state = map_state(t.state, lambda s: s.detach().clone())
        clip = t.config.optim.grad_clip
        t.optimizer.zero_grad(set_to_none=True)
        where = {name: p.data_ptr() for name, p in t.module.named_parameters()}
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            loss, new_state = t.forward_loss(self.static_inputs, self.static_targets, self.static_state)
            t.objective(loss).backward()  # type: ignore[no-untyped-call]
            if clip is not None:
                nn.utils.clip_grad_norm_(t.module.parameters(), clip)
            t.optimizer.step()
            _copy_state(self.static_state, new_state)  # after backward: the next step's input state
            self.static_loss = loss.detach()
        # A capture that moves a parameter's storage (nn.RNNBase re-flattening its weights did, before
        # weight-drop kept them current) leaves every replay copying its capture-time values back over
        # the optimizer's updates: that parameter would never train. Refuse rather than train wrongly.
        moved = [name for name, p in t.module.named_parameters() if p.data_ptr() != where[name]]
        if moved:
            raise DeviceError(
                f"cuda_graph: capturing the step moved the storage of {', '.join(moved)}, so replays would "
                "undo their updates; train this model with cuda_graph=false"
            )
        self.graph = graph
