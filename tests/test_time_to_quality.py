"""The speed and quality paths, exercised on the CPU wherever they can be: AWD-LSTM's
dropouts, mixed precision under autocast, the device-resident fixed-shape batches a CUDA
graph needs, and time to quality (elapsed time, targets, the loss-against-time plot)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from typing import get_args

import pytest
import torch

from charlm import compare, training
from charlm import device as charlm_device
from charlm.config import PRESETS, ModelConfig, RunConfig, preset, tiny
from charlm.data import CorpusError, make_layout
from charlm.device import (
    DeviceError,
    PrecisionError,
    cpu_has_native_bf16,
    faster_precision,
    measure_precisions,
    resolve_precision,
)
from charlm.generate import LoadedModel
from charlm.job import TrainResult
from charlm.models import build_model
from charlm.prepared import prepare_for
from charlm.training import QUALITY_TARGETS, Trainer, time_to_targets
from flows.params import PipelineParams

CPU = torch.device("cpu")


# --------------------------------------------------------------------------- AWD-LSTM regularisation


def _awd(architecture: str) -> torch.nn.Module:
    """A 2-layer model with every AWD-LSTM regulariser on."""
    return build_model(
        architecture, 30, embedding_dim=8, hidden_size=16, num_layers=2, dropout=0.2, embedding_dropout=0.1,
        weight_drop=0.5,
    )  # fmt: skip


@pytest.mark.parametrize("architecture", ["stateful_lstm", "stateful_gru"])
def test_weight_drop_masks_the_recurrence_in_training_only(architecture):
    model = _awd(architecture)
    names = set(model.state_dict())
    assert {"rnn.weight_hh_l0_raw", "rnn.weight_hh_l1_raw"} <= names  # the raw matrices are the parameters
    assert not {"rnn.weight_hh_l0", "rnn.weight_hh_l1"} & names
    tokens = torch.randint(2, 30, (4, 7))
    torch.manual_seed(0)
    logits, _ = model(tokens, None)
    masked = model.rnn.weight_hh_l0
    zeros = (masked == 0).float().mean().item()
    assert 0.3 < zeros < 0.7  # about half the recurrent weights dropped, one mask for every time step
    logits.sum().backward()
    assert model.rnn.weight_hh_l0_raw.grad.abs().sum() > 0  # gradients reach the raw weights

    model.eval()  # evaluation: the full matrix, deterministic, and a reloaded copy agrees
    a, b = model(tokens, None)[0], model(tokens, None)[0]
    assert torch.equal(a, b)
    assert torch.equal(model.rnn.weight_hh_l0, model.rnn.weight_hh_l0_raw)
    twin = _awd(architecture)
    twin.load_state_dict(model.state_dict())
    assert torch.equal(twin.eval()(tokens, None)[0], a)
    assert set(model.state_dict()) == names  # eval mode registered nothing new


@pytest.mark.parametrize("locked", [False, True])
def test_weight_drop_leaves_the_rnn_its_flat_weights(locked):
    """A masked matrix set in place of a weight must not make ``nn.RNNBase`` re-flatten its weights:
    on a GPU that moves the parameters' storage every step, and under a CUDA graph it froze every
    weight but the dropped ones (``charlm.models._keep_flat_weights``). Here the record it checks
    is current after every forward, in training and evaluation; and ``release_graph`` leaves the
    model holding nothing of the last step's autograd graph (a capture wants none alive)."""
    model = _locked("stateful_lstm") if locked else _awd("stateful_lstm")
    rnns = list(model.layers) if locked else [model.rnn]
    tokens = torch.randint(2, 30, (4, 7))
    for mode in (True, False, True):
        model.train(mode)
        model(tokens, None)
        assert not any(rnn._weights_have_changed() for rnn in rnns)
    assert all(getattr(rnn, name).grad_fn is not None for rnn, name in model._dropped_weights)
    model.release_graph()
    assert all(getattr(rnn, name).grad_fn is None for rnn, name in model._dropped_weights)
    assert all(torch.equal(getattr(rnn, name), getattr(rnn, f"{name}_raw")) for rnn, name in model._dropped_weights)


def _locked(architecture: str) -> torch.nn.Module:
    return build_model(
        architecture, 30, embedding_dim=8, hidden_size=16, num_layers=2, dropout=0.5, weight_drop=0.5,
        locked_dropout=True, input_dropout=0.5, output_dropout=0.5,
    )  # fmt: skip


