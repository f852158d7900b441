"""The notebook's character models behind one registry and one forward contract.

Contract (every model): ``forward(tokens, state) -> (logits, state)`` with
``tokens`` ``(B, T)`` long, ``logits`` ``(B, T_out, V)`` unnormalised, where
``T_out`` is 1 for models that predict only the next character and ``T`` for
models that predict at every position. ``state`` is ``None`` for stateless models.

Between batches the trainer calls ``carry_state(state, batch_size)``: stateless
models return ``None``; stateful ones return the detached state (truncated BPTT)
or a fresh zero state when there is none yet or the batch size changed.
Nothing outside this module looks at an architecture's name.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

State = torch.Tensor | tuple[torch.Tensor, ...] | None


class CharModel(nn.Module):
    """Base class: the layout the model trains on and the state protocol."""

    layout: ClassVar[str]  # "window", "sequence" or "stream" (see charlm.data)
    stateful: ClassVar[bool] = False
    supports_layers: ClassVar[bool] = False  # honours num_layers and dropout
    projects: ClassVar[bool] = False  # honours proj_size (an LSTM's)

    def init_state(self, batch_size: int, device: torch.device) -> State:
        return None

    def carry_state(self, state: State, batch_size: int, device: torch.device) -> State:
        return None

    def release_graph(self) -> None:
        """Drop what the model itself keeps of the last forward pass's autograd graph (none here):
        a CUDA graph's capture wants none of its eager warm-up steps' graphs alive."""

    def take_penalty(self) -> torch.Tensor | None:
        """The regularisation term the last training forward pass added to the objective (None
        here), handed over once: the trainer adds it to the loss it differentiates, never to the
        loss it reports."""
        return None


def map_state(state: State, fn: Callable[[torch.Tensor], torch.Tensor]) -> State:
    """Apply ``fn`` to each tensor of a hidden state (None, a tensor, or an LSTM's (h, c))."""
    if state is None:
        return None
    if isinstance(state, (tuple, list)):
        return tuple(fn(s) for s in state)
    return fn(state)


def _state_batch(state: torch.Tensor | tuple[torch.Tensor, ...]) -> int:
    first = state[0] if isinstance(state, tuple) else state
    return int(first.shape[1] if first.dim() == 3 else first.shape[0])


class StatefulMixin:
    stateful: ClassVar[bool] = True
    init_state: Callable[[int, torch.device], State]  # the model's own (an annotation: shadows nothing)

    def carry_state(self, state: State, batch_size: int, device: torch.device) -> State:
        if state is None or _state_batch(state) != batch_size:
            return self.init_state(batch_size, device)
        return map_state(state, lambda s: s.detach())


# --------------------------------------------------------------------------- windowed models


class CharLoopModel(CharModel):
    """CharLoopModel: n characters, each input added to the hidden state.

    ``h_t = tanh(W_h (h_{t-1} + relu(W_in e(c_t))))`` with one input layer and one
    hidden layer shared by every position; the last ``h`` predicts the next character.
    """

    layout = "window"

    def __init__(self, vocab_size: int, embedding_dim: int, hidden_size: int, **_: object) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.embedding = nn.Embedding(vocab_size, embedding_dim)
        self.input_layer = nn.Linear(embedding_dim, hidden_size)
        self.hidden_layer = nn.Linear(hidden_size, hidden_size)
        self.output_layer = nn.Linear(hidden_size, vocab_size)

    def forward(self, tokens: torch.Tensor, state: State = None) -> tuple[torch.Tensor, State]:
        inputs = F.relu(self.input_layer(self.embedding(tokens)))  # (B, T, H)
        hidden = tokens.new_zeros((tokens.shape[0], self.hidden_size), dtype=inputs.dtype)
        for t in range(tokens.shape[1]):
            hidden = torch.tanh(self.hidden_layer(hidden + inputs[:, t]))
        return self.output_layer(hidden).unsqueeze(1), None  # (B, 1, V)


class Char3Model(CharLoopModel):
    """Char3Model: the same cell unrolled over exactly three characters (as the notebook
    writes it out by hand, ``in1``, ``in2``, ``in3``)."""

    def forward(self, tokens: torch.Tensor, state: State = None) -> tuple[torch.Tensor, State]:
        if tokens.shape[1] != 3:
            raise ValueError(f"char3 reads exactly 3 characters, got {tokens.shape[1]}")
        return super().forward(tokens, state)


class CharLoopConcatModel(CharModel):
    """CharLoopConcatModel: input concatenated with the hidden state.

    ``h_t = tanh(W_h relu(W_in [h_{t-1}; e(c_t)]))``.
    """

    layout = "window"

    def __init__(self, vocab_size: int, embedding_dim: int, hidden_size: int, **_: object) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.embedding = nn.Embedding(vocab_size, embedding_dim)
        self.input_layer = nn.Linear(embedding_dim + hidden_size, hidden_size)
        self.hidden_layer = nn.Linear(hidden_size, hidden_size)
        self.output_layer = nn.Linear(hidden_size, vocab_size)

    def forward(self, tokens: torch.Tensor, state: State = None) -> tuple[torch.Tensor, State]:
        embedded = self.embedding(tokens)  # (B, T, E)
        hidden = embedded.new_zeros((tokens.shape[0], self.hidden_size))
        for t in range(tokens.shape[1]):
            joined = torch.cat((hidden, embedded[:, t]), dim=1)  # (B, H + E)
            hidden = torch.tanh(self.hidden_layer(F.relu(self.input_layer(joined))))
        return self.output_layer(hidden).unsqueeze(1), None


# --------------------------------------------------------------------------- torch RNN models


def _keep_flat_weights(rnn: nn.RNNBase) -> None:
    """Tell ``rnn`` its weights are current, so its forward does not re-flatten them.

    Seeing a new tensor in place of a weight, ``nn.RNNBase`` calls ``flatten_parameters`` on a GPU,
    which copies every weight into a new cuDNN buffer and moves the *parameters' storage* there,
    in place. Each weight-dropped step would do that; inside a CUDA graph the capture moves them
    into the graph's memory and every replay copies their capture-time values back over them, so
    the input-to-hidden weights and the biases never train (``bench/gpu_check.py --parts 2``
    showed the graph's loss at 2.31 against eager's 1.71 with weight-drop, equal without). Left
    unflattened, cuDNN copies the weights into a scratch buffer of its own each call instead.
    (salesforce/awd-lstm-lm's ``WeightDrop`` meets the same re-flattening by replacing the module's
    ``flatten_parameters`` with a no-op; this keeps torch's own flattening and removes its trigger.)
    """
    if hasattr(rnn, "_flat_weight_refs"):  # the record _weights_have_changed reads
        rnn._flat_weight_refs = [None if w is None else weakref.ref(w) for w in rnn._flat_weights]


class _RecurrentModel(CharModel):
    """Embedding → ``nn.RNN``/``nn.GRU``/``nn.LSTM`` (batch-first) → dropout → linear.

    Regularisation where AWD-LSTM puts it (Merity et al. 2017, salesforce/awd-lstm-lm):
    ``embedding_dropout`` drops whole characters' embedding rows (``embedded_dropout``),
    ``dropout`` acts between stacked layers and before the output layer, and
    ``weight_drop`` is DropConnect on every hidden-to-hidden matrix — one mask per forward
    pass, shared by every time step, so the recurrence is regularised without touching the
    fused RNN kernel (the masked matrix is handed to ``nn.RNNBase`` in place of its own).

    ``locked_dropout`` makes every activation dropout variational, as AWD-LSTM's
    ``LockedDropout``: one mask per sequence in the batch, shared by all its time steps
    (redrawn every forward pass, i.e. every bptt batch). Between stacked layers that needs the
    layers apart, so the model then runs one single-layer RNN per layer (``self.layers``) in
    place of one stacked ``self.rnn``. ``input_dropout`` drops the embedding's outputs (AWD's
    ``dropouti``) and ``output_dropout`` the last layer's (AWD's ``dropout``; default: ``dropout``).

    ``activation_reg`` and ``temporal_activation_reg`` are AWD-LSTM's AR and TAR (Merity et al.
    2017, "Revisiting Activation Regularization for Language RNNs"; awd-lstm-lm's ``main.py``):
    in training, the first times the mean square of the last layer's outputs *after* the output
    dropout, the second times the mean square of their change from one time step to the next
    *before* it. The sum waits in :meth:`take_penalty` for the trainer; the logits are untouched.

    ``proj_size`` (an LSTM's) is ``nn.LSTM``'s projection (LSTMP, Sak et al. 2014): each layer's
    ``hidden_size`` cells are read out through a learned ``proj_size`` × ``hidden_size`` matrix, and
    the recurrence and the next layer see the ``proj_size`` outputs — wide memory, cheap matrices.
    """

    cell: ClassVar[Callable[..., nn.RNNBase]] = nn.RNN
    supports_layers = True

    def __init__(
        self,
        vocab_size: int,
        embedding_dim: int,
        hidden_size: int,
        num_layers: int = 1,
        dropout: float = 0.0,
        embedding_dropout: float = 0.0,
        weight_drop: float = 0.0,
        locked_dropout: bool = False,
        input_dropout: float = 0.0,
        output_dropout: float | None = None,
        activation_reg: float = 0.0,
        temporal_activation_reg: float = 0.0,
        proj_size: int = 0,
        **_: object,
    ) -> None:
        super().__init__()
        self.hidden_size, self.num_layers = hidden_size, num_layers
        self.output_size = proj_size or hidden_size  # what each layer outputs, and its state h
        projection = {"proj_size": proj_size} if proj_size else {}
        self.activation_reg, self.temporal_activation_reg = activation_reg, temporal_activation_reg
        self._penalty: torch.Tensor | None = None
        self.embedding_dropout, self.weight_drop = embedding_dropout, weight_drop
        self.locked_dropout, self.input_dropout, self.hidden_dropout = locked_dropout, input_dropout, dropout
        self.output_dropout = dropout if output_dropout is None else output_dropout
        self.embedding = nn.Embedding(vocab_size, embedding_dim)
        self.layers: nn.ModuleList | None = None
        if locked_dropout and num_layers > 1:  # variational dropout between the layers: one RNN per layer
            sizes = [embedding_dim] + [self.output_size] * (num_layers - 1)
            self.layers = nn.ModuleList(
                self.cell(size, hidden_size, 1, batch_first=True, **projection) for size in sizes
            )
        else:
            between = dropout if num_layers > 1 else 0.0
            self.rnn = self.cell(
                embedding_dim, hidden_size, num_layers, batch_first=True, dropout=between, **projection
            )
        if weight_drop:  # the raw matrices become ``weight_hh_lK_raw``; ``weight_hh_lK`` is set per forward
            for rnn, name in self._dropped_weights:
                raw = rnn._parameters.pop(name)
                assert raw is not None
                rnn.register_parameter(f"{name}_raw", raw)
                setattr(rnn, name, raw.detach())
        self.output_layer = nn.Linear(self.output_size, vocab_size)

    @property
    def _dropped_weights(self) -> list[tuple[nn.RNNBase, str]]:
        """(module, name) of every hidden-to-hidden matrix."""
        if self.layers is not None:
            return [(rnn, "weight_hh_l0") for rnn in self.layers]  # type: ignore[misc]
        return [(self.rnn, f"weight_hh_l{layer}") for layer in range(self.num_layers)]

    def release_graph(self) -> None:
        """The masked hidden-to-hidden matrices set on the RNN modules by the last forward carry its
        graph (back to ``weight_hh_lK_raw``'s AccumulateGrad): put plain detached copies there."""
        for rnn, name in self._dropped_weights if self.weight_drop else ():
            setattr(rnn, name, getattr(rnn, f"{name}_raw").detach())
        self._penalty = None

    def take_penalty(self) -> torch.Tensor | None:
        penalty, self._penalty = self._penalty, None
        return penalty

    def _drop(self, x: torch.Tensor, p: float) -> torch.Tensor:
        """Dropout on (B, T, F) activations: one mask per sequence with ``locked_dropout``."""
        if not (self.training and p):
            return x
        if not self.locked_dropout:
            return F.dropout(x, p, True)
        keep = 1.0 - p
        return x * x.new_empty((x.shape[0], 1, x.shape[2])).bernoulli_(keep).div_(keep)

    def init_state(self, batch_size: int, device: torch.device) -> State:
        zeros = torch.zeros(self.num_layers, batch_size, self.hidden_size, device=device)
        if self.cell is not nn.LSTM:
            return zeros
        return torch.zeros(self.num_layers, batch_size, self.output_size, device=device), zeros  # (h, c)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        weight = self.embedding.weight
        if self.training and self.embedding_dropout:
            keep = 1.0 - self.embedding_dropout
            mask = weight.new_empty((weight.shape[0], 1)).bernoulli_(keep) / keep
            weight = weight * mask
        return F.embedding(tokens, weight)

    def run(self, tokens: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        if state is None:
            state = self.init_state(tokens.shape[0], tokens.device)
        if self.weight_drop:  # nn.RNNBase.__setattr__ puts the masked matrix into its flat weights
            for rnn, name in self._dropped_weights:
                raw = getattr(rnn, f"{name}_raw")
                # (a view in eval mode: handing nn.Module the Parameter itself would register it twice)
                masked = F.dropout(raw, self.weight_drop, True) if self.training else raw.view_as(raw)
                setattr(rnn, name, masked)
            for rnn in dict.fromkeys(rnn for rnn, _ in self._dropped_weights):  # each module once
                _keep_flat_weights(rnn)
        inputs = self._drop(self.embed(tokens), self.input_dropout)  # (B, T, E)
        with warnings.catch_warnings():  # cuDNN: masked weights are not one contiguous chunk (by design)
            warnings.filterwarnings("ignore", message="RNN module weights are not part of single contiguous")
            # proj_size on a CPU: torch's own LSTM kernel instead of oneDNN's (as the README says)
            warnings.filterwarnings("ignore", message="LSTM with projections is not supported with oneDNN")
            if self.layers is None:
                outputs, state = self.rnn(inputs, state)  # (B, T, H)
            else:
                outputs, state = self._run_layers(inputs, state)
        dropped = self._drop(outputs, self.output_dropout)
        if self.training and (self.activation_reg or self.temporal_activation_reg):
            self._penalty = self._activation_penalty(outputs, dropped)
        return self.output_layer(dropped), state  # (B, T, V)

    def _activation_penalty(self, outputs: torch.Tensor, dropped: torch.Tensor) -> torch.Tensor:
        """AR on the dropped last-layer outputs plus TAR on the undropped ones, (B, T, H), in fp32."""
        penalty = outputs.new_zeros((), dtype=torch.float32)
        if self.activation_reg:
            penalty = penalty + self.activation_reg * dropped.float().pow(2).mean()
        if self.temporal_activation_reg and outputs.shape[1] > 1:
            steps = outputs.float().diff(dim=1)
            penalty = penalty + self.temporal_activation_reg * steps.pow(2).mean()
        return penalty

    def _run_layers(self, inputs: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """The stacked layers one at a time, locked dropout between them; the state as one stack."""
        assert self.layers is not None and state is not None
        outputs, states = inputs, list[Any]()
        for index, rnn in enumerate(self.layers):
            if index:
                outputs = self._drop(outputs, self.hidden_dropout)
            if isinstance(state, tuple):
                layer_state: State = tuple(part[index : index + 1] for part in state)
            else:
                layer_state = state[index : index + 1]
            outputs, layer_state = rnn(outputs, layer_state)
            states.append(layer_state)
        if isinstance(state, tuple):
            return outputs, tuple(torch.cat(parts) for parts in zip(*states, strict=True))
        return outputs, torch.cat(states)


class CharRnn(_RecurrentModel):
    """CharRnn: ``nn.RNN`` over a window; the last step predicts the next character."""

    layout = "window"

    def forward(self, tokens: torch.Tensor, state: State = None) -> tuple[torch.Tensor, State]:
        logits, _ = self.run(tokens, None)
        return logits[:, -1:], None  # (B, 1, V)


class CharSeqRnn(_RecurrentModel):
    """CharSeqRnn: one prediction per position; the hidden state starts at zero every batch."""

    layout = "sequence"

    def forward(self, tokens: torch.Tensor, state: State = None) -> tuple[torch.Tensor, State]:
        logits, _ = self.run(tokens, None)
        return logits, None


class CharSeqRnnIdentity(CharSeqRnn):
    """CharSeqRnn with the hidden-to-hidden weights initialised to the identity
    (Le, Jaitly & Hinton 2015, "A Simple Way to Initialize Recurrent Networks of ReLUs")."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        with torch.no_grad():
            for layer in range(self.num_layers):
                getattr(self.rnn, f"weight_hh_l{layer}").copy_(torch.eye(self.hidden_size))


class CharSeqStatefulRnn(StatefulMixin, _RecurrentModel):
    """CharSeqStatefulRnn: the hidden state carries across batches (truncated BPTT)."""

    layout = "stream"

    def forward(self, tokens: torch.Tensor, state: State = None) -> tuple[torch.Tensor, State]:
        return self.run(tokens, state)


class CharSeqStatefulGru(CharSeqStatefulRnn):
    """CharSeqStatefulGRU."""

    cell = nn.GRU


class CharSeqStatefulLstm(CharSeqStatefulRnn):
    """CharSeqStatefulLSTM (the notebook: 2 layers × 512, dropout 0.5 between layers and
    before the output layer)."""

    cell = nn.LSTM
    projects = True


class CharSeqStatefulRnnCell(StatefulMixin, CharModel):
    """CharSeqStatefulRnn2: the recurrence written out with ``nn.RNNCell``."""

    layout = "stream"

    def __init__(self, vocab_size: int, embedding_dim: int, hidden_size: int, **_: object) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.embedding = nn.Embedding(vocab_size, embedding_dim)
        self.cell = nn.RNNCell(embedding_dim, hidden_size)
        self.output_layer = nn.Linear(hidden_size, vocab_size)

    def init_state(self, batch_size: int, device: torch.device) -> State:
        return torch.zeros(batch_size, self.hidden_size, device=device)

    def forward(self, tokens: torch.Tensor, state: State = None) -> tuple[torch.Tensor, State]:
        hidden = self.init_state(tokens.shape[0], tokens.device) if state is None else state
        embedded = self.embedding(tokens)  # (B, T, E)
        outputs = []
        for t in range(tokens.shape[1]):
            hidden = self.cell(embedded[:, t], hidden)
            outputs.append(hidden)
        return self.output_layer(torch.stack(outputs, dim=1)), hidden  # (B, T, V)


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class Architecture:
    name: str
    model_class: type[CharModel]
    notebook_name: str
    description: str

    @property
    def layout(self) -> str:
        return self.model_class.layout


ARCHITECTURES: dict[str, Architecture] = {
    a.name: a
    for a in [
        Architecture("char3", Char3Model, "Char3Model", "3 characters -> next, shared input and hidden layers"),
        Architecture("char_loop", CharLoopModel, "CharLoopModel", "n characters, input added to hidden"),
        Architecture(
            "char_loop_concat",
            CharLoopConcatModel,
            "CharLoopConcatModel",
            "n characters, input concatenated with hidden",
        ),
        Architecture("char_rnn", CharRnn, "CharRnn", "nn.RNN, prediction from the last step"),
        Architecture("seq_rnn", CharSeqRnn, "CharSeqRnn", "one prediction per position, state reset per batch"),
        Architecture(
            "seq_rnn_identity",
            CharSeqRnnIdentity,
            "CharSeqRnn (identity init)",
            "seq_rnn with hidden-to-hidden weights initialised to the identity",
        ),
        Architecture(
            "stateful_rnn",
            CharSeqStatefulRnn,
            "CharSeqStatefulRnn",
            "hidden state carried across batches, truncated BPTT",
        ),
        Architecture("stateful_rnn_cell", CharSeqStatefulRnnCell, "CharSeqStatefulRnn2", "explicit RNNCell loop"),
        Architecture("stateful_gru", CharSeqStatefulGru, "CharSeqStatefulGRU", "stateful GRU"),
        Architecture(
            "stateful_lstm",
            CharSeqStatefulLstm,
            "CharSeqStatefulLSTM",
            "stateful LSTM, layers and dropout configurable",
        ),
    ]
}


def get_architecture(name: str) -> Architecture:
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise ValueError(f"unknown architecture {name!r}; known: {', '.join(ARCHITECTURES)}") from None


def build_model(
    name: str,
    vocab_size: int,
    *,
    embedding_dim: int,
    hidden_size: int,
    num_layers: int = 1,
    dropout: float = 0.0,
    embedding_dropout: float = 0.0,
    weight_drop: float = 0.0,
    locked_dropout: bool = False,
    input_dropout: float = 0.0,
    output_dropout: float | None = None,
    activation_reg: float = 0.0,
    temporal_activation_reg: float = 0.0,
    proj_size: int = 0,
) -> CharModel:
    arch = get_architecture(name)
    return arch.model_class(
        vocab_size,
        embedding_dim=embedding_dim,
        hidden_size=hidden_size,
        num_layers=num_layers,
        dropout=dropout,
        embedding_dropout=embedding_dropout,
        weight_drop=weight_drop,
        locked_dropout=locked_dropout,
        input_dropout=input_dropout,
        output_dropout=output_dropout,
        activation_reg=activation_reg,
        temporal_activation_reg=temporal_activation_reg,
        proj_size=proj_size,
    )


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
