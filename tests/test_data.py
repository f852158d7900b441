from __future__ import annotations

import pytest
import torch

from charlm.config import preset
from charlm.data import (
    UNK_INDEX,
    CorpusError,
    SequenceLayout,
    StreamLayout,
    Vocabulary,
    WindowLayout,
    make_layout,
    prepare_corpus,
    read_corpus,
    split_text,
)


def tokens(n: int) -> torch.Tensor:
    return torch.arange(n, dtype=torch.uint8)


# ----------------------------------------------------------------------------- vocabulary


def test_vocabulary_is_sorted_with_padding_and_unknown_first():
    vocab = Vocabulary.build("banana!")
    assert vocab.itos == ["<pad>", "<unk>", "!", "a", "b", "n"]
    assert (vocab.index("a"), vocab.index("!"), vocab.index("z")) == (3, 2, UNK_INDEX)
    assert vocab.encode("nab").tolist() == [5, 3, 4]
    assert vocab.decode(vocab.encode("banana")) == "banana"


def test_vocabulary_json_round_trip_is_exact(tmp_path):
    vocab = Vocabulary.build("Zarathustra spoke — «über» 😀\n\t", lowercase=True, min_freq=1)
    vocab.save(tmp_path / "vocab.json")
    loaded = Vocabulary.load(tmp_path / "vocab.json")
    assert loaded == vocab
    assert loaded.itos == vocab.itos
    assert loaded.encode("Über 😀").tolist() == vocab.encode("Über 😀").tolist()


def test_lowercase_and_min_freq_map_rare_and_unseen_to_unknown():
    vocab = Vocabulary.build("AAAbbc", lowercase=True, min_freq=2)
    assert vocab.chars == ("a", "b")
    assert vocab.encode("Abcz").tolist() == [2, 3, UNK_INDEX, UNK_INDEX]
    with pytest.raises(CorpusError, match=r"priming.*'cz'"):
        vocab.encode("abcz", on_unknown="error", source="priming")


def test_encoded_text_is_compact():
    vocab = Vocabulary.build("hello world")
    assert vocab.encode("hello").dtype == torch.uint8
    big = Vocabulary.build("".join(chr(0x4E00 + i) for i in range(300)))
    assert big.encode(chr(0x4E00)).dtype == torch.int16


def test_split_is_contiguous_with_validation_last():
    text = "".join(chr(ord("a") + i % 26) for i in range(100))
    train, valid = split_text(text, 0.2)
    assert (len(train), len(valid)) == (80, 20)
    assert train + valid == text


def test_prepare_builds_vocabulary_on_training_part_only():
    prepared = prepare_corpus("abc" * 20 + "z" * 15, valid_fraction=0.2)
    assert prepared.vocab.chars == ("a", "b", "c")
    assert prepared.stats()["valid_unknown"] == 15
    assert prepared.train.numel() + prepared.valid.numel() == 75


# ----------------------------------------------------------------------------- bad input


