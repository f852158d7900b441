"""Time to quality: the notebook's schedules against the presets beyond it, in one run.

    python bench/time_to_quality.py                    # notebook GRU schedule vs short_sgdr, seeds 0 1
    python bench/time_to_quality.py --fast-arch stateful_gru   # short_sgdr's GRU instead of its LSTM
    python bench/time_to_quality.py --set precision=fp32       # both sides in fp32
    python bench/time_to_quality.py --lstm             # also awd_sgdr's LSTM to the notebook's best (long)
    python bench/time_to_quality.py --lstm-only --parallel   # the LSTM seeds side by side, one core each
    python bench/time_to_quality.py --lstm-only --parallel --snapshots   # and its snapshot ensembles
    python bench/time_to_quality.py --lstm-only --parallel --set model.dropout=0.4   # a variant of it
    python bench/time_to_quality.py --lstm-only --parallel --lstm-preset notebook_full   # the notebook's own
    python bench/time_to_quality.py --lstm-only --parallel --variant locked=model.locked_dropout=true
        # awd_sgdr and a variant of it side by side, each seed of each one process
    python bench/time_to_quality.py --lstm-only --parallel --snapshots --seeds 2 3 \
        --set 'distill={"teachers": ["runs/s0/best.pt", "runs/s1/best.pt"], "weight": 0.9}'
        # students of two earlier seeds' best checkpoints (charlm.distill; the seeds' wall time not counted)

Part 1 (the GRU figure, 1.3697): for each seed, the notebook's ``stateful_gru`` schedule
(9 epochs) and the ``short_sgdr`` preset (``--fast-arch``, default its 1 × 512 LSTM) train
on the same corpus, one after the other, alternating which goes first. The notebook
schedule's wall time is the baseline; the preset's is the elapsed time at the end of the
first epoch whose validation loss reached 1.3697. Prints both, per seed and as medians,
and the ratio preset / notebook. Both sides get this process's torch threads (the whole
machine by default, as a nightly run has it; ``OMP_NUM_THREADS=1`` gives each side one core).

Part 2 (the notebook's best LSTM, 1.2524): ``awd_sgdr``'s ``stateful_lstm`` per seed
(``--lstm-preset notebook_full``: the notebook's own LSTM training, all 80 epochs of it, instead);
prints the best validation loss, the time at which 1.2524 (and 1.22) was first reached,
and the total wall time. ``--parallel`` trains the seeds at once, one process and one
torch thread each (a seed then has one core of this 2-core machine: its times are an
upper bound for a run that has the machine to itself). ``--variant NAME=OVERRIDES`` (repeatable;
overrides separated by spaces) trains each variant beside ``awd_sgdr`` itself, every seed, and
prints each variant's loss at the end of every SGDR cycle against ``awd_sgdr``'s at the same
epoch, seed by seed: a comparison measured in one run.

Every validation loss is measured on the notebook's task (lowercased, ``min_freq`` 3, the
last 20% of the text) with the notebook's validation batch (64 columns). Wall time includes
every validation pass. ``--plot`` draws validation loss against time for every run.
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
from typing import Any

DEFAULT_CORPUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "nietzsche.txt"
GRU_TARGET, LSTM_TARGET, STRETCH = 1.3697, 1.2524, 1.22
BASELINE = "awd_sgdr"  # part 2's preset by default (--lstm-preset); its variants are compared with it


def train(
    preset_name: str,
    arch: str,
    seed: int,
    corpus_path: str,
    sets: list[str],
    snapshots_dir: str | None = None,
    label: str | None = None,
) -> dict[str, Any]:
    """One training run. With ``snapshots_dir`` its SGDR cycle snapshots are kept there, and the
    ensembles and weight averages of the last 2, 3 and 4 (what the pipeline offers for promotion)
    are evaluated on the same validation split once training ends — outside its wall time."""
    from charlm.config import preset
    from charlm.data import read_corpus
    from charlm.prepared import prepare_for
    from charlm.training import Callback, Trainer, time_to_targets

    config = preset(preset_name, arch).override([*sets, "progress=false", f"seed={seed}"])
    corpus = prepare_for(config, read_corpus(corpus_path))

    class Print(Callback):
        def on_epoch_end(self, trainer: Trainer, epoch: int, m: dict[str, float]) -> None:
            print(
                f"  {label or preset_name:10s} {arch} seed {seed} epoch {epoch + 1:2d}/{config.epochs}  "
                f"val {m['val_loss']:.4f}  at {m['elapsed_s']:7.1f} s  {m['chars_per_sec']:,.0f} chars/s",
                flush=True,
            )

    trainer = Trainer(config, corpus, callbacks=[Print()], checkpoint_dir=snapshots_dir)
    # what the run trains in, before its first epoch: auto's choice is per process and per machine
    print(f"  {label or preset_name:10s} {arch} seed {seed}: precision {trainer.precision_note}", flush=True)
    result = trainer.fit()
    history = [{k: h[k] for k in ("epoch", "val_loss", "elapsed_s")} for h in result.history]
    combined: list[dict[str, Any]] = []
    if snapshots_dir is not None:
        from charlm.candidates import snapshot_candidates
        from charlm.ensemble import snapshot_paths

        candidates = snapshot_candidates(snapshot_paths(snapshots_dir), corpus, device=str(trainer.device))
        combined = [{"kind": c.kind, "members": len(c.members), "val_loss": c.val_loss} for c in candidates]
    return {
        "preset": preset_name,
        "variant": label or preset_name,
        "overrides": sets,
        "architecture": arch,
        "seed": seed,
        "threads": __import__("torch").get_num_threads(),
        "precision": trainer.precision,
        "parameters": result.parameters,
        "best_val_loss": result.best_val_loss,
        "wall_time_s": result.history[-1]["elapsed_s"],
        "time_to": time_to_targets(result.history, (GRU_TARGET, LSTM_TARGET, STRETCH)),
        "history": history,
        "snapshot_candidates": combined,
    }


def gru_part(args: argparse.Namespace) -> dict[str, Any]:
    runs: list[dict[str, Any]] = []
    for i, seed in enumerate(args.seeds):
        order = [("notebook", "stateful_gru"), ("short_sgdr", args.fast_arch)]
        for name, arch in order if i % 2 == 0 else order[::-1]:
            runs.append(train(name, arch, seed, args.corpus, args.set))
    notebook = [r for r in runs if r["preset"] == "notebook"]
    preset = [r for r in runs if r["preset"] == "short_sgdr"]
    key = f"{GRU_TARGET:g}"
    baseline = statistics.median(r["wall_time_s"] for r in notebook)
    reached = [r["time_to"].get(key) for r in preset]
    print(
        f"\ntarget {key} (the notebook's GRU): notebook stateful_gru vs short_sgdr {args.fast_arch}, "
        f"seeds {args.seeds}, {runs[0]['threads']} torch thread(s), "
        f"precision {'/'.join(sorted({r['precision'] for r in runs}))}"
    )
    for r in notebook + preset:
        t = r["time_to"].get(key)
        print(
            f"  {r['preset']:10s} {r['architecture']} seed {r['seed']}: best {r['best_val_loss']:.4f}  "
            f"wall {r['wall_time_s']:6.1f} s  "
            f"reached {key} at {'%.1f s' % t if t is not None else 'never'}"
        )
    summary: dict[str, Any] = {"notebook_median_wall_s": baseline}
    summary["notebook_median_best"] = statistics.median(r["best_val_loss"] for r in notebook)
    summary["preset_median_best"] = statistics.median(r["best_val_loss"] for r in preset)
    if all(t is not None for t in reached):
        median = statistics.median(t for t in reached if t is not None)
        # paired: each seed's two runs ran back to back, under the same load
        ratios = [p["time_to"][key] / n["wall_time_s"] for p, n in zip(preset, notebook)]
        summary.update(preset_median_time_to_target_s=median, ratios=ratios, ratio=statistics.median(ratios))
        print(
            f"  median: notebook schedule {baseline:.1f} s; short_sgdr reached {key} at {median:.1f} s; "
            f"per seed {', '.join(f'{r:.2f}' for r in ratios)} -> median ratio {statistics.median(ratios):.2f} "
            "(target <= 0.50)"
        )
    else:
        print(f"  short_sgdr did not reach {key} in every seed: {reached}")
    return {"runs": runs, "summary": summary}


def parse_variants(specs: list[str], baseline: str) -> list[tuple[str, list[str]]]:
    """The preset itself first, then each ``NAME=OVERRIDE OVERRIDE ...``."""
    variants: list[tuple[str, list[str]]] = [(baseline, [])]
    for spec in specs:
        name, sep, overrides = spec.partition("=")
        if not sep or not name or not overrides.split() or name in dict(variants):
            raise SystemExit(f"--variant {spec!r}: expected a new NAME=KEY=VALUE [KEY=VALUE ...]")
        variants.append((name, overrides.split()))
    return variants


def lstm_part(args: argparse.Namespace) -> dict[str, Any]:
    variants = parse_variants(args.variant, args.lstm_preset)
    jobs = [(name, overrides, seed) for name, overrides in variants for seed in args.seeds]
    if args.parallel and len(jobs) > 1:  # one process per variant and seed, one torch thread each
        Path(args.workdir).mkdir(parents=True, exist_ok=True)
        procs, outs = [], []
        for name, overrides, seed in jobs:
            out = Path(args.workdir) / f"lstm-{name}-seed{seed}.json"
            one = f"{args.lstm_preset}:stateful_lstm:{seed}"
            cmd = [sys.executable, __file__, "--one", one, "--corpus", args.corpus]
            cmd += ["--workdir", args.workdir, "--label", name]
            cmd += ["--snapshots"] if args.snapshots else []
            cmd += [arg for override in [*args.set, *overrides] for arg in ("--set", override)]
            env = {**os.environ, "OMP_NUM_THREADS": "1"}
            procs.append(subprocess.Popen([*cmd, "--json", str(out)], env=env))
            outs.append(out)
        if any(p.wait() for p in procs):
            raise SystemExit("an LSTM run failed")
        runs = [json.loads(o.read_text()) for o in outs]
    else:
        runs = [
            train(
                args.lstm_preset, "stateful_lstm", seed, args.corpus, [*args.set, *overrides],
                snapshots_dir(args, seed, name), label=name,
            )
            for name, overrides, seed in jobs
        ]  # fmt: skip
    report: dict[str, Any] = {"runs": runs}
    for name, overrides in variants:
        own = [r for r in runs if r["variant"] == name]
        report[name] = lstm_summary(args, name, overrides, own)
        if args.snapshots and len(args.seeds) > 1:
            report[name]["seed_ensemble_val_loss"] = seed_ensemble(args, name)
    if len(variants) > 1:
        report["comparison"] = compare_variants(runs, [name for name, _ in variants], args.lstm_preset)
    return report


def lstm_summary(
    args: argparse.Namespace, name: str, overrides: list[str], runs: list[dict[str, Any]]
) -> dict[str, Any]:
    where = " in parallel, 1 thread each" if args.parallel else ""
    settings = [*args.set, *overrides]
    plus = " + " + " ".join(settings) if settings else ""
    print(f"\nstateful_lstm {args.lstm_preset}{plus} ({name}), seeds {args.seeds}{where}")
    for r in runs:
        times = ", ".join(f"{k} at {v / 60:.1f} min" for k, v in r["time_to"].items()) or "no target reached"
        print(
            f"  seed {r['seed']}: best {r['best_val_loss']:.4f}  wall {r['wall_time_s'] / 60:.1f} min  "
            f"{r['precision']}  ({times})"
        )
        for c in r["snapshot_candidates"]:
            print(f"    {c['kind']} of the last {c['members']} cycle snapshots: val {c['val_loss']:.4f}")
    summary: dict[str, Any] = {
        "median_best": statistics.median(r["best_val_loss"] for r in runs),
        "median_wall_s": statistics.median(r["wall_time_s"] for r in runs),
    }
    for target in (LSTM_TARGET, STRETCH):
        times = [r["time_to"].get(f"{target:g}") for r in runs]
        if all(t is not None for t in times):
            summary[f"median_time_to_{target:g}_s"] = statistics.median(t for t in times if t is not None)
    print(
        f"  median best {summary['median_best']:.4f} (notebook's best LSTM {LSTM_TARGET}, stretch {STRETCH}); "
        + ", ".join(f"{k} {v / 60:.1f} min" for k, v in summary.items() if k.endswith("_s"))
    )
    if all(r["snapshot_candidates"] for r in runs):
        for i, c in enumerate(runs[0]["snapshot_candidates"]):
            label = f"{c['kind']} of the last {c['members']}"
            summary[f"median {label}"] = statistics.median(r["snapshot_candidates"][i]["val_loss"] for r in runs)
            print(f"  median {label} cycle snapshots: {summary[f'median {label}']:.4f}")
    return summary


def seed_ensemble(args: argparse.Namespace, name: str) -> float:
    """The ensemble of the seeds' best checkpoints (probabilities averaged: as many models' cost
    as seeds), on the same validation split and columns as each run's own validation: what
    training the seeds side by side buys as one model, against each seed's best alone."""
    from charlm.candidates import validation_metrics
    from charlm.data import read_corpus
    from charlm.generate import LoadedModel
    from charlm.prepared import prepare_for

    dirs = [snapshots_dir(args, seed, name) for seed in args.seeds]
    paths = [Path(d) / "best.pt" for d in dirs if d is not None]  # every one, with --snapshots
    loaded = LoadedModel.from_checkpoints(paths, combine="ensemble", device="cpu")
    loss = validation_metrics(loaded, prepare_for(loaded.config, read_corpus(args.corpus)))["val_loss"]
    print(f"  ensemble of the {len(paths)} seeds' best checkpoints ({len(paths)} models' cost): val {loss:.4f}")
    return loss


