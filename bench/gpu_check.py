"""The GPU figures, in one run on one GPU (``bench/gpu_check.sh`` wraps it with a time limit).

1. chars/s of the notebook's GRU and LSTM, eager, fp32 against mixed precision (bf16 where
   cuDNN's RNNs run it, else fp16 with a gradient scaler);
2. the same at a fixed shape (``data.fixed_shape``, bptt 8): eager against ``cuda_graph``, in
   fp32 and in bf16;
   2b. ``awd_sgdr``'s LSTM (dropouts, weight-drop) at its own shape, eager against a CUDA graph:
   chars/s, the mean loss, and any parameter whose gradient a replay leaves unchanged (``--parts 2``);
3. the wall time of the notebook's LSTM schedule (17 epochs), precision ``auto``;
4. a 1-GPU NCCL DDP task through the pipeline (``--ddp``, tiny preset, embedded Prefect and MLflow).

Every figure comes from this run; nothing is carried over from another machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from charlm.config import awd_sgdr, notebook
from charlm.data import read_corpus
from charlm.device import DeviceError, PrecisionError, resolve_precision
from charlm.prepared import prepare_for
from charlm.training import Callback, Trainer

DEFAULT_CORPUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "nietzsche.txt"


class EpochClock(Callback):
    """One line per epoch, so a part stopped at its time limit still shows how far it got."""

    def on_fit_start(self, trainer: Trainer) -> None:
        self.started = time.perf_counter()

    def on_epoch_end(self, trainer: Trainer, epoch: int, metrics: dict[str, float]) -> None:
        elapsed = time.perf_counter() - self.started
        val = metrics.get("val_loss", float("nan"))
        print(f"   epoch {epoch + 1}/{trainer.config.epochs}: val {val:.4f} at {elapsed:.1f} s", flush=True)


def throughput(config, corpus, steps: int, trials: int, probe: list[str] | None = None) -> tuple[float, str, float]:
    """Median chars/s over ``trials`` passes of ``steps`` training steps, the precision, and the
    mean loss of the last pass (a graph that trains wrongly is fast too: its losses give it away).
    ``probe``: filled with the names of the parameters whose gradient one more step on another
    batch leaves unchanged, or that have none (a replay that does not recompute them)."""
    trainer = Trainer(config, corpus)
    layout = trainer.train_layout
    plan = layout.plan(0, config.seed, True)
    batches = [layout.batch(plan[i % len(plan)]) for i in range(steps)]
    for inputs, targets in batches[:5]:  # warm-up (and a CUDA graph's warm-up and capture)
        trainer.train_step(inputs, targets)
    speeds = []
    for _ in range(trials):
        total = torch.zeros((), device=trainer.device)
        torch.cuda.synchronize()
        started = time.perf_counter()
        for inputs, targets in batches:  # summed as it goes: a graph returns the same loss buffer each step
            total += trainer.train_step(inputs, targets)
        torch.cuda.synchronize()
        speeds.append(sum(t.numel() for _, t in batches) / (time.perf_counter() - started))
    if probe is not None:
        params = [(n, p) for n, p in trainer.module.named_parameters() if p.grad is not None]
        before = [p.grad.clone() for _, p in params]
        trainer.train_step(*layout.batch(plan[(steps + 7) % len(plan)]))
        probe.extend(n for (n, p), g in zip(params, before) if torch.equal(p.grad, g))
        probe.extend(n for n, p in trainer.module.named_parameters() if p.grad is None)
    return statistics.median(speeds), trainer.precision, total.item() / len(batches)


GRAPH_TOLERANCE = 0.05  # part 2b: the most a graph's mean loss may differ from eager's


def mixed_precision(device: torch.device) -> str:
    """bf16 where this GPU's cuDNN trains RNNs in it, else fp16, else fp32."""
    for name in ("bf16", "fp16"):
        try:
            return resolve_precision(name, device)
        except PrecisionError:
            continue
    return "fp32"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", default=str(DEFAULT_CORPUS))
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument(
        "--parts",
        type=int,
        nargs="+",
        default=[1, 2, 3, 4],
        help="1: throughput, 2: awd_sgdr's graph check, 3: schedule, 4: DDP",
    )
    parser.add_argument(
        "--backend", default="nccl", help="part 4's DDP backend (gloo runs part 4 on a CPU: a check of its plumbing)"
    )
    args = parser.parse_args()
    args.corpus = str(Path(args.corpus).resolve())  # part 4 runs the pipeline from a temporary directory
    if not Path(args.corpus).is_file():
        raise SystemExit(f"gpu_check: corpus {args.corpus} not found (--corpus)")
    if ({1, 2, 3} & set(args.parts) or args.backend == "nccl") and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device visible to torch")
    if torch.cuda.is_available():
        print(
            f"{torch.cuda.get_device_name()}; torch {torch.__version__}, CUDA {torch.version.cuda}, "
            f"cuDNN {torch.backends.cudnn.version()}",
            flush=True,
        )
    text = read_corpus(args.corpus)
    failed: list[str] = []

    if 1 in args.parts:
        mixed_name = mixed_precision(torch.device("cuda"))
        print(
            f"\n1-2. notebook sizes and batches: eager fp32 against {mixed_name} autocast; at a fixed shape "
            f"(bptt 8), eager against a CUDA graph, fp32 and {mixed_name}. (mean loss of each last pass)"
        )
    for arch in ("stateful_gru", "stateful_lstm") if 1 in args.parts else ():
        base = notebook(arch).override({"progress": False, "device": "cuda", "precision": "fp32"})
        corpus = prepare_for(base, text)
        run = {"fp32": throughput(base, corpus, args.steps, args.trials)}
        run[mixed_name] = throughput(base.override({"precision": mixed_name}), corpus, args.steps, args.trials)
        fixed = base.override({"data.random_bptt": False, "data.fixed_shape": True})
        run["fixed fp32"] = throughput(fixed, corpus, args.steps, args.trials)
        for name in ("fp32", mixed_name) if mixed_name != "fp16" else ("fp32",):  # fp16's scaler is not graphed
            graphed = fixed.override({"cuda_graph": True, "precision": name})
            run[f"fixed {name} graph"] = throughput(graphed, corpus, args.steps, args.trials)
        print(f"  {arch}:")
        for label, (speed, _, loss) in run.items():
            ratio = speed / run["fixed fp32" if label.startswith("fixed") else "fp32"][0]
            print(f"    {label:18s} {speed:>11,.0f} chars/s  ratio {ratio:5.2f}  loss {loss:.3f}", flush=True)

    if 2 in args.parts:
        print("\n2b. awd_sgdr's LSTM (2 x 512, bptt 32, batch 32) at a fixed shape, fp32: eager against a CUDA graph")
        awd = awd_sgdr("stateful_lstm").override(
            {"progress": False, "device": "cuda", "precision": "fp32", "data.fixed_shape": True}
        )
        corpus = prepare_for(awd, text)
        quiet = {"model.dropout": 0.0, "model.embedding_dropout": 0.0, "model.weight_drop": 0.0}
        for label, change in (("as is", {}), ("weight_drop 0", {"model.weight_drop": 0.0}), ("no dropouts", quiet)):
            losses: list[float] = []
            speeds: list[float] = []
            for graph in (False, True):
                stale: list[str] = []
                try:
                    speed, _, loss = throughput(awd.override({**change, "cuda_graph": graph}), corpus, 300, 2, stale)
                except DeviceError as err:  # the graph refused itself (charlm.cudagraph)
                    print(f"  {label:14s} graph refused: {err}", flush=True)
                    failed.append(f"2b ({label})")
                    break
                losses.append(loss)
                speeds.append(speed)
                print(
                    f"  {label:14s} {'graph' if graph else 'eager':5s} {speed:>11,.0f} chars/s  "
                    f"ratio {speed / speeds[0]:5.2f}  loss {loss:.3f}  "
                    f"gradients unchanged by a step: {', '.join(stale) or 'none'}",
                    flush=True,
                )
            # the same steps on the same batches: only dropout masks may differ (they matched exactly
            # without weight-drop on an H200); a graph that does not train as eager does is a failed check
            if len(losses) == 2 and (abs(losses[1] - losses[0]) > GRAPH_TOLERANCE or stale):
                failed.append(f"2b ({label})")

    if 3 in args.parts:
        config = notebook("stateful_lstm").override({"progress": False, "device": "cuda"})
        trainer = Trainer(config, prepare_for(config, text), callbacks=[EpochClock()])
        print(f"\n3. notebook LSTM schedule, {trainer.precision}:", flush=True)
        result = trainer.fit()
        print(
            f"   the notebook's LSTM schedule ({config.epochs} epochs, {trainer.precision}): {result.wall_time:.1f} s, "
            f"best val {result.best_val_loss:.4f}",
            flush=True,
        )

    if 4 in args.parts:
        with tempfile.TemporaryDirectory() as home:
            env = {
                **os.environ,
                "PREFECT_HOME": home,
                "MLFLOW_TRACKING_URI": f"sqlite:///{home}/mlflow.db",
                "CHARLM_HOME": f"{home}/charlm",
                "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
            }
            command = [
                sys.executable, "-m", "flows.pipeline", "--corpus-uri", args.corpus, "--preset", "tiny",
                "--arch", "stateful_lstm", "--ddp", "--nproc-per-node", "1", "--backend", args.backend,
            ]  # fmt: skip
            started = time.perf_counter()
            done = subprocess.run(command, env=env, cwd=home, capture_output=True, text=True)
            tail = (done.stdout + done.stderr).strip().splitlines()[-6:]
            print(
                f"\n4. 1-{'GPU' if args.backend == 'nccl' else 'process'} {args.backend.upper()} DDP task "
                f"through the pipeline: exit {done.returncode} in "
                f"{time.perf_counter() - started:.0f} s"
            )
            print("\n".join("   " + line for line in tail))
            if done.returncode:
                failed.append("4")
    if failed:
        raise SystemExit(f"gpu_check: part {', '.join(failed)} failed (above)")


if __name__ == "__main__":
    main()