@pytest.mark.parametrize("architecture", ["stateful_lstm", "stateful_gru"])
def test_locked_dropout_shares_one_mask_across_time_steps(architecture):
    model = _locked(architecture)
    assert model.layers is not None and len(model.layers) == 2  # one RNN per layer, dropout between
    names = set(model.state_dict())
    assert {"layers.0.weight_hh_l0_raw", "layers.1.weight_hh_l0_raw"} <= names  # weight-drop on each layer
    seen: dict[str, torch.Tensor] = {}
    model.layers[1].register_forward_pre_hook(lambda _m, args: seen.update(between=args[0]))
    model.output_layer.register_forward_pre_hook(lambda _m, args: seen.update(output=args[0]))
    tokens = torch.randint(2, 30, (4, 9))
    torch.manual_seed(0)
    logits, state = model(tokens, None)
    for where in ("between", "output"):
        zeros = seen[where] == 0  # (B, T, H): a dropped unit is dropped at every step of its sequence
        assert zeros.any() and not zeros.all(), where
        assert torch.equal(zeros, zeros[:, :1].expand_as(zeros)), where
    assert not torch.equal(zeros[0], zeros[1])  # ... with its own mask per sequence
    h = state[0] if isinstance(state, tuple) else state
    assert h.shape == (2, 4, 16)  # the carried state is one (layers, B, H) stack, as the stacked RNN's
    logits.sum().backward()
    assert all(rnn.weight_hh_l0_raw.grad.abs().sum() > 0 for rnn in model.layers)

    model.eval()  # evaluation: no masks, deterministic, and the state carries into the next batch
    a, carried = model(tokens, None)
    assert torch.equal(a, model(tokens, None)[0])
    assert not torch.equal(model(tokens, carried)[0], a)


def test_the_per_layer_rnns_match_the_stacked_rnn_in_evaluation():
    """The per-layer RNNs compute what one stacked RNN computes with the same weights."""
    layered = build_model("stateful_lstm", 30, embedding_dim=8, hidden_size=16, num_layers=2, locked_dropout=True)
    stacked = build_model("stateful_lstm", 30, embedding_dim=8, hidden_size=16, num_layers=2)
    weights = {}
    for key, value in layered.state_dict().items():
        if key.startswith("layers."):
            _, index, name = key.split(".")
            key = "rnn." + name.replace("_l0", f"_l{index}")
        weights[key] = value
    stacked.load_state_dict(weights)
    tokens = torch.randint(2, 30, (3, 5))
    (a, (ha, ca)), (b, (hb, cb)) = layered.eval()(tokens, None), stacked.eval()(tokens, None)
    assert torch.allclose(a, b, atol=1e-6) and torch.allclose(ha, hb, atol=1e-6) and torch.allclose(ca, cb, atol=1e-6)


def test_input_and_output_dropout_without_locking():
    model = build_model("stateful_lstm", 30, embedding_dim=8, hidden_size=16, input_dropout=0.5, output_dropout=0.0)
    assert model.layers is None and model.output_dropout == 0.0
    seen: dict[str, torch.Tensor] = {}
    model.rnn.register_forward_pre_hook(lambda _m, args: seen.update(input=args[0]))
    torch.manual_seed(0)
    model(torch.randint(2, 30, (4, 9)), None)
    zeros = seen["input"] == 0
    assert zeros.any() and not torch.equal(zeros, zeros[:, :1].expand_as(zeros))  # a mask per step


def test_locked_dropout_is_refused_for_hand_written_models():
    with pytest.raises(ValueError, match="locked_dropout"):
        ModelConfig(architecture="stateful_rnn_cell", locked_dropout=True)


def test_embedding_dropout_drops_whole_characters():
    model = build_model("stateful_lstm", 30, embedding_dim=8, hidden_size=16, embedding_dropout=0.5)
    tokens = torch.arange(2, 30).repeat(2, 1)  # every character twice, in two rows
    torch.manual_seed(0)
    embedded = model.embed(tokens)
    dropped = (embedded == 0).all(-1)
    assert dropped.any() and not dropped.all()
    assert torch.equal(dropped[0], dropped[1])  # a dropped character is dropped wherever it occurs


