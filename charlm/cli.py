"""The ``charlm`` command."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from charlm import __version__

if TYPE_CHECKING:
    from charlm.config import RunConfig
    from charlm.generate import LoadedModel
    from charlm.training import Trainer

CORPUS_ENV = "CHARLM_CORPUS"


class CliError(Exception):
    pass


def _corpus_path(value: str | None) -> str:
    path = value or os.environ.get(CORPUS_ENV)
    if not path:
        raise CliError(f"no corpus: pass --corpus PATH or set {CORPUS_ENV}")
    return path


def _print_json(data: object) -> None:
    print(json.dumps(data, indent=2, default=str))


# --------------------------------------------------------------------------- commands


def cmd_architectures(args: argparse.Namespace) -> None:
    from charlm.models import ARCHITECTURES

    width = max(map(len, ARCHITECTURES))
    for arch in ARCHITECTURES.values():
        print(f"{arch.name:<{width}}  {arch.layout:<8}  {arch.notebook_name}: {arch.description}")


def _config_from_args(args: argparse.Namespace) -> RunConfig:
    from charlm.config import preset

    config = preset(args.preset, args.arch)
    overrides = list(args.set or [])
    if getattr(args, "device", None):
        overrides.append(f"device={args.device}")
    if getattr(args, "seed", None) is not None:
        overrides.append(f"seed={args.seed}")
    return config.override(overrides) if overrides else config


def cmd_config(args: argparse.Namespace) -> None:
    _print_json(_config_from_args(args).model_dump(mode="json"))


class _EpochPrinter:
    """Prints one line per epoch (the notebook's fit() table)."""

    def __init__(self) -> None:
        from charlm.training import Callback

        class Printer(Callback):
            def on_fit_start(self, trainer: Trainer) -> None:
                print(
                    f"{trainer.config.architecture}: {trainer.parameters:,} parameters, {trainer.device}, "
                    f"{trainer.schedule.total_epochs} epochs",
                    flush=True,
                )
                print(
                    f"{'epoch':>5} {'train_loss':>10} {'val_loss':>9} {'val_bpc':>8} {'val_acc':>8} {'chars/s':>10}",
                    flush=True,
                )

            def on_epoch_end(self, trainer: Trainer, epoch: int, m: dict[str, float]) -> None:
                print(
                    f"{epoch + 1:>5} {m['train_loss']:>10.4f} {m['val_loss']:>9.4f} {m['val_bpc']:>8.4f} "
                    f"{m['val_accuracy']:>8.4f} {m['chars_per_sec']:>10,.0f}",
                    flush=True,
                )

            def on_cycle_end(self, trainer: Trainer, cycle: int, m: dict[str, float]) -> None:
                print(f"      SGDR cycle {cycle} ended: snapshot saved", flush=True)

        self.callback = Printer()


def cmd_train(args: argparse.Namespace) -> None:
    from charlm import prepared
    from charlm.job import TrainJob, run_job

    corpus = _corpus_path(args.corpus)
    out = Path(args.out)
    if args.resume:
        from charlm.checkpoint import load_checkpoint
        from charlm.config import RunConfig

        config = RunConfig.model_validate(load_checkpoint(args.resume)["config"])
    else:
        config = _config_from_args(args)
    job = TrainJob(
        config=config,
        data=prepared.prepare(corpus, config),
        checkpoint_dir=str(out),
        resume=args.resume,
        max_steps=args.max_steps,
    )
    result = run_job(job, callbacks=[] if args.quiet else [_EpochPrinter().callback])
    if result.stopped_early:
        print(
            f"stopped after {result.steps} steps; resume with: charlm train --resume {out / 'last.pt'} "
            f"--corpus {args.corpus or '$' + CORPUS_ENV} --out {out}"
        )
    if args.json:
        _print_json(result.model_dump(exclude={"run_id", "snapshot_model_ids", "best_model_id"}))
    else:
        print(
            f"best val loss {result.best_val_loss:.4f} nats/char at epoch {result.best_epoch}; "
            f"{result.wall_time_s:.1f}s; checkpoints in {out}"
        )


def cmd_evaluate(args: argparse.Namespace) -> None:
    from charlm.data import read_corpus

    loaded = _load_model(args)
    text = read_corpus(_corpus_path(args.corpus))
    metrics = loaded.evaluate_text(text, batch_size=args.batch_size, context=args.context)
    _print_json({"model": args.checkpoint or args.model, "architecture": loaded.config.architecture, **metrics})


def _load_model(args: argparse.Namespace) -> LoadedModel:
    from charlm.generate import LoadedModel

    if bool(args.checkpoint) == bool(args.model):
        raise CliError("give either --checkpoint PATH or --model MODEL_URI")
    if args.checkpoint:
        return LoadedModel.from_checkpoint(args.checkpoint, device=args.device or "auto")
    from charlm.tracking import load_registered

    return load_registered(args.model)


def cmd_generate(args: argparse.Namespace) -> None:
    loaded = _load_model(args)
    on_unknown = "unk" if args.allow_unknown else "error"
    if args.next_char:
        print(loaded.next_char(args.prime, on_unknown=on_unknown))
        return
    text = loaded.generate(
        args.prime, args.length, temperature=args.temperature, top_k=args.top_k, seed=args.seed, on_unknown=on_unknown
    )
    print(args.prime + text)


def cmd_promote(args: argparse.Namespace) -> None:
    from charlm import registry

    if args.rollback:
        _print_json(registry.rollback(args.model_name).as_dict())
        return
    if not args.run:
        raise CliError("give --run PARENT_RUN_ID (or --rollback)")
    read_corpus = None
    if args.corpus or os.environ.get(CORPUS_ENV):
        from charlm.data import read_corpus as read

        path = _corpus_path(args.corpus)
        read_corpus = lambda: read(path)
    decision = registry.promote_run(args.run, model_name=args.model_name, margin=args.margin, read_corpus=read_corpus)
    _print_json(decision.as_dict())


def cmd_vocab(args: argparse.Namespace) -> None:
    from charlm.data import prepare_corpus, read_corpus

    prepared = prepare_corpus(
        read_corpus(_corpus_path(args.corpus)),
        valid_fraction=args.valid_fraction,
        lowercase=args.lowercase,
        min_freq=args.min_freq,
    )
    prepared.vocab.save(args.out)
    _print_json({"vocabulary": args.out, **prepared.stats()})


def cmd_join(args: argparse.Namespace) -> None:
    from charlm.distributed import DistributedConfig, join_training

    given = {
        "nnodes": args.nnodes,
        "rdzv_endpoint": args.rdzv_endpoint,
        "rdzv_id": args.rdzv_id,
        "nproc_per_node": args.nproc_per_node,
        "max_restarts": args.max_restarts,
        "threads_per_rank": args.threads_per_rank,
        "join_timeout": args.join_timeout,
    }
    dist = DistributedConfig.from_env(**given)
    devices = [int(d) for d in args.devices.split(",")] if args.devices else None
    dist.check_multinode()
    print(f"charlm join: {dist.rdzv_id} at {dist.rdzv_endpoint}, {dist.nnodes} nodes", file=sys.stderr, flush=True)
    join_training(dist, devices=devices, backend=args.backend)


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    from charlm.config import PRESETS
    from charlm.models import ARCHITECTURES

    parser = argparse.ArgumentParser(
        prog="charlm",
        description="Character-level language models (fast.ai lesson 6) — train, evaluate, sample.",
        epilog=f"The corpus defaults to ${CORPUS_ENV}. 'charlm COMMAND --help' for details.",
    )
    parser.add_argument("--version", action="version", version=f"charlm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add_model_args(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--arch",
            default="stateful_gru",
            choices=list(ARCHITECTURES),
            metavar="ARCH",
            help="architecture (see 'charlm architectures'; default: %(default)s)",
        )
        p.add_argument(
            "--preset",
            default="notebook",
            choices=list(PRESETS),
            help="the notebook's settings, or tiny: seconds on a CPU (default: %(default)s)",
        )
        p.add_argument(
            "--set",
            action="append",
            metavar="KEY=VALUE",
            help="override a config field, e.g. --set model.hidden_size=128 --set data.batch_size=32",
        )

    p = sub.add_parser("architectures", help="list the architectures")
    p.set_defaults(func=cmd_architectures)

    p = sub.add_parser("config", help="print the resolved configuration as JSON")
    add_model_args(p)
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("train", help="train one architecture, writing checkpoints")
    add_model_args(p)
    p.add_argument("--corpus", help="UTF-8 text file")
    p.add_argument("--out", default="runs/latest", help="checkpoint directory (default: %(default)s)")
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--seed", type=int, help="random seed (default: the preset's)")
    p.add_argument("--max-steps", type=int, help="stop after this many optimizer steps (and save last.pt)")
    p.add_argument("--resume", metavar="CHECKPOINT", help="continue a run exactly from a checkpoint")
    p.add_argument("--json", action="store_true", help="print the result and per-epoch history as JSON")
    p.add_argument("--quiet", action="store_true", help="no per-epoch lines")
    p.set_defaults(func=cmd_train)

    def add_model_source(p: argparse.ArgumentParser) -> None:
        p.add_argument("--checkpoint", help="a checkpoint file written by 'charlm train'")
        p.add_argument("--model", help="an MLflow model URI, e.g. models:/charlm@champion (uses MLFLOW_TRACKING_URI)")

    p = sub.add_parser("evaluate", help="validation loss, bits/char and accuracy of a model on a corpus")
    add_model_source(p)
    p.add_argument("--corpus", help="UTF-8 text file (its validation split is used)")
    p.add_argument(
        "--batch-size",
        type=int,
        help="evaluation batch (for stateful models: the number of columns, each starting from a zero "
        "state; default: the training batch size, as the notebook did)",
    )
    p.add_argument("--context", type=int, help="evaluation sequence length (sequence/stream layouts)")
    p.add_argument("--device")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("generate", help="sample text from a trained model")
    add_model_source(p)
    p.add_argument("--prime", required=True, help="priming text")
    p.add_argument("-n", "--length", type=int, default=400, help="characters to generate (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy (default: %(default)s)")
    p.add_argument("--top-k", type=int, help="sample among the k most likely characters")
    p.add_argument("--seed", type=int, help="make the sample reproducible")
    p.add_argument("--next-char", action="store_true", help="print only the most likely next character")
    p.add_argument(
        "--allow-unknown",
        action="store_true",
        help="map priming characters outside the vocabulary to the unknown index instead of failing",
    )
    p.add_argument("--device")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("promote", help="promote a pipeline run's best model in the MLflow registry, or roll back")
    p.add_argument("--run", metavar="PARENT_RUN_ID", help="the pipeline's parent MLflow run")
    p.add_argument("--corpus", help="the corpus that run trained on (to re-evaluate a champion trained on another)")
    p.add_argument("--model-name", default="charlm", help="registered model name (default: %(default)s)")
    p.add_argument("--margin", type=float, default=0.0, help="required improvement over the champion (nats/char)")
    p.add_argument("--rollback", action="store_true", help="restore the 'previous' version as champion")
    p.set_defaults(func=cmd_promote)

    p = sub.add_parser(
        "join",
        help="run this node's DDP workers in a multi-node job started by a pipeline or 'launch_training'",
        description="The job's config, data and checkpoints come from the driver node over the rendezvous; "
        "this node needs only the rendezvous settings (flags, or CHARLM_NNODES, CHARLM_RDZV_ENDPOINT, "
        "CHARLM_RDZV_ID, CHARLM_NPROC_PER_NODE, CHARLM_MAX_RESTARTS).",
    )
    p.add_argument("--nnodes", type=int, help="nodes in the job, the driver included")
    p.add_argument("--rdzv-endpoint", help="the driver's c10d rendezvous host:port")
    p.add_argument("--rdzv-id", help="the job's rendezvous id (the pipeline logs it for each architecture)")
    p.add_argument("--nproc-per-node", type=int, help="workers on this node (default: its GPUs, 1 on CPU)")
    p.add_argument("--devices", help="GPU indices for this node's workers, e.g. 0,1")
    p.add_argument("--backend", choices=["auto", "gloo", "nccl"], help="default: the driver's")
    p.add_argument("--max-restarts", type=int, help="as the driver's")
    p.add_argument("--threads-per-rank", type=int, help="torch threads per worker (CPU)")
    p.add_argument("--join-timeout", type=float, help="seconds to wait for the other nodes (default 600)")
    p.set_defaults(func=cmd_join)

    p = sub.add_parser("vocab", help="build the vocabulary of a corpus's training split as JSON")
    p.add_argument("--corpus")
    p.add_argument("--out", default="vocab.json")
    p.add_argument("--lowercase", action="store_true")
    p.add_argument("--min-freq", type=int, default=1)
    p.add_argument("--valid-fraction", type=float, default=0.2)
    p.set_defaults(func=cmd_vocab)
    return parser


def main(argv: list[str] | None = None) -> int:
    from pydantic import ValidationError

    from charlm.checkpoint import CheckpointError
    from charlm.data import CorpusError

    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (CliError, CorpusError, CheckpointError) as err:
        print(f"charlm: error: {err}", file=sys.stderr)
        return 2
    except ValidationError as err:
        print(f"charlm: invalid configuration:\n{err}", file=sys.stderr)
        return 2
    except ValueError as err:
        print(f"charlm: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