def cycle_ends(run: dict[str, Any]) -> list[int]:
    """The epochs (1-based, as the history counts them) that end a phase or an SGDR cycle of the
    run's schedule, up to the last it trained: 1, 2, 4, 8, ... for awd_sgdr."""
    from charlm.config import preset
    from charlm.schedule import Schedule

    config = preset(run["preset"], run["architecture"]).override(run["overrides"])
    trained = max(h["epoch"] for h in run["history"])
    return sorted({int(seg.end) for seg in Schedule(config.schedule).segments if seg.end <= trained})


def compare_variants(runs: list[dict[str, Any]], names: list[str], baseline: str) -> dict[str, Any]:
    """Each variant's validation loss minus the preset's, same seed, same epoch: at every phase's
    and cycle's end and at their bests. Printed per seed and as the median over seeds."""
    base = {r["seed"]: r for r in runs if r["variant"] == baseline}
    ends = cycle_ends(next(iter(base.values())))
    print(f"\nvariants against {baseline}, validation loss at the end of each phase and cycle (variant - {baseline})")
    print("  " + f"{'epoch':28s}" + "".join(f"{e:>17d}" for e in ends) + f"{'best':>17s}")
    comparison: dict[str, Any] = {}
    for name in names:
        diffs: dict[str, list[float]] = {}
        for r in (r for r in runs if r["variant"] == name):
            loss = {h["epoch"]: h["val_loss"] for h in r["history"]}
            ref = {h["epoch"]: h["val_loss"] for h in base[r["seed"]]["history"]}
            cells = []
            for key, mine, theirs in [
                *((str(e), loss.get(e), ref.get(e)) for e in ends),
                ("best", r["best_val_loss"], base[r["seed"]]["best_val_loss"]),
            ]:
                if mine is None or theirs is None:
                    cells.append(f"{'—':>17s}")
                    continue
                diff = mine - theirs
                if name != baseline:
                    diffs.setdefault(key, []).append(diff)
                cells.append(f"{mine:.4f} ({diff:+.4f})".rjust(17) if name != baseline else f"{mine:>17.4f}")
            print(f"  {name + ' seed ' + str(r['seed']):28s}" + "".join(cells))
        if name != baseline:
            comparison[name] = {k: statistics.median(v) for k, v in diffs.items()}
            print(
                f"  {name + ' median difference':28s}"
                + "".join(f"{comparison[name][k]:>+17.4f}" if k in comparison[name] else f"{'—':>17s}"
                          for k in [*map(str, ends), "best"])
            )  # fmt: skip
    return comparison