@pytest.mark.parametrize("setting", ["weight_drop", "activation_reg", "temporal_activation_reg"])
def test_hand_written_models_refuse_the_awd_regularisers(setting):
    with pytest.raises(ValueError, match="char_loop is a single hand-written layer"):
        tiny("char_loop").override({f"model.{setting}": 0.2})


def _outputs_seen(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The last layer's outputs as the RNN returned them and as the output layer received them."""
    seen: dict[str, torch.Tensor] = {}
    model.rnn.register_forward_hook(lambda _m, _args, out: seen.update(raw=out[0]))
    model.output_layer.register_forward_pre_hook(lambda _m, args: seen.update(dropped=args[0]))
    return seen


def test_activation_regularisation_is_awds_ar_on_dropped_and_tar_on_raw_outputs():
    """AR: alpha × mean square of the outputs after the output dropout; TAR: beta × mean square of
    their step-to-step change before it (awd-lstm-lm's main.py) — left for the trainer once."""
    model = build_model(
        "stateful_lstm", 30, embedding_dim=8, hidden_size=16, num_layers=2, dropout=0.5,
        activation_reg=2.0, temporal_activation_reg=1.0,
    )  # fmt: skip
    seen = _outputs_seen(model)
    torch.manual_seed(0)
    model(torch.randint(2, 30, (4, 9)), None)
    raw, dropped = seen["raw"], seen["dropped"]
    assert not torch.equal(raw, dropped)  # the output dropout acted between the two
    expected = 2.0 * dropped.pow(2).mean() + 1.0 * (raw[:, 1:] - raw[:, :-1]).pow(2).mean()
    penalty = model.take_penalty()
    assert penalty is not None and torch.allclose(penalty, expected)
    assert penalty.requires_grad and model.take_penalty() is None  # handed over once
    model.eval()(torch.randint(2, 30, (4, 9)), None)
    assert model.take_penalty() is None  # evaluation adds nothing
    plain = build_model("stateful_lstm", 30, embedding_dim=8, hidden_size=16)
    plain(torch.randint(2, 30, (4, 9)), None)
    assert plain.take_penalty() is None  # off by default


@pytest.mark.parametrize("locked", [False, True])
def test_a_projected_lstm_trains_carries_its_state_and_generates(small_text, tmp_path, locked):
    """LSTMP (``model.proj_size``): h and the outputs have the projection's size, c the cells';
    the stateful run carries both, resumes from its checkpoint and generates."""
    config = tiny("stateful_lstm").override(
        {"model.num_layers": 2, "model.hidden_size": 24, "model.proj_size": 8, "model.locked_dropout": locked,
         "model.weight_drop": 0.3}
    )  # fmt: skip
    trainer = Trainer(config, prepare_for(config, small_text), checkpoint_dir=tmp_path)
    h, c = trainer.module.init_state(3, CPU)
    assert h.shape == (2, 3, 8) and c.shape == (2, 3, 24)
    assert trainer.module.output_layer.in_features == 8
    trainer.fit(max_steps=4)
    h, c = trainer.state
    assert h.shape[-1] == 8 and c.shape[-1] == 24
    trainer.checkpoint()
    resumed = Trainer.resume(tmp_path / "last.pt", prepare_for(config, small_text))
    assert resumed.evaluate()["val_loss"] == pytest.approx(trainer.evaluate()["val_loss"])
    text = LoadedModel.from_checkpoint(tmp_path / "last.pt", device="cpu").generate("the ", 20, seed=0)
    assert len(text) == 20


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"model.proj_size": 8}, "proj_size is for an LSTM's layers; stateful_gru has none"),
        ({"model.proj_size": 64, "model.hidden_size": 64}, "proj_size 64 must be below hidden_size 64"),
    ],
)
def test_proj_size_is_refused_where_it_cannot_apply(overrides, message):
    architecture = "stateful_gru" if len(overrides) == 1 else "stateful_lstm"
    with pytest.raises(ValueError, match=message):
        tiny(architecture).override(overrides)


