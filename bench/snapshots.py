"""Snapshot ensembles and weight averages against the best single snapshot, on the real corpus.

The notebook's stateful_lstm schedule — 2 epochs at a fixed rate, then SGDR with 4 cycles
(cycle_mult 2: 1 + 2 + 4 + 8 epochs) — with a smaller hidden size than the notebook's 512 so
that several seeds fit in a session on a 2-core CPU (``--hidden-size``; everything else as in
the notebook: lowercased, min_freq 3, the last 20% for validation). For each seed: the
validation loss of every snapshot, of the ensembles of the last 2, 3 and 4 snapshots and of
the weight averages of the same, with the greedy generation speed of each; then medians over
the seeds, and the ratio of each combination's loss to the best single snapshot's.

    python bench/snapshots.py --seeds 0 1 --hidden-size 128
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DEFAULT_CORPUS = ROOT.parent / "shared" / "data" / "nietzsche.txt"


def main() -> None:
    from charlm.device import flush_denormals

    flush_denormals()  # as charlm's CLI and workers do, before torch's thread pool starts
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", default=str(DEFAULT_CORPUS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--hidden-size", type=int, default=128, help="the notebook's is 512")
    parser.add_argument("--json")
    args = parser.parse_args()

    from charlm import prepared
    from charlm.candidates import generation_speed, snapshot_candidates, validation_metrics
    from charlm.config import notebook
    from charlm.ensemble import snapshot_paths
    from charlm.generate import LoadedModel
    from charlm.job import TrainJob, run_job

    work = Path(tempfile.mkdtemp(prefix="charlm-snapshots-"))
    rows: dict[str, dict[str, list[float]]] = {}

    def record(name: str, loss: float, speed: float) -> None:
        entry = rows.setdefault(name, {"val_loss": [], "gen_chars_per_sec": []})
        entry["val_loss"].append(loss)
        entry["gen_chars_per_sec"].append(speed)

    for seed in args.seeds:
        config = notebook("stateful_lstm").override(
            {"model.hidden_size": args.hidden_size, "seed": seed, "progress": False}
        )
        data = prepared.prepare(args.corpus, config, work / "store")
        corpus = prepared.load(data.dir)
        started = time.perf_counter()
        result = run_job(TrainJob(config=config, data=data, checkpoint_dir=str(work / f"seed{seed}")))
        print(f"seed {seed}: {result.epochs} epochs in {time.perf_counter() - started:.0f}s", flush=True)
        snapshots = snapshot_paths(work / f"seed{seed}")
        single = []
        for path in snapshots:
            loaded = LoadedModel.from_checkpoint(path, device="cpu")
            loss = validation_metrics(loaded, corpus)["val_loss"]
            single.append((loss, path))
            record(f"snapshot {path.stem}", loss, generation_speed(loaded))
        best_loss, best_path = min(single)
        record("best single snapshot", best_loss, rows[f"snapshot {best_path.stem}"]["gen_chars_per_sec"][-1])
        for combined in snapshot_candidates(snapshots, corpus, sizes=(2, 3, 4)):
            record(combined.label, combined.val_loss, combined.gen_chars_per_sec)
        print(
            f"seed {seed}: best single snapshot {best_loss:.4f} ({best_path.stem}); "
            + ", ".join(f"{name} {entry['val_loss'][-1]:.4f}" for name, entry in rows.items() if "last" in name),
            flush=True,
        )

    best = statistics.median(rows["best single snapshot"]["val_loss"])
    print(f"\nstateful_lstm 2x{args.hidden_size}, notebook schedule, seeds {args.seeds}: medians")
    print(f"{'candidate':<44} {'val loss':>9} {'vs best single':>15} {'gen chars/s':>12}")
    for name, entry in rows.items():
        loss = statistics.median(entry["val_loss"])
        speed = statistics.median(entry["gen_chars_per_sec"])
        print(f"{name:<44} {loss:>9.4f} {loss / best:>15.4f} {speed:>12,.0f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"hidden_size": args.hidden_size, "seeds": args.seeds, **rows}, indent=1))


if __name__ == "__main__":
    main()
