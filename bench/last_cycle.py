"""A run's remaining epochs with a variant, from one of its checkpoints: what a regulariser or a
data setting does where the preset stops improving (its last SGDR cycle), at the cost of that
cycle alone instead of a whole run per variant.

    charlm train --arch stateful_lstm --preset awd_sgdr --seed 0 --corpus C --out runs/s0
    python bench/last_cycle.py --checkpoint runs/s0/cycle-4.pt --reference runs/s0/last.pt \\
        --variant heavier="model.dropout=0.4 model.weight_drop=0.4" --variant bptt64=data.context=64

Every variant starts from the same state — the checkpoint's weights, Adam's moments, the
schedule's position and the random stream — and trains the rest of the run's schedule with
its overrides applied to the run's config from there on (shapes must not change: a variant
whose parameters differ from the checkpoint's is refused). The control is the run itself
continued unchanged: trained here first (what ``charlm train --resume`` does), or, with
``--reference``, read from a checkpoint that the same run wrote later (its ``last.pt``; its
history must match the checkpoint's up to the start, which the script checks). Variants run
one after another with this process's torch threads, each with the machine to itself.

Prints every run's validation loss every 8th epoch and at the end of each remaining cycle,
its best, the difference from the control at the same epoch, and the wall time of each.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DEFAULT_CORPUS = ROOT.parent / "shared" / "data" / "nietzsche.txt"
CONTROL = "control"
KEPT = ("epoch", "val_loss", "train_loss")  # of each epoch's metrics


def parse_variants(specs: list[str]) -> list[tuple[str, list[str]]]:
    variants: list[tuple[str, list[str]]] = []
    for spec in specs:
        name, sep, overrides = spec.partition("=")
        if not sep or not name or not overrides.split() or name in dict(variants) or name == CONTROL:
            raise SystemExit(f"--variant {spec!r}: expected a new NAME=KEY=VALUE [KEY=VALUE ...]")
        variants.append((name, overrides.split()))
    return variants


def continue_run(payload: dict[str, Any], corpus_text: str, name: str, overrides: list[str]) -> dict[str, Any]:
    """Train the rest of the checkpoint's run with ``overrides``; its history from the start on."""
    from charlm.config import RunConfig
    from charlm.prepared import prepare_for
    from charlm.training import Callback, Trainer

    config = RunConfig.model_validate(payload["config"]).override([*overrides, "progress=false"])
    corpus = prepare_for(config, corpus_text)
    start = payload["progress"]["epoch"]

    class Print(Callback):
        def on_epoch_end(self, trainer: Trainer, epoch: int, m: dict[str, float]) -> None:
            print(
                f"  {name:12s} epoch {epoch + 1:2d}/{config.epochs}  val {m['val_loss']:.4f}  "
                f"train {m['train_loss']:.4f}  {m['chars_per_sec']:,.0f} chars/s",
                flush=True,
            )

    trainer = Trainer(config, corpus, callbacks=[Print()])
    mine = {k: tuple(v.shape) for k, v in trainer.module.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in payload.get("training_model", payload["model"]).items()}
    if mine != theirs:
        raise SystemExit(f"variant {name!r} ({' '.join(overrides)}): its parameters differ from the checkpoint's")
    trainer.load_state_dict(payload)
    print(f"  {name:12s} from epoch {start} ({' '.join(overrides) or 'unchanged'}), {trainer.precision}", flush=True)
    tick = time.perf_counter()
    result = trainer.fit()
    history = [{k: h[k] for k in KEPT} for h in result.history[start:]]
    return {"variant": name, "overrides": overrides, "history": history, "wall_s": time.perf_counter() - tick}


