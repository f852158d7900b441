"""The same training steps on the main thread and in worker threads, in the order given.

Prefect runs tasks in worker threads; torch's OpenMP pool belongs to the thread that
first used it. On the 2-core machine these figures were taken on, a worker thread
started after the main thread had run torch trained ~40% slower than one started
before it did (see README, pipeline overhead).

    python bench/openmp_threads.py --order main,thread,thread
    python bench/openmp_threads.py --order thread,thread,main
"""

from __future__ import annotations

import argparse
import threading
from pathlib import Path

from charlm.config import Phase, notebook
from charlm.data import read_corpus
from charlm.prepared import prepare_for
from charlm.training import Trainer

DEFAULT_CORPUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "nietzsche.txt"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--order", default="main,thread,thread")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--corpus", default=str(DEFAULT_CORPUS))
    args = parser.parse_args()
    config = notebook("stateful_gru").override({"schedule": [Phase.constant(1e-3, 1).model_dump()], "progress": False})
    corpus = prepare_for(config, read_corpus(args.corpus))

    def run(where: str) -> None:
        trainer = Trainer(config, corpus)
        trainer.fit(max_steps=args.steps)
        print(f"{where:>6}: {trainer._chars / trainer._train_seconds:,.0f} chars/s", flush=True)

    for where in args.order.split(","):
        if where == "main":
            run(where)
        else:
            thread = threading.Thread(target=run, args=(where,))
            thread.start()
            thread.join()


if __name__ == "__main__":
    main()