def snapshots_dir(args: argparse.Namespace, seed: int, name: str) -> str | None:
    suffix = "" if name == args.lstm_preset else f"-{name}"
    return str(Path(args.workdir) / f"lstm-seed{seed}{suffix}-snapshots") if args.snapshots else None


def run_label(run: dict[str, Any]) -> str:
    """A run's name in the plot: its variant (or preset), architecture and seed, and the settings
    it was trained with beyond them (``--set`` and a variant's overrides), keys shortened to their
    last part — so a run with AR and TAR is not drawn as the preset itself."""
    settings = []
    for override in run.get("overrides", []):
        key, _, value = override.partition("=")
        setting = f"{key.rsplit('.', 1)[-1]}={value}"
        settings.append(setting if len(setting) <= 40 else setting[:37] + "...")
    extra = f" ({', '.join(settings)})" if settings else ""
    return f"{run['variant']} {run['architecture']} seed {run['seed']}{extra}"


def plot(runs: list[dict[str, Any]], path: str) -> Any:
    """Validation loss against wall-clock minutes, one line per run, the notebook's two figures
    drawn across and named; returns the figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from charlm.compare import mark_targets

    fig, ax = plt.subplots(figsize=(9, 5), dpi=100)
    for r in runs:
        ax.plot(
            [h["elapsed_s"] / 60 for h in r["history"]],
            [h["val_loss"] for h in r["history"]],
            marker="o",
            markersize=3,
            label=run_label(r),
        )
    targets = ((GRU_TARGET, "notebook's GRU"), (LSTM_TARGET, "notebook's best LSTM"))
    mark_targets(ax, [(target, f"{name} {target:g}") for target, name in targets], linewidth=0.8)
    ax.set_xlabel("wall-clock minutes (validation included)")
    ax.set_ylabel("validation loss (nats/char)")
    ax.set_ylim(top=1.6)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    print(f"plot: {path}")
    return fig


def main() -> None:
    from charlm.device import flush_denormals

    flush_denormals()  # as charlm's CLI and workers do, before torch's thread pool starts
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", default=str(DEFAULT_CORPUS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--fast-arch", default="stateful_lstm", help="short_sgdr's architecture in part 1")
    parser.add_argument("--lstm", action="store_true", help="also part 2: awd_sgdr's LSTM to 1.2524")
    parser.add_argument(
        "--lstm-preset",
        default=BASELINE,
        help="part 2's preset (default awd_sgdr; notebook_full: the notebook's own 80-epoch LSTM training)",
    )
    parser.add_argument("--lstm-only", action="store_true", help="only part 2")
    parser.add_argument("--parallel", action="store_true", help="part 2's seeds at once, one thread each")
    parser.add_argument("--workdir", default="/tmp", help="where parallel seeds leave their results")
    parser.add_argument(
        "--snapshots",
        action="store_true",
        help="part 2 keeps its cycle snapshots in --workdir and evaluates their ensembles and weight averages, "
        "and (with 2+ seeds) the ensemble of the seeds' best checkpoints",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an override for every run it trains (part 1: both sides)",
    )
    parser.add_argument("--json", help="write every run and the summaries here")
    parser.add_argument("--plot", help="write validation loss against time (PNG) here")
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME=KEY=VALUE ...",
        help="part 2: also awd_sgdr with these overrides (space-separated), compared epoch by epoch",
    )
    parser.add_argument("--one", help=argparse.SUPPRESS)  # PRESET:ARCH:SEED, for --parallel
    parser.add_argument("--label", help=argparse.SUPPRESS)  # the variant --one trains
    args = parser.parse_args()

    if args.one:
        name, arch, seed = args.one.split(":")
        args.lstm_preset, label = name, args.label or name  # the preset --one trains is part 2's
        run = train(name, arch, int(seed), args.corpus, args.set, snapshots_dir(args, int(seed), label), label)
        Path(args.json).write_text(json.dumps(run))
        return
    started = time.perf_counter()
    report: dict[str, Any] = {}
    if not args.lstm_only:
        report["gru"] = gru_part(args)
    if args.lstm or args.lstm_only:
        report["lstm"] = lstm_part(args)
    print(f"\nbench wall time {time.perf_counter() - started:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    if args.plot:
        plot([r for part in report.values() for r in part["runs"]], args.plot)


if __name__ == "__main__":
    main()