@pytest.mark.parametrize("locked", [False, True])
def test_ar_and_tar_shape_the_step_but_not_the_reported_loss(small_text, locked):
    """The step differentiates loss + penalty and reports the loss alone: from the same seed, a run
    with AR and TAR reports the same first loss as one without, and ends with other weights."""
    base = tiny("stateful_lstm").override({"model.num_layers": 2, "model.locked_dropout": locked})
    corpus = prepare_for(base, small_text)
    plain = Trainer(base.override({"precision": "fp32"}), corpus)
    shaped = Trainer(
        base.override({"precision": "fp32", "model.activation_reg": 2.0, "model.temporal_activation_reg": 1.0}), corpus
    )
    layout = plain.train_layout
    inputs, targets = layout.batch(layout.plan(0, 0, shuffle=True)[0])
    for trainer in (plain, shaped):
        trainer.set_lr(trainer.schedule.lr(0.0))
    first = [t.train_step(inputs, targets).item() for t in (plain, shaped)]
    assert first[0] == pytest.approx(first[1], abs=1e-6)
    assert shaped.module.take_penalty() is None  # the step took it
    moved = [not torch.equal(a, b) for a, b in zip(plain.module.parameters(), shaped.module.parameters(), strict=True)]
    assert any(moved)


# --------------------------------------------------------------------------- precision


def test_auto_precision_is_bf16_only_where_the_cpu_has_it():
    assert resolve_precision("auto", CPU) == ("bf16" if cpu_has_native_bf16() else "fp32")
    assert resolve_precision("fp32", CPU) == "fp32"
    with pytest.raises(PrecisionError, match="fp16' is for CUDA"):
        resolve_precision("fp16", CPU)


def test_auto_precision_on_a_gpu_is_fp32():
    """Measured on an H200: bf16 autocast ran the notebook's models at 0.84x fp32 (launch-bound
    steps), so a GPU trains in fp32 unless bf16 or fp16 is asked for. (No CUDA call is needed
    to decide it, so this runs on any host.)"""
    assert resolve_precision("auto", torch.device("cuda")) == "fp32"
    assert resolve_precision("auto", torch.device("cuda:1")) == "fp32"


def test_measure_precisions_alternates_and_takes_medians():
    calls: list[str] = []

    def step(dtype: torch.dtype | None) -> None:
        calls.append("bf16" if dtype is torch.bfloat16 else "fp32")

    seconds = measure_precisions(step, trials=3, min_seconds=0.0)
    # a warm-up of each, then the trials with the first of each pair alternating
    assert calls == ["fp32", "bf16", "fp32", "bf16", "bf16", "fp32", "fp32", "bf16"]
    assert set(seconds) == {"fp32", "bf16"} and all(s >= 0 for s in seconds.values())


def test_measure_precisions_adds_trials_until_each_side_has_run_min_seconds():
    """A fast step gets more timings than a slow one (three timings of a 2 x 768 LSTM's step put
    bf16 at 0.91x fp32's where another probe had picked it), up to ``max_trials``."""
    calls: list[str] = []

    def step(dtype: torch.dtype | None) -> None:
        calls.append("bf16" if dtype is torch.bfloat16 else "fp32")
        time.sleep(0.01)

    measure_precisions(step, trials=3, min_seconds=0.2, max_trials=40)
    # 2 warm-ups, then pairs until each side has 0.2 s: at most 20 (sleep only overshoots)
    pairs = (len(calls) - 2) // 2
    assert 3 < pairs <= 20 and calls.count("fp32") == calls.count("bf16")
    calls.clear()
    measure_precisions(step, trials=3, min_seconds=60.0, max_trials=6)
    assert len(calls) == 2 + 2 * 6  # the cap holds where min_seconds is out of reach


def test_auto_keeps_bf16_on_a_cpu_only_where_it_measured_faster():
    assert faster_precision({"fp32": 1.0, "bf16": 0.8}) == "bf16"
    assert faster_precision({"fp32": 1.0, "bf16": 0.95}) == "fp32"  # within the noise: fp32 is exact
    assert faster_precision({"fp32": 1.0, "bf16": 1.6}) == "fp32"


def _bf16_native(monkeypatch: pytest.MonkeyPatch, seconds: dict[str, float]) -> None:
    """As on a CPU with native bf16 whose measurement gave ``seconds`` (any host can run this: the
    GRU's bf16 runs, emulated, where it is not native)."""
    monkeypatch.setattr(charlm_device, "cpu_has_native_bf16", lambda: True)
    monkeypatch.setattr(training, "measure_precisions", lambda step: dict(seconds))
    monkeypatch.setattr(training, "_MEASURED", {})  # the real cache comes back after the test


