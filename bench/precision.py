"""Mixed precision against fp32, measured in one run: throughput, then quality.

    python bench/precision.py                     # chars/s, GRU and LSTM (notebook sizes), fp32 vs bf16
    python bench/precision.py --quality           # also the notebook GRU schedule in both, seeds 0 1
    python bench/precision.py --device cuda --mixed fp16

Throughput: the library's Trainer on the real corpus, ``--steps`` steps per trial after a
warm-up, trials alternating between the precisions so machine noise hits both alike;
medians and the ratio mixed / fp32. A precision the device cannot train in is reported
with the library's own error (on a CPU without AVX512-BF16/AMX, oneDNN refuses a bf16 LSTM).

Quality (``--quality``): the notebook's GRU schedule (9 epochs) per seed in fp32 and in the
mixed precision; prints each best validation loss and the difference (criterion: within
0.01 nats). On a CPU without native bf16 this takes many times the fp32 run's time.

It also says what ``precision=auto`` resolves to here, which is what every run uses by default.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from charlm.config import notebook
from charlm.data import read_corpus
from charlm.device import PrecisionError, cpu_has_native_bf16, resolve_device, resolve_precision
from charlm.prepared import prepare_for
from charlm.training import Trainer

DEFAULT_CORPUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "nietzsche.txt"


def chars_per_sec(config, corpus, steps: int, warmup: int) -> float:
    trainer = Trainer(config, corpus)
    trainer.fit(max_steps=warmup)
    if trainer.device.type == "cuda":
        torch.cuda.synchronize(trainer.device)
    chars, started = 0, time.perf_counter()
    layout = trainer.train_layout
    plan = layout.plan(0, config.seed, True)
    for index in range(steps):
        inputs, targets = layout.batch(plan[index % len(plan)])
        trainer.train_step(inputs, targets)
        chars += targets.numel()
    if trainer.device.type == "cuda":
        torch.cuda.synchronize(trainer.device)
    return chars / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", default=str(DEFAULT_CORPUS))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--mixed", default="bf16", choices=["bf16", "fp16"])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--quality", action="store_true")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    args = parser.parse_args()

    device = resolve_device(args.device)
    text = read_corpus(args.corpus)
    print(
        f"device {device} ({torch.backends.cpu.get_cpu_capability() if device.type == 'cpu' else 'cuda'}); "
        f"native bf16 on this CPU: {cpu_has_native_bf16()}; precision=auto resolves to "
        f"{resolve_precision('auto', device)} here"
    )
    for arch in ("stateful_gru", "stateful_lstm"):
        base = notebook(arch).override({"progress": False, "device": args.device})
        corpus = prepare_for(base, text)
        speeds: dict[str, list[float]] = {"fp32": [], args.mixed: []}
        refused = ""
        for _ in range(args.trials):
            for precision in list(speeds):
                if precision == refused:
                    continue
                try:
                    config = base.override({"precision": precision})
                    speeds[precision].append(chars_per_sec(config, corpus, args.steps, args.warmup))
                except PrecisionError as err:
                    refused = precision
                    print(f"{arch} {precision}: refused: {err}")
        fp32 = statistics.median(speeds["fp32"])
        line = f"{arch} (batch {base.data.batch_size}, bptt {base.data.context}): fp32 {fp32:,.0f} chars/s"
        if speeds[args.mixed]:
            mixed = statistics.median(speeds[args.mixed])
            line += f", {args.mixed} {mixed:,.0f} chars/s, ratio {args.mixed}/fp32 {mixed / fp32:.2f}"
        print(line + f"  (medians of {args.trials} trials of {args.steps} steps)", flush=True)

    if args.quality:
        config = notebook("stateful_gru").override({"progress": False, "device": args.device})
        corpus = prepare_for(config, text)
        diffs = []
        for seed in args.seeds:
            best = {}
            for precision in ("fp32", args.mixed):
                trainer = Trainer(config.override({"seed": seed, "precision": precision}), corpus)
                result = trainer.fit()
                best[precision] = result.best_val_loss
                print(f"  GRU seed {seed} {precision}: best {result.best_val_loss:.4f} in {result.wall_time:.0f} s")
            diffs.append(best[args.mixed] - best["fp32"])
        print(
            f"GRU schedule {args.mixed} - fp32, per seed: {[round(d, 4) for d in diffs]}; "
            f"median {statistics.median(diffs):+.4f} (criterion |diff| <= 0.01)"
        )


if __name__ == "__main__":
    main()
