"""Corpus loading, the character vocabulary, the split and the three batch layouts.

The notebook's three ways of turning a token stream into batches:

* ``window``   — every window of ``n`` characters predicts the one after it
  (overlapping windows; Char3Model, CharLoopModel, CharRnn).
* ``sequence`` — non-overlapping sequences of ``n`` characters with one target
  per position, the input shifted by one (CharSeqRnn, the "multi-output" model).
* ``stream``   — the stateful layout (fastai's LanguageModelLoader): the stream is
  cut into ``batch_size`` contiguous columns, read ``bptt`` steps at a time, so
  row ``b`` of batch ``i + 1`` continues row ``b`` of batch ``i``::

      stream  a b c d e f g h i j k l m n o p q r s t u v w x  (24 tokens)
      batch_size=3 -> columns (one row each, batch-first)
          row 0: a b c d e f g h
          row 1: i j k l m n o p
          row 2: q r s t u v w x
      bptt=3 -> batch 0 inputs rows[:, 0:3]  targets rows[:, 1:4]
                batch 1 inputs rows[:, 3:6]  targets rows[:, 4:7]
                batch 2 inputs rows[:, 6:7]  targets rows[:, 7:8]

Every layout yields ``(inputs, targets)`` batch-first: inputs ``(B, T)`` and
targets ``(B, T_out)`` where ``T_out`` is 1 for the window layout and ``T``
otherwise. An epoch's batches are a pure function of ``(seed, epoch)`` so a run
resumed mid-epoch replays the same batches, and every rank of a distributed run
agrees on them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

PAD_INDEX = 0
UNK_INDEX = 1
PAD_TOKEN = "<pad>"
UNK_TOKEN = "<unk>"


class CorpusError(ValueError):
    """The corpus (or a text given in its place) cannot be used; the message names it."""


# --------------------------------------------------------------------------- corpus


def decode_corpus(raw: bytes, source: str) -> str:
    """Decode UTF-8 bytes, naming ``source`` in the error for empty or non-UTF-8 input."""
    if not raw:
        raise CorpusError(f"{source}: the corpus is empty (0 bytes)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise CorpusError(
            f"{source}: not UTF-8 text — invalid byte 0x{raw[err.start]:02x} at offset {err.start}"
        ) from None
    if text.startswith("\ufeff"):  # a byte-order mark is not part of the text
        text = text[1:]
    if not text:
        raise CorpusError(f"{source}: the corpus is empty (only a byte-order mark)")
    return text


def read_corpus_bytes(path: str | os.PathLike[str], source: str | None = None) -> bytes:
    """The bytes of a corpus file; a missing file or a directory raises :class:`CorpusError` naming ``source``."""
    source = source or str(path)
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise CorpusError(f"{source}: no such corpus file") from None
    except IsADirectoryError:
        raise CorpusError(f"{source}: is a directory, expected a UTF-8 text file") from None


def read_corpus(path: str | os.PathLike[str]) -> str:
    """Read a UTF-8 corpus file; a missing, empty or non-UTF-8 file raises :class:`CorpusError`."""
    return decode_corpus(read_corpus_bytes(path), str(path))


def split_text(text: str, valid_fraction: float = 0.2) -> tuple[str, str]:
    """Contiguous split: the validation text is the last ``valid_fraction`` of the corpus."""
    if not 0.0 < valid_fraction < 1.0:
        raise ValueError(f"valid_fraction must be in (0, 1), got {valid_fraction}")
    cut = len(text) - int(round(len(text) * valid_fraction))
    if cut <= 0 or cut >= len(text):
        raise CorpusError(
            f"a corpus of {len(text)} characters is too short to split with valid_fraction={valid_fraction}"
        )
    return text[:cut], text[cut:]


# --------------------------------------------------------------------------- vocabulary


def _code_points(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)


@dataclass(frozen=True)
class Vocabulary:
    """Sorted characters; index 0 is padding, index 1 the unknown character.

    ``lowercase`` is applied to every text before encoding; characters seen fewer
    than ``min_freq`` times when the vocabulary was built (and characters never
    seen) encode to :data:`UNK_INDEX`.
    """

    chars: tuple[str, ...]
    lowercase: bool = False
    min_freq: int = 1

    def __post_init__(self) -> None:
        if list(self.chars) != sorted(set(self.chars)):
            raise ValueError("vocabulary characters must be unique and sorted")
        if any(len(c) != 1 for c in self.chars):
            raise ValueError("vocabulary entries must be single characters")
        object.__setattr__(self, "_stoi", {c: i + 2 for i, c in enumerate(self.chars)})

    # -- construction --------------------------------------------------------
    @classmethod
    def build(cls, text: str, *, lowercase: bool = False, min_freq: int = 1) -> Vocabulary:
        if min_freq < 1:
            raise ValueError(f"min_freq must be >= 1, got {min_freq}")
        if not text:
            raise CorpusError("cannot build a vocabulary from an empty text")
        if lowercase:
            text = text.lower()
        codes, counts = np.unique(_code_points(text), return_counts=True)
        chars = tuple(chr(int(c)) for c, n in zip(codes, counts) if n >= min_freq)
        return cls(chars=chars, lowercase=lowercase, min_freq=min_freq)

    # -- sizes and lookups ---------------------------------------------------
    @property
    def itos(self) -> list[str]:
        return [PAD_TOKEN, UNK_TOKEN, *self.chars]

    def __len__(self) -> int:
        return len(self.chars) + 2

    def index(self, char: str) -> int:
        stoi: dict[str, int] = self._stoi  # type: ignore[attr-defined]
        return stoi.get(char.lower() if self.lowercase else char, UNK_INDEX)

    @property
    def dtype(self) -> torch.dtype:
        """The smallest integer dtype that holds every index (encoded text stays compact)."""
        n = len(self)
        return torch.uint8 if n <= 256 else torch.int16 if n <= 32768 else torch.int32

    def encode(self, text: str, *, on_unknown: str = "unk", source: str = "text") -> torch.Tensor:
        """Encode ``text`` as a 1-D compact tensor.

        ``on_unknown="unk"`` maps unseen characters to :data:`UNK_INDEX`;
        ``"error"`` raises :class:`CorpusError` naming ``source`` and the characters.
        """
        if on_unknown not in ("unk", "error"):
            raise ValueError(f"on_unknown must be 'unk' or 'error', got {on_unknown!r}")
        if self.lowercase:
            text = text.lower()
        if not text:
            return torch.empty(0, dtype=self.dtype)
        codes, inverse = np.unique(_code_points(text), return_inverse=True)
        table = np.array([self._stoi.get(chr(int(c)), UNK_INDEX) for c in codes], dtype=np.int64)  # type: ignore[attr-defined]
        if on_unknown == "error" and (table == UNK_INDEX).any():
            missing = [chr(int(c)) for c, i in zip(codes, table) if i == UNK_INDEX]
            raise CorpusError(
                f"{source}: characters not in the vocabulary: {''.join(missing)!r} "
                "(map them to the unknown index with on_unknown='unk', or --allow-unknown on the command line)"
            )
        return torch.from_numpy(table[inverse].astype(np.dtype(str(self.dtype).removeprefix("torch."))))

    def decode(self, indices: torch.Tensor | list[int]) -> str:
        itos = self.itos
        if isinstance(indices, torch.Tensor):
            indices = indices.tolist()
        return "".join(itos[i] if i > UNK_INDEX else ("" if i == PAD_INDEX else "\ufffd") for i in indices)

    # -- persistence ---------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"chars": "".join(self.chars), "lowercase": self.lowercase, "min_freq": self.min_freq}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Vocabulary:
        try:
            return cls(chars=tuple(data["chars"]), lowercase=bool(data["lowercase"]), min_freq=int(data["min_freq"]))
        except (KeyError, TypeError) as err:
            raise ValueError(f"not a charlm vocabulary: {err}") from None

    def save(self, path: str | os.PathLike[str]) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), ensure_ascii=False, indent=1), encoding="utf-8")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Vocabulary:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"{path}: cannot read vocabulary JSON: {err}") from None
        return cls.from_dict(data)


@dataclass(frozen=True)
class PreparedCorpus:
    """The split and the encoded tensors, ready for any layout."""

    vocab: Vocabulary
    train: torch.Tensor
    valid: torch.Tensor

    def stats(self) -> dict[str, int | float]:
        return {
            "vocab_size": len(self.vocab),
            "train_chars": int(self.train.numel()),
            "valid_chars": int(self.valid.numel()),
            # numpy, not torch: this runs on the orchestrating thread, and a torch op there leaves an
            # OpenMP pool that slowed training in worker threads ~40% (bench/openmp_threads.py)
            "train_unknown": int(np.count_nonzero(self.train.numpy() == UNK_INDEX)),
            "valid_unknown": int(np.count_nonzero(self.valid.numpy() == UNK_INDEX)),
        }


def prepare_corpus(
    text: str, *, valid_fraction: float = 0.2, lowercase: bool = False, min_freq: int = 1
) -> PreparedCorpus:
    """Split contiguously, build the vocabulary on the training part, encode both parts."""
    train_text, valid_text = split_text(text, valid_fraction)
    vocab = Vocabulary.build(train_text, lowercase=lowercase, min_freq=min_freq)
    return PreparedCorpus(vocab=vocab, train=vocab.encode(train_text), valid=vocab.encode(valid_text))


# --------------------------------------------------------------------------- layouts


Batch = tuple[torch.Tensor, torch.Tensor]


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    gen = torch.Generator()
    gen.manual_seed(seed * 1_000_003 + epoch)
    return gen


class Layout:
    """A way to cut a token stream into batches; see the module docstring.

    ``rank``/``world_size`` shard the data for distributed training: each rank gets
    its own disjoint part and every rank takes the same number of steps.
    """

    def __init__(
        self,
        tokens: torch.Tensor,
        *,
        batch_size: int,
        context: int,
        name: str = "data",
        rank: int = 0,
        world_size: int = 1,
        even: bool = True,
        fixed_shape: bool = False,
    ) -> None:
        if tokens.dim() != 1:
            raise ValueError(f"{name}: expected a 1-D token tensor, got shape {tuple(tokens.shape)}")
        if batch_size < 1 or context < 1:
            raise ValueError(f"{name}: batch_size and context must be >= 1 (got {batch_size}, {context})")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.tokens = tokens
        self.batch_size = batch_size
        self.context = context
        self.name = name
        self.rank = rank
        self.world_size = world_size
        self.even = even  # every rank the same number of batches (training); False for evaluation
        self.fixed_shape = fixed_shape  # drop an epoch's ragged last batch (one shape for a CUDA graph)

    def plan(self, epoch: int, seed: int, shuffle: bool) -> list[Any]:  # pragma: no cover - abstract
        """The epoch's batches as cheap descriptors (pure function of ``seed`` and ``epoch``)."""
        raise NotImplementedError

    def batch(self, item: Any) -> Batch:  # pragma: no cover - abstract
        raise NotImplementedError

    def progress(self, plan: list[Any], index: int) -> float:
        """Fraction of the epoch done after batch ``index`` of ``plan`` (drives the LR schedule)."""
        return (index + 1) / len(plan)

    def iterate(self, epoch: int = 0, seed: int = 0, shuffle: bool = True) -> Iterator[Batch]:
        plan = self.plan(epoch, seed, shuffle)
        for item in plan:
            yield self.batch(item)


