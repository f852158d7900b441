"""Text generation from a trained model: the notebook's ``get_next`` and ``get_next_n``.

Stateless models read the last ``context`` characters at every step; stateful
models read the priming text once and then carry their hidden state, one
character at a time. Padding and the unknown index are never sampled.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from charlm.checkpoint import CheckpointError, first_line
from charlm.config import RunConfig
from charlm.data import PAD_INDEX, UNK_INDEX, CorpusError, Vocabulary
from charlm.device import resolve_device
from charlm.ensemble import Combine, SnapshotEnsemble, combine_payloads, load_payloads, model_from_payload, read_model
from charlm.models import CharModel, State


@dataclass
class LoadedModel:
    """A model ready for inference, with what it needs to read and write text."""

    model: CharModel
    vocab: Vocabulary
    config: RunConfig
    device: torch.device

    @classmethod
    def from_payload(cls, payload: dict[str, Any], device: str | torch.device = "cpu") -> LoadedModel:
        model, config, vocab = model_from_payload(payload)
        device = torch.device(device)
        model.to(device).eval()
        return cls(model=model, vocab=vocab, config=config, device=device)

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike[str], device: str | torch.device = "auto") -> LoadedModel:
        device = resolve_device(str(device))
        model, config, vocab = read_model(path, device)
        model.to(device).eval()
        return cls(model=model, vocab=vocab, config=config, device=device)

    @classmethod
    def from_checkpoints(
        cls,
        paths: Sequence[str | os.PathLike[str]],
        combine: Combine = "ensemble",
        device: str | torch.device = "auto",
    ) -> LoadedModel:
        """Several checkpoints of one model (a run's snapshots) as one: the ensemble of their
        probabilities, or their weight average (see :mod:`charlm.ensemble`); one path is that model."""
        if len(paths) == 1:
            return cls.from_checkpoint(paths[0], device)
        device = resolve_device(str(device))
        payloads = load_payloads(paths, device)
        try:
            if combine == "average":
                return cls.from_payload(combine_payloads(payloads, "average"), device)
            members = [cls.from_payload(p, device) for p in payloads]
        except (KeyError, RuntimeError, ValueError, TypeError) as err:
            raise CheckpointError(f"{', '.join(map(str, paths))}: cannot be combined: {first_line(err)}") from None
        if any(m.vocab != members[0].vocab or m.config.model != members[0].config.model for m in members):
            raise CheckpointError(f"{', '.join(map(str, paths))}: snapshots of different models cannot be combined")
        ensemble = SnapshotEnsemble([m.model for m in members]).to(device).eval()
        return cls(model=ensemble, vocab=members[0].vocab, config=members[0].config, device=device)

    def evaluate_text(self, text: str, *, batch_size: int | None = None, context: int | None = None) -> dict[str, Any]:
        """Validation metrics on the validation split of ``text`` (this model's split fraction and
        vocabulary; unseen characters count as unknown). Stateful models read ``batch_size``
        columns, each from a zero state; the default is the run's validation batch (``valid_batch_size``,
        else the training batch size, as the notebook did): what its ``val_loss`` was measured with."""
        from charlm.data import make_layout, split_text
        from charlm.training import evaluate

        data = self.config.data
        context = context or data.context
        if self.model.layout == "window" and context != data.context:
            raise ValueError(f"{self.config.architecture} reads windows of {data.context} characters, not {context}")
        _, valid_text = split_text(text, data.valid_fraction)
        layout = make_layout(
            self.model.layout,
            self.vocab.encode(valid_text),
            batch_size=batch_size or data.validation_batch_size,
            context=context,
            name="validation split",
            even=False,
        )
        return {"batch_size": layout.batch_size, "context": context, **evaluate(self.model, layout, self.device)}

    # ------------------------------------------------------------------ encoding

    def _encode_prime(self, prime: str, on_unknown: str) -> list[int]:
        if not prime:
            raise CorpusError("priming text: empty; give at least one character")
        tokens = self.vocab.encode(prime, on_unknown=on_unknown, source="priming text").tolist()
        need = self.config.data.context if not self.model.stateful else 1
        if len(tokens) < need and self.model.layout == "window":
            raise CorpusError(
                f"priming text: {self.config.architecture} reads {need} characters, got {len(tokens)} ({prime!r})"
            )
        return tokens

    @torch.no_grad()
    def _next_logits(self, history: list[int], fresh: list[int], state: State) -> tuple[torch.Tensor, State]:
        """Logits for the character after ``history``; ``fresh`` are the tokens not yet fed."""
        if self.model.stateful:
            inputs = torch.tensor([fresh], device=self.device)
        else:
            inputs = torch.tensor([history[-self.config.data.context :]], device=self.device)
        logits, state = self.model(inputs, state)
        logits = logits[0, -1].float()
        logits[PAD_INDEX] = logits[UNK_INDEX] = float("-inf")
        return logits, state

    # ------------------------------------------------------------------ public API

    def next_char(self, prime: str, *, on_unknown: str = "error") -> str:
        """The most likely next character (the notebook's ``get_next``)."""
        tokens = self._encode_prime(prime, on_unknown)
        logits, _ = self._next_logits(tokens, tokens, None)
        return self.vocab.itos[int(logits.argmax())]

    def generate(
        self,
        prime: str,
        length: int = 400,
        *,
        temperature: float = 1.0,
        top_k: int | None = None,
        seed: int | None = None,
        on_unknown: str = "error",
    ) -> str:
        """``length`` characters after ``prime``, sampled (the notebook's ``get_next_n``).

        ``temperature`` 0 is greedy; ``top_k`` keeps the k most likely characters;
        ``seed`` makes the sample reproducible. ``on_unknown='error'`` rejects a priming
        text with characters outside the vocabulary; ``'unk'`` feeds them as unknown.
        """
        return "".join(
            self.stream(prime, length, temperature=temperature, top_k=top_k, seed=seed, on_unknown=on_unknown)
        )

    def stream(
        self,
        prime: str,
        length: int = 400,
        *,
        temperature: float = 1.0,
        top_k: int | None = None,
        seed: int | None = None,
        on_unknown: str = "error",
    ) -> Iterator[str]:
        """:meth:`generate`, one character at a time as each is sampled (the options are checked
        before the first)."""
        if length < 0:
            raise ValueError(f"length must be >= 0, got {length}")
        if not math.isfinite(temperature) or temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {temperature}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        generator = torch.Generator(device="cpu")
        if seed is not None:
            generator.manual_seed(seed)
        else:
            generator.seed()
        history = self._encode_prime(prime, on_unknown)
        return self._sample(history, length, temperature, top_k, generator)

    @torch.no_grad()
    def _sample(
        self, history: list[int], length: int, temperature: float, top_k: int | None, generator: torch.Generator
    ) -> Iterator[str]:
        fresh: list[int] = list(history)
        state: State = None
        for _ in range(length):
            logits, state = self._next_logits(history, fresh, state)
            if temperature == 0:
                token = int(logits.argmax())
            else:
                logits = logits / temperature
                if top_k is not None and top_k < logits.numel():
                    kth = torch.topk(logits, top_k).values[-1]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                probs = torch.softmax(logits, dim=-1).cpu()
                token = int(torch.multinomial(probs, 1, generator=generator))
            history.append(token)
            fresh = [token]
            yield self.vocab.decode([token])