def test_empty_file_is_rejected_by_name(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_bytes(b"")
    with pytest.raises(CorpusError, match=r"empty\.txt.*empty"):
        read_corpus(path)


def test_non_utf8_file_is_rejected_by_name(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("café au lait".encode("latin-1"))
    with pytest.raises(CorpusError, match=r"latin1\.txt: not UTF-8.*0xe9 at offset 3"):
        read_corpus(path)


def test_missing_file_and_directory_are_rejected(tmp_path):
    with pytest.raises(CorpusError, match="no such corpus file"):
        read_corpus(tmp_path / "nope.txt")
    with pytest.raises(CorpusError, match="is a directory"):
        read_corpus(tmp_path)


def test_text_too_short_for_the_layouts():
    with pytest.raises(CorpusError, match=r"training split: 10 characters are too few for 8 columns"):
        StreamLayout(tokens(10), batch_size=8, context=4, name="training split")
    with pytest.raises(CorpusError, match=r"validation split: 5 characters give 0 examples of 8"):
        WindowLayout(tokens(5), batch_size=4, context=8, name="validation split")
    with pytest.raises(CorpusError, match="too short to split"):
        split_text("ab", 0.2)


# ----------------------------------------------------------------------------- layouts, by hand


def test_window_layout_overlapping_windows_predict_next():
    layout = WindowLayout(tokens(7), batch_size=10, context=3)
    ((inputs, targets),) = list(layout.iterate(shuffle=False))
    assert inputs.tolist() == [[0, 1, 2], [1, 2, 3], [2, 3, 4], [3, 4, 5]]
    assert targets.tolist() == [[3], [4], [5], [6]]
    assert inputs.dtype == torch.long


def test_sequence_layout_non_overlapping_one_target_per_position():
    layout = SequenceLayout(tokens(10), batch_size=10, context=3)
    ((inputs, targets),) = list(layout.iterate(shuffle=False))
    assert inputs.tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert targets.tolist() == [[1, 2, 3], [4, 5, 6], [7, 8, 9]]


def test_stream_layout_columns_continue_across_batches():
    # The module docstring's picture: 24 tokens, 3 columns, bptt 3.
    layout = StreamLayout(tokens(24), batch_size=3, context=3)
    batches = list(layout.iterate(shuffle=False))
    assert [b[0].tolist() for b in batches] == [
        [[0, 1, 2], [8, 9, 10], [16, 17, 18]],
        [[3, 4, 5], [11, 12, 13], [19, 20, 21]],
        [[6], [14], [22]],
    ]
    assert [b[1].tolist() for b in batches] == [
        [[1, 2, 3], [9, 10, 11], [17, 18, 19]],
        [[4, 5, 6], [12, 13, 14], [20, 21, 22]],
        [[7], [15], [23]],
    ]
    assert layout.dropped_tail == 0


def test_stream_layout_reports_the_dropped_tail():
    layout = StreamLayout(tokens(26), batch_size=3, context=3)
    assert layout.dropped_tail == 2


def test_random_bptt_varies_length_is_reproducible_and_covers_the_stream():
    layout = StreamLayout(torch.arange(64 * 500) % 200, batch_size=64, context=8, random_bptt=True)
    plan = layout.plan(epoch=0, seed=1, shuffle=True)
    lengths = [n for _, n in plan]
    assert len(set(lengths)) > 3 and min(lengths[:-1]) >= 5
    assert plan == layout.plan(epoch=0, seed=1, shuffle=True)
    assert plan != layout.plan(epoch=1, seed=1, shuffle=True)
    assert sum(lengths) == layout.column_length - 1  # every position predicted once
    assert layout.progress(plan, len(plan) - 1) == 1.0


def test_random_offset_moves_the_truncation_boundaries_each_epoch():
    stream = torch.arange(4 * 401) % 200
    fixed = StreamLayout(stream, batch_size=4, context=8)
    assert {fixed.plan(e, 3, True)[0] for e in range(20)} == {(0, 8)}  # without it: the same cuts every epoch
    moving = StreamLayout(stream, batch_size=4, context=8, random_offset=True)
    plans = [moving.plan(e, 3, True) for e in range(20)]
    assert plans == [moving.plan(e, 3, True) for e in range(20)]  # reproducible from seed and epoch
    assert len({moving.epoch_offset(e, 3) for e in range(20)}) > 3  # the cuts move from epoch to epoch
    for plan in plans:  # a short first batch, then whole bptt spans: every position predicted once
        assert sum(n for _, n in plan) == moving.column_length - 1
        assert all(n == 8 for _, n in plan[1:-1]) and plan[0][1] <= 8
    assert moving.plan(0, 3, False) == fixed.plan(0, 3, False)  # validation is not moved

    shaped = StreamLayout(stream, batch_size=4, context=8, random_offset=True, fixed_shape=True)
    for epoch in range(20):
        plan = shaped.plan(epoch, 3, True)
        assert {n for _, n in plan} == {8}  # one batch shape (a CUDA graph can replay it)
        assert plan[0][0] < 8 and plan[-1][0] + 8 <= shaped.column_length - 1  # the skipped head is under a bptt
    assert len({shaped.plan(e, 3, True)[0][0] for e in range(20)}) > 3

    randomised = StreamLayout(stream, batch_size=4, context=8, random_bptt=True)
    both = StreamLayout(stream, batch_size=4, context=8, random_bptt=True, random_offset=True)
    epoch = next(e for e in range(20) if both.epoch_offset(e, 3))
    lengths = [n for _, n in randomised.plan(epoch, 3, True)]
    moved = [n for _, n in both.plan(epoch, 3, True)]
    assert moved[0] == both.epoch_offset(epoch, 3)  # the short first batch, then random_bptt's own lengths
    assert moved[1 : len(lengths) - 1] == lengths[: len(lengths) - 2]


def test_random_offset_is_for_the_stateful_models_only():
    assert preset("awd_sgdr", "stateful_lstm").override({"data.random_offset": True}).data.random_offset
    with pytest.raises(ValueError, match="random_offset applies to stateful models only, not seq_rnn"):
        preset("notebook", "seq_rnn").override({"data.random_offset": True})


def test_shuffled_window_epochs_cover_every_example_once():
    layout = WindowLayout(tokens(103), batch_size=16, context=3)
    seen = torch.cat([x[:, 0] for x, _ in layout.iterate(epoch=2, seed=5)])
    assert sorted(seen.tolist()) == list(range(100))


def test_sharding_splits_each_global_batch_across_ranks():
    t = torch.arange(1003) % 250  # 999 windows of 4: 124 global batches of 8, then 7
    single = make_layout("window", t, batch_size=8, context=4)
    parts = [make_layout("window", t, batch_size=8, context=4, rank=r, world_size=2) for r in range(2)]
    plans = [p.plan(0, 0, True) for p in parts]
    assert len(plans[0]) == len(plans[1]) == len(single.plan(0, 0, True)) == 125  # same steps on every rank
    for step, whole in enumerate(single.plan(0, 0, True)[:-1]):
        assert torch.equal(torch.cat([plans[0][step], plans[1][step]]), whole)  # rank shares = the global batch
    assert parts[0].dropped_per_epoch == 1 and plans[0][-1].numel() == 3
    union = torch.cat([torch.cat(p) for p in plans])
    assert len(set(union.tolist())) == union.numel() == 998
    evaluation = [make_layout("window", t, batch_size=8, context=4, rank=r, world_size=2, even=False) for r in (0, 1)]
    assert sorted(torch.cat([torch.cat(e.plan(0, 0, False)) for e in evaluation]).tolist()) == list(range(999))
    rows = [make_layout("stream", t, batch_size=4, context=5, rank=r, world_size=2).rows for r in range(2)]
    assert torch.equal(torch.cat(rows), t[:1000].view(4, 250))