def test_trainer_auto_precision_on_a_cpu_follows_its_measurement(small_text, monkeypatch):
    config = tiny("stateful_gru")
    corpus = prepare_for(config, small_text)
    _bf16_native(monkeypatch, {"fp32": 1.0, "bf16": 0.5})
    trainer = Trainer(config, corpus)
    assert trainer.precision == "bf16" and trainer.amp_dtype is torch.bfloat16
    assert trainer.precision_note == "bf16 (auto: a bf16 step took 0.50x fp32's here)"
    _bf16_native(monkeypatch, {"fp32": 1.0, "bf16": 1.4})
    assert Trainer(config, corpus).precision == "fp32"
    assert Trainer(config.override({"precision": "bf16"}), corpus).precision == "bf16"  # asked for: no measuring


def test_trainer_measures_a_copy_and_training_is_unchanged_by_it(small_text, monkeypatch):
    """The real measurement (no patching): it uses a copy of the model and leaves the RNG as the
    trainer reseeds it, so an fp32 run is the same whether or not ``auto`` measured first."""
    config = tiny("stateful_lstm")
    corpus = prepare_for(config, small_text)
    monkeypatch.setattr(training, "_MEASURED", {})
    auto = Trainer(config, corpus)
    if not cpu_has_native_bf16():
        assert auto.precision == "fp32" and auto.precision_seconds is None
        return
    assert set(auto.precision_seconds or {}) == {"fp32", "bf16"}
    assert auto.precision == faster_precision(auto.precision_seconds or {})
    assert Trainer(config, corpus).precision_seconds == auto.precision_seconds  # measured once per process
    plain = Trainer(config.override({"precision": auto.precision}), corpus)  # the same, not measured
    auto.fit(max_steps=5)
    plain.fit(max_steps=5)
    for a, b in zip(auto.module.parameters(), plain.module.parameters(), strict=True):
        assert torch.equal(a, b)


def test_a_resumed_run_keeps_the_precision_auto_chose(small_text, tmp_path, monkeypatch):
    config = tiny("stateful_gru")
    corpus = prepare_for(config, small_text)
    _bf16_native(monkeypatch, {"fp32": 1.0, "bf16": 0.5})
    first = Trainer(config, corpus, checkpoint_dir=tmp_path)
    first.fit(max_steps=3)
    first.checkpoint()
    _bf16_native(monkeypatch, {"fp32": 1.0, "bf16": 1.5})  # a second opinion would say fp32
    resumed = Trainer.resume(tmp_path / "last.pt", corpus)
    assert resumed.precision == "bf16" and resumed.amp_dtype is torch.bfloat16
    # the console says why it is not what this process's timing would choose
    assert resumed.precision_note == "bf16 (auto, as the run began; a bf16 step took 1.50x fp32's here)"


def test_flush_denormals_is_on_for_the_process_unless_kept():
    code = (
        "import torch; from charlm.device import flush_denormals; "
        "on = flush_denormals(); print(on, (torch.tensor([1e-39]) * 1.5).item() == 0.0)"
    )
    flushed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert flushed.stdout.split() == ["True", "True"]
    kept = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True,
        env={**os.environ, "CHARLM_KEEP_DENORMALS": "1"},
    )  # fmt: skip
    assert kept.stdout.split() == ["False", "False"]


def test_explicit_bf16_an_lstm_cannot_run_is_a_clear_error(small_text):
    config = tiny("stateful_lstm").override({"precision": "bf16"})
    corpus = prepare_for(config, small_text)
    if cpu_has_native_bf16():  # on such a CPU the request is honoured
        assert Trainer(config, corpus).precision == "bf16"
    else:  # oneDNN has no emulated bf16 LSTM: the request is named, not a primitive-descriptor traceback
        with pytest.raises(PrecisionError, match="cannot train a LSTM in bf16.*precision=fp32"):
            Trainer(config, corpus)


def test_bf16_autocast_trains_with_fp32_weights_and_optimizer_state(small_text):
    """The GPU's mixed-precision path, on the CPU: the forward under bf16 autocast, the loss,
    the weights and Adam's moments in fp32, and the result close to an fp32 run's."""
    base = tiny("stateful_gru")
    corpus = prepare_for(base, small_text)
    runs = {}
    for precision in ("fp32", "bf16"):
        trainer = Trainer(base.override({"precision": precision}), corpus)
        trainer.fit(max_steps=60)
        assert trainer.precision == precision
        assert all(p.dtype == torch.float32 for p in trainer.module.parameters())
        moments = [s["exp_avg"] for s in trainer.optimizer.state.values()]
        assert moments and all(m.dtype == torch.float32 for m in moments)
        runs[precision] = trainer.evaluate()["val_loss"]
    assert abs(runs["bf16"] - runs["fp32"]) < 0.05


