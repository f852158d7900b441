"""Mixed precision against fp32, measured in one run: throughput, then quality.

    python bench/precision.py                     # chars/s, fp32 vs bf16, and what `auto` picks
    python bench/precision.py --denormals         # the same with denormals kept and flushed
    python bench/precision.py --quality           # also the notebook GRU schedule in both, seeds 0 1
    python bench/precision.py --device cuda --mixed fp16

Throughput: the library's Trainer on the real corpus for each model (the notebook's GRU and
LSTM, and ``short_sgdr``'s and ``awd_sgdr``'s LSTMs, at their own batches), ``--steps``
steps per trial after ``--warmup`` steps (an fp32 LSTM drifts into denormal numbers within
tens of steps: fresh weights would flatter it), trials alternating between the precisions
so machine noise hits both alike; medians and the ratio mixed / fp32. A precision the device
cannot train in is reported with the library's own error (on a CPU without AVX512-BF16/AMX,
oneDNN refuses a bf16 LSTM). For each model it then prints what ``precision=auto`` chooses:
on a CPU with native bf16, the Trainer's own measurement of one step in each.

The process flushes denormals to zero first, as charlm's CLI and DDP workers do
(``--keep-denormals`` does not). ``--denormals`` runs the throughput part twice, in two
child processes, keeping and flushing them (the setting must precede torch's thread pool),
and prints both side by side.

Quality (``--quality``): the notebook's GRU schedule (9 epochs) per seed in fp32 and in the
mixed precision; prints each best validation loss and the difference (criterion: within
0.01 nats). On a CPU without native bf16 this takes many times the fp32 run's time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from charlm.device import flush_denormals

MODELS = ("notebook:stateful_gru", "notebook:stateful_lstm", "short_sgdr:stateful_lstm", "awd_sgdr:stateful_lstm")
if "--keep-denormals" in sys.argv:
    os.environ["CHARLM_KEEP_DENORMALS"] = "1"  # the Trainer would flush them otherwise
if "--denormals" not in sys.argv:
    flush_denormals()  # first, before torch's thread pool starts: its threads inherit it

from charlm.config import notebook, preset  # noqa: E402
from charlm.data import read_corpus  # noqa: E402
from charlm.device import PrecisionError, cpu_has_native_bf16, resolve_device  # noqa: E402
from charlm.prepared import prepare_for  # noqa: E402
from charlm.training import Trainer  # noqa: E402

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


def throughput(args: argparse.Namespace, text: str) -> dict[str, dict[str, float | str]]:
    """Per model: median chars/s in fp32 and the mixed precision, and ``auto``'s choice."""
    table: dict[str, dict[str, float | str]] = {}
    for model in args.models:
        name, arch = model.split(":")
        base = preset(name, arch).override({"progress": False, "device": args.device})
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
                    print(f"{model} {precision}: refused: {err}")
        row: dict[str, float | str] = {"fp32": statistics.median(speeds["fp32"])}
        line = f"{model} (batch {base.data.batch_size}, bptt {base.data.context}): fp32 {row['fp32']:,.0f} chars/s"
        if speeds[args.mixed]:
            row[args.mixed] = statistics.median(speeds[args.mixed])
            line += f", {args.mixed} {row[args.mixed]:,.0f} chars/s, ratio {args.mixed}/fp32 "
            line += f"{float(row[args.mixed]) / float(row['fp32']):.2f}"
        row["auto"] = Trainer(base, corpus).precision_note
        print(line + f"  (medians of {args.trials} trials of {args.steps} steps); auto: {row['auto']}", flush=True)
        table[model] = row
    return table


def compare_denormals(args: argparse.Namespace) -> None:
    """The throughput part in two child processes, denormals kept and flushed, side by side."""
    passed = [a for a in sys.argv[1:] if a not in ("--denormals", "--quality")]
    tables = {}
    for mode in ("keep", "flush"):
        extra = ["--keep-denormals"] if mode == "keep" else []
        print(f"--- denormals {mode}", flush=True)
        child = subprocess.run(
            [sys.executable, __file__, *passed, *extra, "--json-last"], check=True, stdout=subprocess.PIPE, text=True
        )
        lines = child.stdout.strip().splitlines()
        print("\n".join(lines[:-1]), flush=True)
        tables[mode] = json.loads(lines[-1])
    print(f"\nchars/s, denormals kept -> flushed (ratio), medians of {args.trials} trials of {args.steps} steps:")
    for model, keep in tables["keep"].items():
        flush = tables["flush"][model]
        cells = []
        for precision in ("fp32", args.mixed):
            if precision in keep and precision in flush:
                ratio = float(flush[precision]) / float(keep[precision])
                cells.append(f"{precision} {keep[precision]:,.0f} -> {flush[precision]:,.0f} ({ratio:.2f}x)")
        print(f"  {model}: " + "; ".join(cells) + f"; auto with flushing: {flush['auto']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", default=str(DEFAULT_CORPUS))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--mixed", default="bf16", choices=["bf16", "fp16"])
    parser.add_argument("--models", nargs="+", default=list(MODELS), help="preset:architecture")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--quality", action="store_true")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--denormals", action="store_true", help="compare keeping and flushing denormals")
    parser.add_argument("--keep-denormals", action="store_true", help="do not flush denormals to zero")
    parser.add_argument("--json-last", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.denormals:
        compare_denormals(args)
        return

    device = resolve_device(args.device)
    text = read_corpus(args.corpus)
    print(
        f"device {device} ({torch.backends.cpu.get_cpu_capability() if device.type == 'cpu' else 'cuda'}); "
        f"native bf16 on this CPU: {cpu_has_native_bf16()}; denormals "
        f"{'kept' if args.keep_denormals else 'flushed to zero'}",
        flush=True,
    )
    table = throughput(args, text)
    if args.json_last:
        print(json.dumps(table))
        return

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