def reference_run(path: str, payload: dict[str, Any]) -> dict[str, Any]:
    """The control read from a later checkpoint of the same run."""
    from charlm.checkpoint import load_checkpoint

    later = load_checkpoint(path)
    start = payload["progress"]["epoch"]
    shared = [round(h["val_loss"], 6) for h in payload["history"]]
    if later["config"] != payload["config"] or [round(h["val_loss"], 6) for h in later["history"][:start]] != shared:
        raise SystemExit(f"--reference {path}: not a later checkpoint of the run that wrote --checkpoint")
    if later["progress"]["epoch"] <= start:
        raise SystemExit(f"--reference {path}: ends at epoch {later['progress']['epoch']}, not after {start}")
    history = [{k: h[k] for k in KEPT} for h in later["history"][start:]]
    times = [h["elapsed_s"] for h in later["history"]]
    return {"variant": CONTROL, "overrides": [], "history": history, "wall_s": times[-1] - times[start - 1]}


def cycle_ends(payload: dict[str, Any]) -> list[int]:
    from charlm.config import RunConfig
    from charlm.schedule import Schedule

    config = RunConfig.model_validate(payload["config"])
    start = payload["progress"]["epoch"]
    return sorted({int(seg.end) for seg in Schedule(config.schedule).segments if seg.end > start})


def report(runs: list[dict[str, Any]], start: int, ends: list[int]) -> None:
    control = {h["epoch"]: h["val_loss"] for h in runs[0]["history"]}
    best_control = min(control.values())
    checkpoints = sorted({*ends, *range(start + 8, ends[-1] + 1, 8)} & set(control))  # and every 8th epoch
    print("\nvalidation loss (variant - control) at these epochs, the best (its epoch) and the wall time")
    print(f"  {'':12s}" + "".join(f"{e:>17d}" for e in checkpoints) + f"{'best':>22s}{'wall':>10s}")
    for run in runs:
        loss = {h["epoch"]: h["val_loss"] for h in run["history"]}
        cells = []
        for epoch in checkpoints:
            if epoch not in loss:
                cells.append(f"{'—':>17s}")
            elif run is runs[0]:
                cells.append(f"{loss[epoch]:>17.4f}")
            else:
                cells.append(f"{loss[epoch]:.4f} ({loss[epoch] - control[epoch]:+.4f})".rjust(17))
        best_epoch = min(loss, key=loss.__getitem__)
        best = f"{loss[best_epoch]:.4f} ({best_epoch})"
        if run is not runs[0]:
            best += f" {loss[best_epoch] - best_control:+.4f}"
        print(f"  {run['variant']:12s}" + "".join(cells) + f"{best:>22s}{run['wall_s'] / 60:>8.1f} m")


def main() -> None:
    from charlm.device import flush_denormals

    flush_denormals()  # as charlm's CLI does, before torch's thread pool starts
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a run's checkpoint at an epoch's end (cycle-K.pt)")
    parser.add_argument("--corpus", default=str(DEFAULT_CORPUS))
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=OVERRIDES")
    parser.add_argument("--reference", help="a later checkpoint of the same run: the control, not retrained")
    parser.add_argument("--json", help="write every run's history here")
    args = parser.parse_args()

    from charlm.checkpoint import load_checkpoint
    from charlm.data import read_corpus

    variants = parse_variants(args.variant)
    payload = load_checkpoint(args.checkpoint)
    if payload["progress"]["batch"]:
        raise SystemExit(f"--checkpoint {args.checkpoint}: written mid-epoch; use one from an epoch's end")
    ends = cycle_ends(payload)
    if not ends:
        raise SystemExit(f"--checkpoint {args.checkpoint}: its run has no epochs left")
    text = read_corpus(args.corpus)
    runs: list[dict[str, Any]] = []
    for name, overrides in [(CONTROL, []), *variants]:
        if name == CONTROL and args.reference:
            runs.append(reference_run(args.reference, payload))
        else:
            runs.append(continue_run(payload, text, name, overrides))
        if args.json:  # after every run: a long comparison stopped early keeps what it finished
            Path(args.json).write_text(json.dumps(runs, indent=1))
    report(runs, payload["progress"]["epoch"], ends)


if __name__ == "__main__":
    main()
