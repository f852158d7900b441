"""What the pipeline costs on top of the trainer: one architecture, one epoch of the real corpus.

Baseline: the library alone — read the corpus, prepare it, ``Trainer.fit`` with its
local checkpoints. Pipeline: the Prefect flow on the same settings — fetch, cached
preparation, MLflow parent and child runs, per-step metrics, checkpoint artifacts,
the comparison CSV and PNG. Trials alternate; medians are compared.

Prefect's ephemeral server is started once, before the first trial, by a trivial
flow (its start-up is a per-process cost that a deployed server does not pay; it is
printed separately). MLflow logs to a fresh SQLite store in a temporary directory.

    python bench/pipeline_overhead.py --arch stateful_lstm --trials 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

DEFAULT_CORPUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "nietzsche.txt"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="stateful_lstm")
    parser.add_argument("--corpus", default=str(DEFAULT_CORPUS))
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--json")
    args = parser.parse_args()
    args.corpus = str(Path(args.corpus).resolve())  # before the chdir below: a relative path names the caller's file

    work = Path(tempfile.mkdtemp(prefix="charlm-overhead-"))
    os.environ.setdefault("PREFECT_HOME", str(work / "prefect"))
    # before Prefect is imported: a fresh ephemeral server can take over the default 20 s to start here
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ["CHARLM_HOME"] = str(work / "home")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work}/mlflow.db"
    os.chdir(work)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

    from prefect import flow

    from charlm.config import Phase, notebook
    from charlm.data import read_corpus
    from charlm.prepared import prepare_for
    from charlm.tracking import check_tracking_server
    from charlm.training import Trainer
    from flows.params import PipelineParams
    from flows.pipeline import charlm_pipeline

    one_epoch = [Phase.constant(1e-3, 1).model_dump()]
    config = notebook(args.arch).override({"schedule": one_epoch, "progress": False})

    @flow
    def warm_up() -> None:
        return None

    t0 = time.perf_counter()
    warm_up()
    server_start = time.perf_counter() - t0
    check_tracking_server()  # create the SQLite store once, outside the trials

    def library(trial: int) -> float:
        # In a worker thread, as the flow's task runs: torch's OpenMP pool belongs to the thread
        # that first used it, and one left on the main thread slowed later worker threads here ~40%.
        def work_() -> None:
            corpus = prepare_for(config, read_corpus(args.corpus))
            Trainer(config, corpus, checkpoint_dir=work / f"lib-{trial}").fit()

        t0 = time.perf_counter()
        thread = threading.Thread(target=work_)
        thread.start()
        thread.join()
        return time.perf_counter() - t0

    def pipeline(trial: int) -> float:
        t0 = time.perf_counter()
        charlm_pipeline(
            PipelineParams(
                corpus_uri=args.corpus,
                architectures=[args.arch],
                preset_name="notebook",
                overrides={"*": {"schedule": one_epoch}},
                concurrency=1,
                experiment_name="overhead",
            )
        )
        return time.perf_counter() - t0

    lib, flo = [], []
    for trial in range(args.trials):
        lib.append(library(trial))
        flo.append(pipeline(trial))
        print(
            f"trial {trial + 1}: library {lib[-1]:.1f}s, pipeline {flo[-1]:.1f}s ({flo[-1] / lib[-1] - 1:+.1%})",
            flush=True,
        )
    overhead = statistics.median(flo) / statistics.median(lib) - 1
    print(
        f"{args.arch}, one epoch of {args.corpus}: library median {statistics.median(lib):.1f}s, "
        f"pipeline median {statistics.median(flo):.1f}s -> overhead {overhead:+.1%} "
        f"(Prefect ephemeral server start, once per process: {server_start:.1f}s)"
    )
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "arch": args.arch,
                    "library_s": lib,
                    "pipeline_s": flo,
                    "overhead": overhead,
                    "server_start_s": server_start,
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