class _IndexedLayout(Layout):
    """Shared by the window and sequence layouts: a set of examples, shuffled per epoch.

    Distributed, ``batch_size`` is the global batch: each global batch of the epoch's
    permutation is cut into ``world_size`` contiguous shares, one per rank, so W ranks
    take the very steps one process would. The last, partial global batch is shared
    evenly; the fewer than ``world_size`` examples that cannot be (``dropped_per_epoch``)
    change with every epoch's permutation.
    """

    def __init__(self, tokens: torch.Tensor, **kwargs: Any) -> None:
        super().__init__(tokens, **kwargs)
        if self.even and self.batch_size % self.world_size:
            raise ValueError(
                f"{self.name}: batch_size {self.batch_size} is not divisible by world_size {self.world_size}"
            )
        total = self.num_examples()
        if total < self.world_size or total < 1:
            raise CorpusError(
                f"{self.name}: {tokens.numel()} characters give {total} examples of {self.context} characters, "
                f"too few for {self.world_size} rank(s)"
            )
        if self.fixed_shape and self.even and total < self.batch_size:
            raise CorpusError(
                f"{self.name}: {total} examples are fewer than one batch of {self.batch_size} (data.fixed_shape "
                "drops the ragged last batch, so no step would be left)"
            )
        self.dropped_per_epoch = (total % self.batch_size) % self.world_size if self.even else 0

    def num_examples(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def plan(self, epoch: int, seed: int, shuffle: bool) -> list[torch.Tensor]:
        total = self.num_examples()
        order = torch.randperm(total, generator=_epoch_generator(seed, epoch)) if shuffle else torch.arange(total)
        order = order.to(self.tokens.device)  # one copy an epoch; batches are then gathered on the device
        if not self.even:  # evaluation: every example exactly once, shares may differ by one
            return list(torch.split(order[self.rank :: self.world_size], self.batch_size))
        shares = []
        for chunk in torch.split(order, self.batch_size):
            if self.fixed_shape and chunk.numel() < self.batch_size:
                break
            share = chunk.numel() // self.world_size
            if share:
                shares.append(chunk[self.rank * share : (self.rank + 1) * share])
        return shares


class WindowLayout(_IndexedLayout):
    """Overlapping windows of ``context`` characters; the target is the next character."""

    def num_examples(self) -> int:
        return max(self.tokens.numel() - self.context, 0)

    def batch(self, item: torch.Tensor) -> Batch:
        windows = self.tokens.unfold(0, self.context, 1)  # (N - context + 1, context), a view
        inputs = windows[item].long()  # (B, context)
        targets = self.tokens[item + self.context].long().unsqueeze(1)  # (B, 1)
        return inputs, targets


class SequenceLayout(_IndexedLayout):
    """Non-overlapping sequences of ``context`` characters, one target per position."""

    def num_examples(self) -> int:
        return max((self.tokens.numel() - 1) // self.context, 0)

    def batch(self, item: torch.Tensor) -> Batch:
        n = self.num_examples() * self.context
        inputs = self.tokens[:n].view(-1, self.context)[item].long()  # (B, T)
        targets = self.tokens[1 : n + 1].view(-1, self.context)[item].long()  # (B, T)
        return inputs, targets


class StreamLayout(Layout):
    """The stateful layout: ``batch_size`` contiguous columns read ``bptt`` steps at a time.

    With ``random_bptt`` each batch's length follows fastai: the base length is
    ``bptt`` (95%) or ``bptt / 2`` (5%), then ``max(5, int(normal(base, 5)))`` (int truncates, as in fastai).
    With ``random_offset`` each training epoch's spans start at a random offset in
    ``[0, bptt)``, so the truncation boundaries move from epoch to epoch (a fixed bptt otherwise
    cuts every epoch at the same characters); the characters before it make a short first batch,
    or, with ``fixed_shape``, are skipped that epoch (fewer than ``bptt`` a column).
    In a distributed run ``batch_size`` is the global batch: rank ``r`` owns rows
    ``r * B/W … (r+1) * B/W - 1``, and all ranks draw the same lengths and offsets.
    """

    def __init__(
        self, tokens: torch.Tensor, *, random_bptt: bool = False, random_offset: bool = False, **kwargs: Any
    ) -> None:
        super().__init__(tokens, **kwargs)
        if self.batch_size % self.world_size:
            raise ValueError(
                f"{self.name}: batch_size {self.batch_size} is not divisible by world_size {self.world_size}"
            )
        self.random_bptt = random_bptt
        self.random_offset = random_offset
        self.column_length = tokens.numel() // self.batch_size
        need = self.context + 1 if self.fixed_shape else 2  # fixed shape: one whole bptt span per column
        if self.column_length < need:
            raise CorpusError(
                f"{self.name}: {tokens.numel()} characters are too few for {self.batch_size} columns "
                f"(need at least {need * self.batch_size}{' for data.fixed_shape' if self.fixed_shape else ''})"
            )
        self.dropped_tail = tokens.numel() - self.column_length * self.batch_size
        rows = self.batch_size // self.world_size
        columns = tokens[: self.column_length * self.batch_size].view(self.batch_size, self.column_length)
        self.rows = columns[self.rank * rows : (self.rank + 1) * rows]  # (B / W, L)

    def plan(self, epoch: int, seed: int, shuffle: bool) -> list[tuple[int, int]]:
        gen = _epoch_generator(seed, epoch)
        spans, last = [], self.column_length - 1
        start = self.epoch_offset(epoch, seed) if shuffle else 0
        if start and not self.fixed_shape:
            spans.append((0, start))  # the characters before the offset: a short first batch
        while start < last:
            length = self.context
            if self.random_bptt and shuffle:
                base = self.context if torch.rand((), generator=gen) < 0.95 else self.context / 2
                length = max(5, int(float(torch.normal(float(base), 5.0, (), generator=gen))))  # int(), as fastai
            length = min(length, last - start)
            if self.fixed_shape and length < self.context:
                break
            spans.append((start, length))
            start += length
        return spans

    def epoch_offset(self, epoch: int, seed: int) -> int:
        """Where a training epoch's first whole bptt span starts in each column (0 without
        ``random_offset``); drawn from a generator of its own, so ``random_bptt``'s lengths stay
        those it draws without the offset."""
        if not self.random_offset or self.context < 2:
            return 0
        offset = int(torch.randint(0, self.context, (), generator=_epoch_generator(seed + 7919, epoch)))
        return min(offset, max(self.column_length - 1 - (self.context if self.fixed_shape else 1), 0))

    def batch(self, item: tuple[int, int]) -> Batch:
        start, length = item
        return (self.rows[:, start : start + length].long(), self.rows[:, start + 1 : start + 1 + length].long())

    def progress(self, plan: list[Any], index: int) -> float:
        start, length = plan[index]
        return float(start + length) / (self.column_length - 1)


LAYOUTS: dict[str, type[Layout]] = {"window": WindowLayout, "sequence": SequenceLayout, "stream": StreamLayout}


def make_layout(
    kind: str,
    tokens: torch.Tensor,
    *,
    batch_size: int,
    context: int,
    random_bptt: bool = False,
    random_offset: bool = False,
    name: str = "data",
    rank: int = 0,
    world_size: int = 1,
    even: bool = True,
    fixed_shape: bool = False,
) -> Layout:
    try:
        cls = LAYOUTS[kind]
    except KeyError:
        raise ValueError(f"unknown layout {kind!r}; known: {', '.join(LAYOUTS)}") from None
    extra = {"random_bptt": random_bptt, "random_offset": random_offset} if cls is StreamLayout else {}
    return cls(
        tokens,
        batch_size=batch_size,
        context=context,
        name=name,
        rank=rank,
        world_size=world_size,
        even=even,
        fixed_shape=fixed_shape,
        **extra,
    )
