"""`ttt-speech train`: the command line of the training app (the loop is `train.py`).

Several ranks on this node: `ttt-speech train CONFIG.yaml --nproc-per-node N` (`launch.py`). Under
torchrun: `torchrun --nproc-per-node N --no-python ttt-speech train CONFIG.yaml`, or
`torchrun --nproc-per-node N -m ttt_speech_apps.finetune CONFIG.yaml` (`__main__.py`, the same `main`).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ttt_speech.tracking import WANDB_OFFLINE_HELP

from .launch import DEFAULT_SHUTDOWN_TIMEOUT

DESCRIPTION = (
    "Fine-tune a Moshi-architecture model with TTT layers on audio or code manifests (or, with model.host: llama, "
    "a transformers Llama / Qwen2 on token streams), "
    "TTT state carried across consecutive windows of each recording. Multi-GPU: "
    "torchrun --nproc-per-node N --no-python ttt-speech train CONFIG.yaml [KEY=VALUE ...]. "
    "Writes checkpoints/, export/, metrics.jsonl, ttt_stats.csv and loss.png into output_dir."
)


def build_arg_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("config", type=Path, help="training config: a YAML file, or a shipped config by name (e.g. tiny; `ttt-speech config list`)")
    # REMAINDER, not "*": options may follow the overrides too (`overrides_and_options`)
    parser.add_argument("overrides", nargs=argparse.REMAINDER, metavar="KEY=VALUE",
                        help="config overrides, e.g. optim.lr=3e-4 data.batch_size=8 ttt.layers=last:0.5")
    parser.add_argument("--resume", type=Path, metavar="DIR",
                        help="continue a run exactly: a checkpoint folder or a run's output folder (its newest "
                             "readable checkpoint); only steps and reporting settings may change")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the run output_dir holds (its checkpoints, export and logs are deleted); "
                             "without it, a folder holding another run is refused")
    parser.add_argument("--wandb-offline", action="store_true", help=WANDB_OFFLINE_HELP)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--nproc-per-node", type=int, metavar="N",
                        help="run N ranks on this node (torchrun's launcher in this process, with this command's "
                             "exit codes: 130 after a stop, the failing rank's code otherwise); several nodes: "
                             "torchrun itself (docs/training.md)")
    parser.add_argument("--shutdown-timeout", type=int, metavar="S",
                        help="with --nproc-per-node: seconds torchrun gives the ranks to write their checkpoint after "
                             f"a SIGTERM or Ctrl-C before it kills them (default {DEFAULT_SHUTDOWN_TIMEOUT}; "
                             "torchrun's own is 30)")
    parser.set_defaults(func=_run, parser=parser)
    return parser


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("train", help="fine-tune Moshi (or a Llama / Qwen2) with TTT layers from a YAML config", description=DESCRIPTION)
    build_arg_parser(parser)


def _run(args: argparse.Namespace) -> int:
    """The command: config + overrides → `train`; a diverged run exits 1, a stopped one 130 (its
    checkpoint is named in both)."""
    import logging

    from ttt_speech.cli_options import overrides_and_options
    from ttt_speech.tracking import wandb_offline
    from ttt_speech_apps.configs import resolve_config

    from .config import load_train_config
    from .stop import TrainingInterrupted
    from .train import TrainingDiverged, train

    overrides = overrides_and_options(args.parser, args) + wandb_offline(args.wandb_offline)
    config = load_train_config(resolve_config(args.config), overrides)  # checked before any rank starts
    if args.nproc_per_node is not None:
        return _launch(args, config.output_dir / "checkpoints")
    if args.shutdown_timeout is not None:
        raise ValueError("--shutdown-timeout: only with --nproc-per-node (under torchrun itself: its own "
                         "--shutdown-timeout, docs/training.md §4)")
    main_rank = int(os.environ.get("RANK", "0")) == 0  # under torchrun only rank 0 reports
    logging.basicConfig(level=logging.INFO if main_rank else logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    if not main_rank:  # the run's own warnings (resume, runaway growth, ...) are the same on every rank: rank 0 says them
        logging.getLogger("finetune").setLevel(logging.ERROR)
    try:
        result = train(config, resume=args.resume, progress=not args.quiet, overwrite=args.overwrite)
    except TrainingDiverged as e:
        print(f"ttt-speech train: error: {e}", file=sys.stderr)
        return 1
    except TrainingInterrupted as e:
        if main_rank:
            print(f"ttt-speech train: {e}", file=sys.stderr)
        return 130
    except (ValueError, OSError) as e:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # a rank: its line, then out without the teardown
            from ttt_speech.cli import error_line

            print(f"ttt-speech train: error: {error_line(e)}", file=sys.stderr)
            _leave_rank(2)
        raise
    if not main_rank:
        return 0
    shown = ", ".join(f"{k}={v:.4f}" for k, v in result.items() if isinstance(v, float))
    print(f"done: {result['step']} steps; {shown}")
    print(f"outputs in {config.output_dir}: export/, checkpoints/, metrics.jsonl, loss.png"
          + (", ttt_stats.csv" if config.ttt is not None else ""))
    return 0


def _leave_rank(code: int) -> None:
    """End a rank that failed before training (its process group closed) without the interpreter's
    teardown: there, gloo's threads are sometimes destroyed while joinable and the rank aborts
    ("terminate called without an active exception", SIGABRT) after printing its error, which turns
    a one-line refusal into a crash report (seen in tests/test_distributed.py, torch 2.13)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _launch(args: argparse.Namespace, checkpoints: Path) -> int:
    """--nproc-per-node: the same command on N ranks (`launch.py`)."""
    from .launch import launch

    if "RANK" in os.environ:
        raise ValueError("--nproc-per-node: this process is already a rank of torchrun; drop the option")
    timeout = DEFAULT_SHUTDOWN_TIMEOUT if args.shutdown_timeout is None else args.shutdown_timeout
    if args.nproc_per_node < 1 or timeout < 0:
        raise ValueError(f"--nproc-per-node: expected N >= 1 and --shutdown-timeout >= 0, got "
                         f"{args.nproc_per_node} and {timeout}")
    forwarded = [str(args.config), *args.overrides]
    for flag, value in (("--resume", args.resume), ("--overwrite", args.overwrite),
                        ("--wandb-offline", args.wandb_offline), ("--quiet", args.quiet)):
        if value:
            forwarded += [flag] if value is True else [flag, str(value)]
    return launch(args.nproc_per_node, timeout, forwarded, checkpoints)


def main(argv: list[str] | None = None) -> int:
    """`python -m ttt_speech_apps.finetune CONFIG.yaml [KEY=VALUE ...]` (torchrun-ready)."""
    parser = build_arg_parser(argparse.ArgumentParser(
        prog="python -m ttt_speech_apps.finetune", description=DESCRIPTION))
    args = parser.parse_args(argv)
    try:
        return _run(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"ttt-speech train: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ttt-speech train: interrupted", file=sys.stderr)
        return 130
