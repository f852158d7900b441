"""The ``charlm`` command."""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from charlm import __version__

if TYPE_CHECKING:
    from charlm.config import RunConfig
    from charlm.generate import LoadedModel
    from charlm.training import Trainer

CORPUS_ENV = "CHARLM_CORPUS"


class CliError(Exception):
    """A usage error: bad or conflicting options (exit code 2)."""


class SourceError(Exception):
    """An input named on the command line cannot be used at run time (exit code 1)."""


def _count(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer of at least ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


def _temperature(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


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

    config = preset(args.preset or "notebook", args.arch or "stateful_gru")
    overrides = list(args.set or [])
    if getattr(args, "device", None):
        overrides.append(f"device={args.device}")
    if getattr(args, "seed", None) is not None:
        overrides.append(f"seed={args.seed}")
    if getattr(args, "precision", None):
        overrides.append(f"precision={args.precision}")
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
                    f"{trainer.precision_note}, {trainer.schedule.total_epochs} epochs{trainer.distill_note}"
                    f"{trainer.average_note}{trainer.resume_note}",
                    flush=True,
                )
                raw = f" {'val_loss_raw':>12}" if trainer.config.average else ""  # the trained weights' loss
                head = f"{'epoch':>5} {'train_loss':>10} {'val_loss':>9} {'val_bpc':>8} {'val_acc':>8} {'chars/s':>10}"
                print(head + raw, flush=True)

            def on_epoch_end(self, trainer: Trainer, epoch: int, m: dict[str, float]) -> None:
                raw = f" {m['val_loss_raw']:>12.4f}" if "val_loss_raw" in m else ""
                print(
                    f"{epoch + 1:>5} {m['train_loss']:>10.4f} {m['val_loss']:>9.4f} {m['val_bpc']:>8.4f} "
                    f"{m['val_accuracy']:>8.4f} {m['chars_per_sec']:>10,.0f}{raw}",
                    flush=True,
                )

            def on_cycle_end(self, trainer: Trainer, cycle: int, m: dict[str, float]) -> None:
                print(f"      SGDR cycle {cycle} ended: snapshot saved", flush=True)

        self.callback = Printer()


def cmd_train(args: argparse.Namespace) -> None:
    from charlm.device import flush_denormals

    flush_denormals()  # first, before torch's thread pool exists: its threads inherit it
    from charlm import prepared
    from charlm.job import TrainJob, run_job

    corpus = _corpus_path(args.corpus)
    out = Path(args.out)
    if args.resume:
        from charlm.checkpoint import load_checkpoint
        from charlm.config import RunConfig

        given = (("--arch", args.arch), ("--preset", args.preset), ("--set", args.set), ("--teacher", args.teacher))
        clash = [f for f, v in given if v]
        clash += ["--seed"] if args.seed is not None else []
        if clash:
            raise CliError(
                f"--resume continues {args.resume} as it was configured: drop {', '.join(clash)} "
                "(start a new run with another --out to change them)"
            )
        config = RunConfig.model_validate(load_checkpoint(args.resume)["config"])
        if args.device:
            config = config.override({"device": args.device})
            print(f"resuming on device {args.device}", file=sys.stderr)
        if args.precision:  # a run moved between a GPU and a CPU changes precision with it
            config = config.override({"precision": args.precision})
    else:
        config = _config_from_args(args)
        if args.teacher:
            config = config.override({"distill": {"teachers": args.teacher, "weight": args.distill_weight}})
    job = TrainJob(
        config=config,
        data=prepared.prepare(corpus, config),
        checkpoint_dir=str(out),
        resume=args.resume,
        max_steps=args.max_steps,
        overwrite=args.overwrite,
    )
    result = run_job(job, callbacks=[] if args.quiet else [_EpochPrinter().callback])
    if result.stopped_early:
        print(
            f"stopped after {result.steps} steps; resume with: charlm train --resume {out / 'last.pt'} "
            f"--corpus {args.corpus or '$' + CORPUS_ENV} --out {out}"
        )
    if args.json:
        _print_json(result.model_dump(exclude={"run_id", "snapshot_model_ids", "best_model_id"}))
    elif result.best_epoch < 0:  # stopped before the first epoch's validation: there is no best yet
        print(f"no epoch finished, so no validation loss yet; {result.wall_time_s:.1f}s; checkpoints in {out}")
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
    source = args.model or args.snapshots or (args.checkpoint[0] if len(args.checkpoint) == 1 else args.checkpoint)
    combined = {"combine": args.combine} if args.snapshots or len(args.checkpoint or []) > 1 else {}
    _print_json({"model": source, **combined, "architecture": loaded.config.architecture, **metrics})


def _load_model(args: argparse.Namespace) -> LoadedModel:
    from charlm.generate import LoadedModel

    if sum(map(bool, (args.checkpoint, args.snapshots, args.model))) != 1:
        raise CliError("give one of --checkpoint PATH…, --snapshots DIR or --model MODEL_URI")
    if args.snapshots:
        from charlm.ensemble import snapshot_paths

        paths = snapshot_paths(args.snapshots, args.last)
        return LoadedModel.from_checkpoints(paths, combine=args.combine, device=args.device or "auto")
    if args.checkpoint:
        return LoadedModel.from_checkpoints(args.checkpoint, combine=args.combine, device=args.device or "auto")
    from charlm.tracking import check_tracking_server, load_registered

    if args.model.startswith(("models:/", "runs:/")):
        check_tracking_server(timeout=5.0)  # an unreachable server fails in seconds, naming it
    try:
        return load_registered(args.model)
    except Exception as err:  # MLflow's errors for a missing model, version, alias or run
        if type(err).__name__ not in ("MlflowException", "RestException", "OSError", "FileNotFoundError"):
            raise
        first = str(getattr(err, "message", err)).strip().splitlines()[0]
        raise SourceError(f"{args.model}: {first}") from None


def cmd_generate(args: argparse.Namespace) -> None:
    loaded = _load_model(args)
    on_unknown = "unk" if args.allow_unknown else "error"
    if args.next_char:
        print(loaded.next_char(args.prime, on_unknown=on_unknown))
        return
    stream = loaded.stream(
        args.prime, args.length, temperature=args.temperature, top_k=args.top_k, seed=args.seed, on_unknown=on_unknown
    )
    written = 0
    sys.stdout.write(args.prime)
    try:  # characters appear as they are generated; Ctrl-C keeps what was written
        for char in stream:
            sys.stdout.write(char)
            written += 1
            if char == "\n" or written % 64 == 0:
                sys.stdout.flush()
    finally:
        sys.stdout.write("\n")
        sys.stdout.flush()


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
            choices=list(ARCHITECTURES),
            metavar="ARCH",
            help="architecture (see 'charlm architectures'; default: stateful_gru)",
        )
        p.add_argument(
            "--preset",
            choices=list(PRESETS),
            help="notebook: its settings; notebook_full: its stateful_lstm trained through all three of its fits "
            "(80 epochs); tiny: seconds on a CPU; awd_sgdr (quality), short_sgdr (the notebook GRU's "
            "figure soonest): beyond the notebook, stateful models only; wide_awd_sgdr: awd_sgdr's LSTM at 2 x 1024, "
            "for a GPU; awd_ar_sgdr: awd_sgdr's LSTM with AWD-LSTM's activation regularisation; awd_ar_sgdr_batch64: "
            "awd_ar_sgdr on 64 columns at sqrt(2) the rate (default: notebook)",
        )
        p.add_argument(
            "--set",
            action="append",
            metavar="KEY=VALUE",
            help="override a config field, e.g. --set model.hidden_size=128 --set schedule.0.lr=3e-3",
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
    p.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16", "fp16"],
        help="autocast: auto = bf16 on a CPU with AVX512-BF16/AMX where the model's step measures faster in "
        "it, else fp32 (on a GPU too: faster there for these models); bf16 or fp16 asks for it (default: auto)",
    )
    p.add_argument(
        "--teacher",
        nargs="+",
        metavar="CHECKPOINT",
        help="distil: train toward these checkpoints' mean prediction (stateful models on this corpus's "
        "vocabulary, e.g. two seeds' best.pt)",
    )
    p.add_argument(
        "--distill-weight",
        type=float,
        default=0.9,
        help="with --teacher: the teachers' share of the target, the rest the next character (default: %(default)s)",
    )
    p.add_argument("--max-steps", type=_count(1), help="stop after this many optimizer steps (and save last.pt)")
    p.add_argument("--overwrite", action="store_true", help="replace another run's checkpoints in --out")
    p.add_argument("--resume", metavar="CHECKPOINT", help="continue a run exactly from a checkpoint")
    p.add_argument("--json", action="store_true", help="print the result and per-epoch history as JSON")
    p.add_argument("--quiet", action="store_true", help="no per-epoch lines")
    p.set_defaults(func=cmd_train)

    def add_model_source(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--checkpoint",
            nargs="+",
            metavar="PATH",
            help="a checkpoint written by 'charlm train'; several (a run's snapshots) are combined (--combine)",
        )
        p.add_argument("--snapshots", metavar="DIR", help="a run's checkpoint directory: combine its cycle-K.pt")
        p.add_argument("--last", type=_count(1), help="with --snapshots: only the last M snapshots")
        p.add_argument(
            "--combine",
            choices=["ensemble", "average"],
            default="ensemble",
            help="several checkpoints as the mean of their probabilities, or one model of their mean weights",
        )
        p.add_argument("--model", help="an MLflow model URI, e.g. models:/charlm@champion (uses MLFLOW_TRACKING_URI)")

    p = sub.add_parser("evaluate", help="validation loss, bits/char and accuracy of a model on a corpus")
    add_model_source(p)
    p.add_argument("--corpus", help="UTF-8 text file (its validation split is used)")
    p.add_argument(
        "--batch-size",
        type=_count(1),
        help="evaluation batch (for stateful models: the number of columns, each starting from a zero "
        "state; default: the run's validation batch, which its val_loss was measured with)",
    )
    p.add_argument("--context", type=_count(1), help="evaluation sequence length (sequence/stream layouts)")
    p.add_argument("--device")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("generate", help="sample text from a trained model")
    add_model_source(p)
    p.add_argument("--prime", required=True, help="priming text")
    p.add_argument("-n", "--length", type=_count(0), default=400, help="characters to generate (default: %(default)s)")
    p.add_argument("--temperature", type=_temperature, default=1.0, help="0 = greedy (default: %(default)s)")
    p.add_argument("--top-k", type=_count(1), help="sample among the k most likely characters")
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


