"""The GPU figures, in one run on one GPU (``bench/gpu_check.sh`` wraps it with a time limit).

1. chars/s of the notebook's GRU and LSTM, fp32 against the mixed precision ``auto`` picks
   (bf16 where cuDNN's RNNs run it, else fp16 with a gradient scaler), eager;
2. the same at a fixed shape (``data.fixed_shape``, bptt 8): eager against ``cuda_graph``;
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

from charlm.config import notebook
from charlm.data import read_corpus
from charlm.prepared import prepare_for
from charlm.training import Callback, Trainer

DEFAULT_CORPUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "nietzsche.txt"


class EpochClock(Callback):
    """One line per epoch, so a part stopped at its time limit still shows how far it got."""

    def on_fit_start(self, trainer: Trainer) -> None:
        self.started = time.perf_counter()

    def on_epoch_end(self, trainer: Trainer, epoch: int, metrics: dict[str, float]) -> None:
        elapsed = time.perf_counter() - self.started
        print(f"   epoch {epoch}: val {metrics.get('val_loss', float('nan')):.4f} at {elapsed:.1f} s", flush=True)


def throughput(config, corpus, steps: int, trials: int) -> tuple[float, str]:
    trainer = Trainer(config, corpus)
    layout = trainer.train_layout
    plan = layout.plan(0, config.seed, True)
    batches = [layout.batch(plan[i % len(plan)]) for i in range(steps)]
    for inputs, targets in batches[:5]:  # warm-up (and a CUDA graph's warm-up and capture)
        trainer.train_step(inputs, targets)
    speeds = []
    for _ in range(trials):
        torch.cuda.synchronize()
        started = time.perf_counter()
        for inputs, targets in batches:
            trainer.train_step(inputs, targets)
        torch.cuda.synchronize()
        speeds.append(sum(t.numel() for _, t in batches) / (time.perf_counter() - started))
    return statistics.median(speeds), trainer.precision


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", default=str(DEFAULT_CORPUS))
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--parts", type=int, nargs="+", default=[1, 3, 4], help="1: throughput, 3: schedule, 4: DDP")
    parser.add_argument(
        "--backend", default="nccl", help="part 4's DDP backend (gloo runs part 4 on a CPU: a check of its plumbing)"
    )
    args = parser.parse_args()
    args.corpus = str(Path(args.corpus).resolve())  # part 4 runs the pipeline from a temporary directory
    if not Path(args.corpus).is_file():
        raise SystemExit(f"gpu_check: corpus {args.corpus} not found (--corpus)")
    if (1 in args.parts or 3 in args.parts or args.backend == "nccl") and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device visible to torch")
    if torch.cuda.is_available():
        print(
            f"{torch.cuda.get_device_name()}; torch {torch.__version__}, CUDA {torch.version.cuda}, "
            f"cuDNN {torch.backends.cudnn.version()}",
            flush=True,
        )
    text = read_corpus(args.corpus)

    if 1 in args.parts:
        print("\n1-2. eager, fp32 against mixed precision (notebook sizes and batches); eager against a CUDA graph")
    for arch in ("stateful_gru", "stateful_lstm") if 1 in args.parts else ():
        base = notebook(arch).override({"progress": False, "device": "cuda"})
        corpus = prepare_for(base, text)
        fp32, _ = throughput(base.override({"precision": "fp32"}), corpus, args.steps, args.trials)
        mixed, precision = throughput(base.override({"precision": "auto"}), corpus, args.steps, args.trials)
        print(f"  {arch}: fp32 {fp32:,.0f} chars/s, {precision} {mixed:,.0f} chars/s, ratio {mixed / fp32:.2f}")

        fixed = base.override({"data.random_bptt": False, "data.fixed_shape": True})
        eager, precision = throughput(fixed, corpus, args.steps, args.trials)
        graphed, _ = throughput(fixed.override({"cuda_graph": True}), corpus, args.steps, args.trials)
        print(
            f"  {arch} fixed shape, {precision}: eager {eager:,.0f} chars/s, CUDA graph {graphed:,.0f} chars/s, "
            f"ratio {graphed / eager:.2f}",
            flush=True,
        )

    if 3 in args.parts:
        config = notebook("stateful_lstm").override({"progress": False, "device": "cuda"})
        trainer = Trainer(config, prepare_for(config, text), callbacks=[EpochClock()])
        print(f"\n3. notebook LSTM schedule, {trainer.precision}:", flush=True)
        result = trainer.fit()
        print(
            f"\n3. notebook LSTM schedule ({config.epochs} epochs, {trainer.precision}): {result.wall_time:.1f} s, "
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


if __name__ == "__main__":
    main()