# --------------------------------------------------------------------------- device-resident, fixed-shape data


def test_batches_are_slices_of_the_corpus_on_the_trainers_device(small_text):
    config = tiny("stateful_lstm")
    trainer = Trainer(config, prepare_for(config, small_text))
    for layout in (trainer.train_layout, trainer.valid_layout):
        assert layout.tokens.device == trainer.device
    inputs, targets = trainer.train_layout.batch(trainer.train_layout.plan(0, 0, True)[0])
    assert inputs.device == targets.device == trainer.device


@pytest.mark.parametrize("kind", ["stream", "sequence", "window"])
def test_fixed_shape_gives_every_training_batch_one_shape(kind):
    tokens = torch.arange(1000) % 50
    ragged = make_layout(kind, tokens, batch_size=16, context=7)
    fixed = make_layout(kind, tokens, batch_size=16, context=7, fixed_shape=True)
    shapes = {tuple(t.shape for t in fixed.batch(item)) for item in fixed.plan(0, 0, True)}
    assert len(shapes) == 1
    assert len({tuple(t.shape for t in ragged.batch(item)) for item in ragged.plan(0, 0, True)}) == 2
    assert len(fixed.plan(0, 0, True)) == len(ragged.plan(0, 0, True)) - 1  # only the ragged batch dropped


def test_fixed_shape_names_a_corpus_too_short_for_one_batch():
    with pytest.raises(CorpusError, match="training split: 100 characters are too few for 16 columns.*fixed_shape"):
        make_layout("stream", torch.arange(100), batch_size=16, context=8, name="training split", fixed_shape=True)


def test_the_cuda_graph_mode_is_validated_before_any_training(small_text):
    base = tiny("stateful_gru")
    with pytest.raises(ValueError, match="set data.fixed_shape=true"):
        base.override({"cuda_graph": True})
    with pytest.raises(ValueError, match="fixed bptt: set data.random_bptt=false"):
        base.override({"data.fixed_shape": True, "data.random_bptt": True})
    graphed = base.override({"data.fixed_shape": True, "data.random_bptt": False, "cuda_graph": True})
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="cuda_graph needs a CUDA device"):
            Trainer(graphed, prepare_for(graphed, small_text))
    with pytest.raises(ValueError, match="cuda_graph needs a CUDA device, not device='cpu'"):
        graphed.override({"device": "cpu"})


def test_a_fixed_shape_run_trains_like_any_other(small_text):
    config = tiny("stateful_lstm").override({"data.fixed_shape": True, "data.random_bptt": False})
    trainer = Trainer(config, prepare_for(config, small_text))
    result = trainer.fit()
    assert result.history[-1]["val_loss"] < result.history[0]["val_loss"] + 0.05
    assert len(result.history) == config.epochs


# --------------------------------------------------------------------------- time to quality


def test_elapsed_time_is_recorded_per_epoch_and_continues_across_a_resume(small_text, tmp_path):
    config = tiny("stateful_gru")
    corpus = prepare_for(config, small_text)
    first = Trainer(config, corpus, checkpoint_dir=tmp_path)
    first.fit(max_steps=len(first.train_layout.plan(0, config.seed, True)) + 2)  # one epoch and a bit
    assert len(first.history) == 1
    before = first.history[0]["elapsed_s"]
    assert before > 0
    resumed = Trainer.resume(tmp_path / "last.pt", corpus)
    result = resumed.fit()
    elapsed = [h["elapsed_s"] for h in result.history]
    assert elapsed[0] == before and elapsed == sorted(elapsed) and elapsed[-1] > before


