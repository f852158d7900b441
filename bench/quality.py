"""Quality on the real corpus: a notebook preset trained end to end.

    python bench/quality.py                       # stateful_gru, the notebook's settings
    python bench/quality.py --arch stateful_lstm --set schedule...   # any preset/overrides

Reads ../shared/data/nietzsche.txt (or --corpus), lowercased and split 80/20 as in
the notebook, and prints every epoch's validation loss, the best figure and the
wall time. The notebook reports 1.3697 nats/char for stateful_gru.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from charlm.config import preset
from charlm.data import read_corpus
from charlm.training import Callback, Trainer, prepare_for

DEFAULT_CORPUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "nietzsche.txt"


class Print(Callback):
    def on_epoch_end(self, trainer, epoch, m):
        print(
            f"epoch {epoch + 1:2d}  train {m['train_loss']:.4f}  val {m['val_loss']:.4f}  "
            f"bpc {m['val_bpc']:.4f}  acc {m['val_accuracy']:.4f}  {m['chars_per_sec']:,.0f} chars/s",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="stateful_gru")
    parser.add_argument("--preset", default="notebook")
    parser.add_argument("--corpus", default=str(DEFAULT_CORPUS))
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--out", help="checkpoint directory")
    parser.add_argument("--json", help="write the result here")
    args = parser.parse_args()

    config = preset(args.preset, args.arch).override([*args.set, "progress=false"])
    t0 = time.perf_counter()
    corpus = prepare_for(config, read_corpus(args.corpus))
    prep = time.perf_counter() - t0
    print(f"{args.arch}: {config.epochs} epochs, corpus prepared in {prep:.3f}s {corpus.stats()}", flush=True)
    trainer = Trainer(config, corpus, callbacks=[Print()], checkpoint_dir=args.out)
    result = trainer.fit()
    summary = {
        "architecture": args.arch,
        "best_val_loss": round(result.best_val_loss, 4),
        "best_epoch": result.best_epoch,
        "epochs": len(result.history),
        "wall_time_s": round(result.wall_time, 1),
        "device": str(trainer.device),
        "parameters": result.parameters,
    }
    print(json.dumps(summary))
    if args.json:
        Path(args.json).write_text(json.dumps({**summary, "history": result.history}, indent=1))


if __name__ == "__main__":
    main()
