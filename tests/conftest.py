from __future__ import annotations

import random
import signal
from pathlib import Path

import pytest

# A test suite started in the background of a non-interactive shell (`.ci/run &`, nohup) inherits
# SIGINT ignored, and so would every process it starts: the tests that press Ctrl-C on the CLI and
# the pipeline would then wait out their timeouts on processes that never saw it. Python installs
# its own handler only where SIGINT was not ignored, so put it back here; the processes the tests
# start then begin with the default again, as under a terminal.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

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
