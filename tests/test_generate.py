from __future__ import annotations

import pytest

from charlm.config import tiny
from charlm.data import CorpusError
from charlm.generate import LoadedModel
from charlm.prepared import prepare_for
from charlm.training import Trainer


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, small_text):
    out = {}
    for arch in ("stateful_lstm", "char_loop", "seq_rnn"):
        config = tiny(arch)
        directory = tmp_path_factory.mktemp(arch)
        Trainer(config, prepare_for(config, small_text), checkpoint_dir=directory).fit()
        out[arch] = directory / "best.pt"
    return out


@pytest.mark.parametrize("arch", ["stateful_lstm", "char_loop", "seq_rnn"])
def test_generation_is_reproducible_with_a_seed(checkpoints, arch):
    model = LoadedModel.from_checkpoint(checkpoints[arch], device="cpu")
    a = model.generate("the spirit ", 120, seed=3, temperature=0.8, top_k=5)
    b = model.generate("the spirit ", 120, seed=3, temperature=0.8, top_k=5)
    c = model.generate("the spirit ", 120, seed=4, temperature=0.8, top_k=5)
    assert a == b and len(a) == 120
    assert a != c
    assert set(a) <= set(model.vocab.chars)


def test_greedy_next_character_and_temperature_zero_agree(checkpoints):
    model = LoadedModel.from_checkpoint(checkpoints["stateful_lstm"], device="cpu")
    nxt = model.next_char("the philosophe")
    assert nxt in model.vocab.chars
    assert model.generate("the philosophe", 1, temperature=0) == nxt
    assert model.generate("the philosophe", 30, temperature=0, seed=1) == model.generate(
        "the philosophe", 30, temperature=0, seed=2
    )


def test_top_k_one_is_greedy(checkpoints):
    model = LoadedModel.from_checkpoint(checkpoints["seq_rnn"], device="cpu")
    assert model.generate("good and ", 40, top_k=1, seed=1) == model.generate("good and ", 40, temperature=0)


def test_priming_text_outside_the_vocabulary(checkpoints):
    model = LoadedModel.from_checkpoint(checkpoints["stateful_lstm"], device="cpu")
    with pytest.raises(CorpusError, match=r"priming text: characters not in the vocabulary: '@€'"):
        model.generate("the €@ spirit", 10)
    assert len(model.generate("the €@ spirit", 10, on_unknown="unk", seed=0)) == 10


def test_priming_text_too_short_for_a_window_model(checkpoints):
    model = LoadedModel.from_checkpoint(checkpoints["char_loop"], device="cpu")
    with pytest.raises(CorpusError, match="char_loop reads 8 characters, got 3"):
        model.generate("the", 10)
    with pytest.raises(CorpusError, match="empty"):
        model.generate("", 10)
