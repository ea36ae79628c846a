"""`ttt-speech train`: the same entry point as `torchrun -m finetune.train` (arguments only here)."""
from __future__ import annotations

import argparse
from pathlib import Path


def build_arg_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("config", type=Path, help="training config (YAML); see configs/tiny.yaml")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="config overrides, e.g. optim.lr=3e-4 data.batch_size=8 ttt.layers=last:0.5")
    parser.add_argument("--resume", type=Path, metavar="DIR",
                        help="continue a run exactly: a checkpoint folder or a run's output folder (newest checkpoint)")
    parser.add_argument("--wandb-offline", action="store_true", help="log wandb offline (sync later with `wandb sync`)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "train", help="fine-tune Moshi with TTT layers from a YAML config",
        description="Fine-tune a Moshi-architecture model with TTT layers on audio or code manifests, "
                    "TTT state carried across consecutive windows of each recording. Multi-GPU: "
                    "torchrun --nproc-per-node N -m finetune.train CONFIG.yaml [KEY=VALUE ...]. "
                    "Writes checkpoints/, export/, metrics.jsonl, ttt_stats.csv and loss.png into output_dir.")
    build_arg_parser(parser)
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from .train import run_cli

    return run_cli(args)
