"""`ttt-speech demo` (arguments only; the work is in `run.py`)."""
from __future__ import annotations

import argparse
from pathlib import Path

from ttt_speech_apps.configs import FOLDER as CONFIGS, resolve_config

DEFAULT_CONFIG = CONFIGS / "demo.yaml"  # the shipped one: `ttt-speech demo` works outside a clone

DESCRIPTION = (
    "Write the synthetic long-context corpus, fine-tune a tiny TTT-patched Moshi and the same "
    "model without TTT (same data, same steps, persistent state), evaluate both on held-out "
    "streams far longer than the training window in chunked and native (LMGen.step) modes, "
    "run the audio path on the LibriVox fixture, and print one comparison table. Writes "
    "demo.md, demo.json and the evaluation's report and plots under output_dir."
)


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "demo", description=DESCRIPTION,
        help="the whole mission on a CPU in minutes: fine-tune TTT and a baseline, evaluate both")
    parser.add_argument("config", type=Path, nargs="?", default=DEFAULT_CONFIG,
                        help="demo config (YAML, or a shipped config's name; default: the shipped demo.yaml)")
    # REMAINDER, not "*": options may follow the overrides too (`overrides_and_options`)
    parser.add_argument("overrides", nargs=argparse.REMAINDER, metavar="KEY=VALUE",
                        help="config overrides, e.g. train.steps=200 corpus.seed=1 output_dir=runs/demo1")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(func=_run, parser=parser)


def _run(args: argparse.Namespace) -> int:
    import sys

    from ttt_speech.cli_options import overrides_and_options

    from .config import load_demo_config
    from .run import run_demo

    if "=" in str(args.config):  # `demo k=v`: the optional CONFIG took the first override
        args.overrides, args.config = [str(args.config), *args.overrides], DEFAULT_CONFIG
    config = load_demo_config(resolve_config(args.config), overrides_and_options(args.parser, args))
    try:
        run_demo(config, progress=not args.quiet)
    except RuntimeError as e:  # a training subprocess failed: its log is named in the message
        print(f"ttt-speech demo: error: {e}", file=sys.stderr)
        return 1
    return 0