def test_time_to_targets_takes_the_first_epoch_that_reached_each():
    history = [
        {"val_loss": 1.6, "elapsed_s": 10.0},
        {"val_loss": 1.45, "elapsed_s": 20.0},
        {"val_loss": 1.36, "elapsed_s": 30.0},
        {"val_loss": 1.39, "elapsed_s": 40.0},
    ]
    assert time_to_targets(history, (1.5, 1.4, 1.3697, 1.3)) == {"1.5": 20.0, "1.4": 30.0, "1.3697": 30.0}
    assert time_to_targets([{"val_loss": 1.2}]) == {}  # an old history without elapsed time: none
    assert 1.3697 in QUALITY_TARGETS and 1.2524 in QUALITY_TARGETS  # the notebook's GRU and best LSTM


def test_the_comparison_shows_time_to_quality(tmp_path):
    def result(arch: str, losses: list[float], step: float) -> TrainResult:
        history = [{"val_loss": v, "chars_per_sec": 1.0, "elapsed_s": step * (i + 1)} for i, v in enumerate(losses)]
        return TrainResult(
            architecture=arch,
            history=history,
            best_val_loss=min(losses),
            best_epoch=1,
            steps=1,
            parameters=1,
            wall_time_s=step * len(losses),
            task="lower",
        )

    results = [result("stateful_gru", [1.6, 1.45, 1.36], 20.0), result("stateful_lstm", [1.55, 1.3, 1.25], 90.0)]
    table = compare.comparison_table(results)
    assert dict(zip(table["architecture"], table["target_reached"])) == {
        "stateful_lstm": "≤1.2524 at 270 s",
        "stateful_gru": "≤1.3697 at 60 s",
    }
    path = compare.plot_loss_against_time(results, tmp_path / "time.png", "test")
    assert path.stat().st_size > 10_000 and path.read_bytes()[:4] == b"\x89PNG"


def test_json_overrides_replace_a_whole_schedule():
    config = tiny("stateful_gru").override(['schedule=[{"kind": "sgdr", "lr": 0.004, "cycles": 1, "cycle_len": 4}]'])
    assert config.epochs == 4 and config.schedule[0].kind == "sgdr"
    with pytest.raises(ValueError, match="not valid JSON"):
        RunConfig.parse_overrides(["schedule=[{kind: sgdr}]"])


def test_the_presets_beyond_the_notebook_keep_its_task():
    lstm = preset("awd_sgdr", "stateful_lstm")
    assert lstm.model.weight_drop > 0 and lstm.model.embedding_dropout > 0 and lstm.model.dropout > 0
    assert lstm.model.output_dropout is None  # its dropout acts before the output layer too (not the notebook's 0)
    assert [p.kind for p in lstm.schedule] == ["constant", "sgdr"] and lstm.epochs == 64  # 1 + the notebook's 63
    fast = preset("short_sgdr", "stateful_lstm")
    assert fast.epochs == 2 and fast.model.num_layers == 1
    for config in (lstm, fast, preset("awd_sgdr", "stateful_gru"), preset("short_sgdr", "stateful_gru")):
        data = config.data
        assert data.lowercase and data.min_freq == 3 and data.valid_fraction == 0.2  # the notebook's task
        assert data.valid_batch_size == 64  # validation measured as the notebook's loader cuts it
        assert data.fixed_shape and not data.random_bptt  # one batch shape: a CUDA graph can replay it
    assert preset("awd_sgdr", "stateful_rnn_cell").model.weight_drop == 0  # a hand-written cell: no dropouts
    with pytest.raises(ValueError, match="preset awd_sgdr is for the stateful architectures .* not char_rnn"):
        preset("awd_sgdr", "char_rnn")
    assert {"awd_sgdr", "short_sgdr", "wide_awd_sgdr"} <= set(PRESETS)
    wide = preset("wide_awd_sgdr", "stateful_lstm")  # awd_sgdr's recipe, only the width and its dropout differ
    assert (wide.model.hidden_size, wide.model.dropout, wide.model.num_layers) == (1024, 0.5, 2)
    assert wide.model_copy(update={"model": lstm.model}) == lstm
    with pytest.raises(ValueError, match="made wide, not stateful_gru"):
        preset("wide_awd_sgdr", "stateful_gru")
    regularised = preset("awd_ar_sgdr", "stateful_lstm")  # awd_sgdr's recipe plus AR 2 and TAR 1, nothing else
    assert (regularised.model.activation_reg, regularised.model.temporal_activation_reg) == (2.0, 1.0)
    assert lstm.model.activation_reg == lstm.model.temporal_activation_reg == 0
    plain = regularised.model.model_copy(update={"activation_reg": 0.0, "temporal_activation_reg": 0.0})
    assert regularised.model_copy(update={"model": plain}) == lstm
    with pytest.raises(ValueError, match="with AR and TAR, not stateful_gru"):
        preset("awd_ar_sgdr", "stateful_gru")
    batch64 = preset("awd_ar_sgdr_batch64", "stateful_lstm")  # twice the columns, sqrt(2) the rate, nothing else
    assert batch64.data.batch_size == 2 * regularised.data.batch_size == 64
    assert [(p.kind, p.lr) for p in batch64.schedule] == [("constant", 4.24e-3), ("sgdr", 4.24e-3)]
    assert abs(batch64.schedule[0].lr / regularised.schedule[0].lr - 2**0.5) < 1e-3
    assert batch64.epochs == regularised.epochs == 64
    unscaled = batch64.model_copy(update={"data": regularised.data, "schedule": regularised.schedule})
    assert unscaled == regularised
    measured = [  # the README's command for it before it was a preset: the same config
        "data.batch_size=64",
        'schedule=[{"kind":"constant","lr":0.00424,"epochs":1},'
        '{"kind":"sgdr","lr":0.00424,"cycles":6,"cycle_len":1,"cycle_mult":2}]',
    ]
    assert regularised.override(measured) == batch64
    with pytest.raises(ValueError, match="on 64 columns, not stateful_gru"):
        preset("awd_ar_sgdr_batch64", "stateful_gru")
    # the pipeline's --preset offers every preset the library has
    assert set(get_args(PipelineParams.model_fields["preset_name"].annotation)) == set(PRESETS)


