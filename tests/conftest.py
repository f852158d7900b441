from __future__ import annotations

import random
from pathlib import Path

import pytest

_WORDS = [
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "that",
    "it",
    "was",
    "for",
    "on",
    "are",
    "with",
    "as",
    "be",
    "at",
    "by",
    "this",
    "had",
    "not",
    "but",
    "from",
    "or",
    "have",
    "truth",
    "will",
    "power",
    "morality",
    "good",
    "evil",
    "philosopher",
    "spirit",
    "free",
    "man",
    "God",
]


def generated_text(n_words: int = 3000, seed: int = 0) -> str:
    """A small corpus with a learnable structure: words, capitals, punctuation, newlines."""
    rng = random.Random(seed)
    out, sentence = [], []
    for _ in range(n_words):
        sentence.append(rng.choice(_WORDS))
        if len(sentence) >= rng.randint(5, 12):
            out.append(" ".join(sentence).capitalize() + rng.choice([".", ".", ",", ";", "!"]))
            sentence = []
            if rng.random() < 0.2:
                out.append("\n")
    return " ".join(out) + "\n"


@pytest.fixture(scope="session")
def small_text() -> str:
    return generated_text()


@pytest.fixture
def corpus_file(tmp_path: Path, small_text: str) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(small_text, encoding="utf-8")
    return path
