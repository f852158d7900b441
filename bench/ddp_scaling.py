"""DDP scaling: characters/second for 1 rank × T threads against R ranks × T/R threads.

On this 2-core CPU: 1 rank × 2 threads vs 2 ranks × 1 thread (gloo). With
``--device cuda`` (a GPU host): 1 GPU with NCCL, plus the wall time of the
notebook's LSTM schedule (2 × 512, 2 + 15 SGDR epochs) with ``--lstm-schedule``.
Throughput is the trainer's own per-epoch figure (training steps only, global
characters over rank 0's training time); trials alternate and medians are compared.

    python bench/ddp_scaling.py --trials 3
    python bench/ddp_scaling.py --arch stateful_lstm --preset awd_sgdr --trials 3
    python bench/ddp_scaling.py --device cuda --ranks 1 --lstm-schedule
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

DEFAULT_CORPUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "nietzsche.txt"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="stateful_gru")
    parser.add_argument("--preset", default="notebook", help="the preset whose model and batches one epoch trains")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config overrides")
    parser.add_argument("--corpus", default=str(DEFAULT_CORPUS))
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="CPU threads in all")
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument(
        "--lstm-schedule", action="store_true", help="also time the notebook's full stateful_lstm schedule on one rank"
    )
    parser.add_argument("--json")
    args = parser.parse_args()

    from charlm.config import Phase, notebook, preset
    from charlm.distributed import DistributedConfig, launch_training
    from charlm.job import TrainJob
    from charlm.prepared import prepare

    work = Path(tempfile.mkdtemp(prefix="charlm-ddp-"))
    backend = "nccl" if args.device == "cuda" else "gloo"
    one_epoch = (
        preset(args.preset, args.arch)
        .override(args.set)
        .override({"schedule": [Phase.constant(1e-3, 1).model_dump()], "progress": False})
    )
    data = prepare(args.corpus, one_epoch, work / "store")

    figures: dict[int, list[float]] = {r: [] for r in args.ranks}
    for trial in range(args.trials):
        for ranks in args.ranks:
            dist = DistributedConfig(
                nproc_per_node=ranks,
                backend=backend,
                threads_per_rank=max(args.threads // ranks, 1) if args.device == "cpu" else None,
            )
            job = TrainJob(config=one_epoch, data=data, checkpoint_dir=str(work / f"t{trial}-r{ranks}"))
            out = launch_training(job, dist=dist)
            figures[ranks].append(out.history[0]["chars_per_sec"])
            print(f"trial {trial + 1}: {ranks} rank(s) on {out.device}: {figures[ranks][-1]:,.0f} chars/s", flush=True)
    base = statistics.median(figures[args.ranks[0]])
    report = {
        "arch": args.arch,
        "preset": args.preset,
        "set": args.set,
        "device": args.device,
        "chars_per_sec": figures,
    }
    for ranks in args.ranks:
        median = statistics.median(figures[ranks])
        line = f"{args.arch} ({args.preset}), {ranks} rank(s): median {median:,.0f} chars/s"
        if ranks != args.ranks[0]:
            line += f", speed-up {median / base:.2f}x over {args.ranks[0]} rank(s) on the same cores"
        print(line)
    if args.lstm_schedule:
        lstm = notebook("stateful_lstm").override({"progress": False})
        job = TrainJob(config=lstm, data=prepare(args.corpus, lstm, work / "store"), checkpoint_dir=str(work / "lstm"))
        t0 = time.perf_counter()
        out = launch_training(job, dist=DistributedConfig(nproc_per_node=1, backend=backend))
        report["lstm_schedule"] = {
            "wall_s": time.perf_counter() - t0,
            "best_val_loss": out.best_val_loss,
            "epochs": out.epochs,
        }
        print(
            f"stateful_lstm notebook schedule ({out.epochs} epochs) on {out.device}: "
            f"{report['lstm_schedule']['wall_s']:.0f}s, best val loss {out.best_val_loss:.4f}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
