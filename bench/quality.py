"""Quality on the real corpus: a notebook preset trained end to end.

    python bench/quality.py                       # stateful_gru, the notebook's settings, seed 0
    python bench/quality.py --seeds 0 1 2         # three runs, medians
    python bench/quality.py --arch stateful_lstm --set model.hidden_size=256

Reads ../shared/data/nietzsche.txt (or --corpus), lowercased and split 80/20 as in
the notebook, and prints every epoch's validation loss, the best figure and the
wall time. The notebook reports 1.3697 nats/char for stateful_gru.

Validation is measured as the notebook's loader cut it: ``batch_size`` columns read
``bptt`` at a time, each column starting from a zero hidden state. For stateful
models the best checkpoint is also measured over the validation text read as one
stream (``best_val_loss_one_stream``): the notebook's own models never reset their
hidden state, so their validation started warm rather than from 64 zero states.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from charlm.config import preset
from charlm.data import read_corpus
from charlm.prepared import prepare_for
from charlm.training import Callback, Trainer

DEFAULT_CORPUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "nietzsche.txt"


class Print(Callback):
    def on_epoch_end(self, trainer, epoch, m):
        print(
            f"epoch {epoch + 1:2d}  train {m['train_loss']:.4f}  val {m['val_loss']:.4f}  "
            f"bpc {m['val_bpc']:.4f}  acc {m['val_accuracy']:.4f}  {m['chars_per_sec']:,.0f} chars/s",
            flush=True,
        )


def train_one(args, seed: int) -> dict:
    import tempfile

    from charlm.generate import LoadedModel

    config = preset(args.preset, args.arch).override([*args.set, "progress=false", f"seed={seed}"])
    text = read_corpus(args.corpus)
    t0 = time.perf_counter()
    corpus = prepare_for(config, text)
    prep = time.perf_counter() - t0
    print(
        f"{args.arch} seed {seed}: {config.epochs} epochs, corpus prepared in {prep:.3f}s {corpus.stats()}", flush=True
    )
    out = Path(args.out) / f"seed{seed}" if args.out else Path(tempfile.mkdtemp(prefix="charlm-quality-"))
    trainer = Trainer(config, corpus, callbacks=[Print()], checkpoint_dir=out)
    result = trainer.fit()
    summary = {
        "seed": seed,
        "best_val_loss": round(result.best_val_loss, 4),
        "best_epoch": result.best_epoch,
        "epochs": len(result.history),
        "wall_time_s": round(result.wall_time, 1),
        "device": str(trainer.device),
        "parameters": result.parameters,
        "history": result.history,
    }
    if trainer.module.stateful:
        # The same best checkpoint, its validation text read as one stream (one zero state
        # at the start instead of one per batch column).
        loaded = LoadedModel.from_checkpoint(out / "best.pt", device=trainer.device)
        summary["best_val_loss_one_stream"] = round(
            loaded.evaluate_text(text, batch_size=1, context=256)["val_loss"], 4
        )
    print(json.dumps({k: v for k, v in summary.items() if k != "history"}), flush=True)
    return summary


def main() -> None:
    from charlm.device import flush_denormals

    flush_denormals()  # as charlm's CLI and workers do, before torch's thread pool starts
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="stateful_gru")
    parser.add_argument("--preset", default="notebook")
    parser.add_argument("--corpus", default=str(DEFAULT_CORPUS))
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="one run per seed; medians are printed")
    parser.add_argument("--out", help="checkpoint directory (one subdirectory per seed)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()

    runs = [train_one(args, seed) for seed in args.seeds]
    report = {
        "architecture": args.arch,
        "preset": args.preset,
        "runs": runs,
        "median_best_val_loss": statistics.median(r["best_val_loss"] for r in runs),
        "median_wall_time_s": statistics.median(r["wall_time_s"] for r in runs),
    }
    if all("best_val_loss_one_stream" in r for r in runs):
        report["median_best_val_loss_one_stream"] = statistics.median(r["best_val_loss_one_stream"] for r in runs)
    print(json.dumps({k: v for k, v in report.items() if k != "runs"}))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
