"""Where an epoch's time goes, beside the optimiser steps themselves, measured in one run.

    python bench/step_costs.py                          # notebook GRU, notebook LSTM, awd_sgdr LSTM
    python bench/step_costs.py --only stateful_gru:notebook --steps 100
    python bench/step_costs.py --only stateful_lstm:awd_sgdr --set data.batch_size=64

For each configuration, on the real corpus:

* **steps** — forward, backward, clipping and Adam (``Trainer.train_step``), the median
  of ``--trials`` timings of ``--steps`` steps, scaled to the epoch's characters (with a random
  bptt the steps differ in length);
* **batches** — building every batch of the epoch (slicing the device-resident corpus,
  the dtype cast) and the learning rate of each step, timed over the whole epoch plan;
* **loop** — the rest of the trainer's loop per step (setting the learning rate, the loss
  sums, hooks, the stop and checkpoint checks): the time ``fit`` spends outside its steps, less
  the batches, taken as the difference between ``fit`` runs of 2 × and 1 × ``--steps`` (which
  drops ``fit``'s set-up, a fixed cost per call);
* **validation** — one full validation pass, as each epoch runs it;
* **checkpoints** — ``last.pt`` and ``best.pt`` as most epochs write them (median of 3 writes each);
* **threads** — the steps' throughput with this process's torch threads against 1 (or 2).

Prints seconds per epoch and each part's share of their sum.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from charlm.config import preset
from charlm.data import read_corpus
from charlm.prepared import prepare_for
from charlm.training import Trainer

DEFAULT_CORPUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "nietzsche.txt"
DEFAULT = ["stateful_gru:notebook", "stateful_lstm:notebook", "stateful_lstm:awd_sgdr"]


def timed(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def step_runner(trainer: Trainer, plan: list, steps: int) -> tuple[Callable[[], None], int]:
    """``steps`` optimiser steps on the epoch's first batches, and how many characters they hold
    (with a random bptt the batches differ in length, so costs scale by characters, not steps)."""
    batches = [trainer.train_layout.batch(plan[i % len(plan)]) for i in range(steps)]

    def run() -> None:
        for inputs, targets in batches:
            trainer.train_step(inputs, targets)
        if trainer.device.type == "cuda":
            torch.cuda.synchronize(trainer.device)

    return run, sum(targets.numel() for _, targets in batches)


def measure(arch: str, preset_name: str, text: str, steps: int, trials: int, overrides: list[str]) -> None:
    config = preset(preset_name, arch).override(["progress=false", *overrides])
    corpus = prepare_for(config, text)
    out = Path(tempfile.mkdtemp(prefix="charlm-costs-"))
    trainer = Trainer(config, corpus, checkpoint_dir=out)
    trainer.fit(max_steps=3)  # warm-up: allocations, oneDNN/cuDNN primitives
    plan = trainer.train_layout.plan(0, config.seed, True)
    n = len(plan)
    if 3 + 3 * trials * steps > n:  # the loop's runs must stay inside the first epoch (no validation)
        raise SystemExit(f"--steps {steps} x --trials {trials}: too many for one epoch of {n} steps of {preset_name}")

    run_steps, chars = step_runner(trainer, plan, steps)
    per_char = timed(run_steps, trials) / chars
    lr_at, layout = trainer.schedule.lr, trainer.train_layout
    epoch_chars = sum(layout.batch(item)[1].numel() for item in plan)

    def build_all() -> None:
        for index, item in enumerate(plan):
            layout.batch(item)
            lr_at(layout.progress(plan, index))

    batches = timed(build_all, 3)

    # the trainer's own loop (batches, lr, loss sums, hooks, stop checks) around its steps: the
    # time fit() spends outside train_step, timed on the steps fit() itself runs (with a random
    # bptt those differ in length from the ones above); fit() also has a fixed set-up cost per
    # call, so the cost per step is the difference between runs of 2 x steps and of steps
    inside = [0.0]
    step = trainer.train_step

    def timed_step(inputs: torch.Tensor, targets: torch.Tensor, soft: torch.Tensor | None = None) -> torch.Tensor:
        started = time.perf_counter()
        loss = step(inputs, targets, soft)
        inside[0] += time.perf_counter() - started
        return loss

    trainer.train_step = timed_step  # type: ignore[method-assign]

    def outside(length: int) -> float:
        inside[0], started = 0.0, time.perf_counter()
        trainer.fit(max_steps=trainer.step + length)
        return time.perf_counter() - started - inside[0]

    def median_outside(length: int) -> float:
        return statistics.median(outside(length) for _ in range(trials))

    in_loop = (median_outside(2 * steps) - median_outside(steps)) / steps
    trainer.train_step = step  # type: ignore[method-assign]
    costs = {
        "steps": per_char * epoch_chars,
        "batches": batches,
        "loop": max(in_loop - batches / n, 0.0) * n,
        "validation": timed(trainer.evaluate, 3),
        "checkpoints": 2 * timed(lambda: trainer._write("last", {}), 3),
    }
    default_threads = torch.get_num_threads()
    other = 1 if default_threads > 1 else 2
    torch.set_num_threads(other)
    other_per_char = timed(run_steps, trials) / chars
    torch.set_num_threads(default_threads)

    total = sum(costs.values())
    changed = f" ({' '.join(overrides)})" if overrides else ""
    print(
        f"\n{arch} / {preset_name}{changed}: {n} steps an epoch of {config.data.batch_size} x {config.data.context}, "
        f"{trainer.precision}, {default_threads} threads — {total:.1f} s an epoch"
    )
    for name, seconds in costs.items():
        print(f"  {name:12s} {seconds:8.2f} s  {100 * seconds / total:5.1f}%")
    print(
        f"  threads      steps at {1 / per_char:,.0f} chars/s with {default_threads} torch thread(s), "
        f"{1 / other_per_char:,.0f} with {other}: speed ratio {other_per_char / per_char:.2f}"
    )


def main() -> None:
    from charlm.device import flush_denormals

    flush_denormals()  # as charlm's CLI and workers do, before torch's thread pool starts
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", default=str(DEFAULT_CORPUS))
    parser.add_argument("--only", nargs="+", default=DEFAULT, metavar="ARCH:PRESET")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="an override for every run")
    args = parser.parse_args()
    text = read_corpus(args.corpus)
    for item in args.only:
        arch, preset_name = item.split(":")
        measure(arch, preset_name, text, args.steps, args.trials, args.set)


if __name__ == "__main__":
    main()