def describe_error(err: BaseException, args: argparse.Namespace | None = None) -> tuple[int, str] | None:
    """``(exit code, one line)`` for an error a user can cause and fix — 2 for usage (options,
    configuration), 1 for what went wrong at run time — or None for a bug (shown in full)."""
    from pydantic import ValidationError

    from charlm.checkpoint import CheckpointError, first_line
    from charlm.data import CorpusError
    from charlm.device import DeviceError
    from charlm.job import CheckpointDirError

    if isinstance(err, ValidationError):
        parts = [(".".join(map(str, e["loc"])), str(e["msg"]).removeprefix("Value error, ")) for e in err.errors()]
        return 2, "; ".join(f"{where}: {message}" if where else message for where, message in parts)
    if isinstance(err, CliError):
        return 2, str(err)
    if isinstance(err, CorpusError | CheckpointError | CheckpointDirError | DeviceError | SourceError):
        return 1, str(err)
    if isinstance(err, MemoryError | RuntimeError) and _out_of_memory(err):
        return 1, _memory_message(err, args)
    if type(err).__name__ in ("TrackingUnavailable", "MlflowException", "RestException"):
        first = str(getattr(err, "message", err)).strip().splitlines()[0]
        return 1, f"MLflow: {first}"
    if isinstance(err, ValueError):
        return 2, first_line(err)
    return None


def _out_of_memory(err: BaseException) -> bool:
    text = str(err).lower()
    return isinstance(err, MemoryError) or "out of memory" in text or "can't allocate memory" in text


def _memory_message(err: BaseException, args: argparse.Namespace | None) -> str:
    wanted = re.search(r"allocate (\d+) bytes", str(err))
    size = f" ({int(wanted.group(1)) / 2**30:.1f} GiB in one allocation)" if wanted else ""
    settings = ", ".join(getattr(args, "set", None) or []) or "the preset's model sizes"
    return f"out of memory{size} with {settings}: choose smaller model.hidden_size / data.batch_size"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)  # usage errors: argparse's one line, exit 2
    try:
        args.func(args)
    except KeyboardInterrupt:
        print("charlm: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        described = describe_error(err, args)
        if described is None:
            raise
        code, message = described
        print(f"charlm: error: {message}", file=sys.stderr)
        return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