def test_notebook_full_is_the_notebooks_lstm_through_all_three_fits():
    """lesson6-rnn.ipynb: fit 2 epochs, CosAnneal(cycle_mult=2) for 2**4-1, again for 2**6-1."""
    full, first_two = preset("notebook_full", "stateful_lstm"), preset("notebook", "stateful_lstm")
    assert full.schedule[:2] == first_two.schedule and full.epochs == 2 + 15 + 63
    third = full.schedule[2]
    assert (third.kind, third.lr, third.cycles, third.cycle_len, third.cycle_mult) == ("sgdr", 1e-2, 6, 1, 2)
    assert full.data == first_two.data and full.optim == first_two.optim and full.model == first_two.model
    # nn.LSTM(..., dropout=0.5) and no dropout before l_out, as the notebook's CharSeqStatefulLSTM
    assert full.model.dropout == 0.5 and full.model.output_dropout == 0.0
    with pytest.raises(ValueError, match="notebook_full is the notebook's stateful_lstm training, not stateful_gru"):
        preset("notebook_full", "stateful_gru")


def test_each_run_logs_elapsed_time_and_its_time_to_each_target_once(small_text, tmp_path):
    """Against MLflow's embedded SQLite store: ``elapsed_s`` per epoch, and each target's time
    logged once, at the epoch that first reached it, equal to that epoch's elapsed time."""
    from mlflow import MlflowClient

    from charlm.tracking import MLflowTracker

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    run_id = client.create_run(client.create_experiment("t", artifact_location=str(tmp_path / "a"))).info.run_id
    config = tiny("stateful_gru")
    trainer = Trainer(config, prepare_for(config, small_text))
    untrained = trainer.evaluate()["val_loss"]
    # one target every run reaches at once, one it reaches later (or not), one it never reaches
    targets = (untrained + 1.0, untrained * 0.8, 0.01)
    tracker = MLflowTracker(run_id, client=client, log_snapshots=False, targets=targets)
    trainer.callbacks.append(tracker)
    result = trainer.fit()
    elapsed = client.get_metric_history(run_id, "elapsed_s")
    assert [m.step for m in elapsed] == [1, 2, 3]
    assert [m.value for m in elapsed] == pytest.approx([h["elapsed_s"] for h in result.history])
    expected = time_to_targets(result.history, targets)
    assert f"{targets[0]:g}" in expected and "0.01" not in expected
    for target, seconds in expected.items():
        logged = client.get_metric_history(run_id, f"time_to_val_loss_{target}_s")
        assert len(logged) == 1 and logged[0].value == pytest.approx(seconds)
    assert not client.get_metric_history(run_id, "time_to_val_loss_0.01_s")
    assert client.get_run(run_id).data.params["precision"] == trainer.precision
