"""The command-line options of a generating command (`generate`, `serve`): the model to load and
the sampling settings, defined once; errors name the option the user typed."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..data import FRAME_RATE

# CLI option of each GenerationConfig field
OPTIONS = {
    "max_duration": "--max-duration", "temperature": "--temperature", "text_temperature": "--text-temperature",
    "top_k": "--top-k", "text_top_k": "--text-top-k", "top_p": "--top-p", "text_top_p": "--text-top-p",
    "seed": "--seed", "prompt_text": "--prompt-text",
}


def add_model_options(parser: argparse.ArgumentParser) -> None:
    model = parser.add_argument_group("model")
    model.add_argument("--export", type=Path, metavar="DIR_OR_REPO",
                       help="fine-tuned export directory (ttt-speech train) or hub repo id namespace/name[@revision]; "
                            "replaces --model")
    model.add_argument("--model", default="tiny", metavar="NAME",
                       help="'tiny' (random-init, no download), a Hugging Face repo such as "
                            "kyutai/moshiko-pytorch-bf16, or a local checkpoint folder in Kyutai's layout "
                            "(config.json and the files it names) (default tiny)")
    model.add_argument("--ttt", type=Path, metavar="DIR", help="TTT weights to patch onto --model (a save_ttt directory)")
    model.add_argument("--device", default="auto", metavar="DEVICE", help="auto, cpu, cuda or cuda:N (default auto)")
    model.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                       help="LM dtype (default: float32 for --model, the export's own for --export)")


def add_sampling_options(parser: argparse.ArgumentParser, live: bool = False) -> None:
    """The sampling group; `live` (a conversation): without the prompt-only settings."""
    s = parser.add_argument_group("sampling")
    if not live:
        s.add_argument("--max-duration", type=float, default=10.0, metavar="SECONDS",
                       help=f"seconds generated after each prompt, > 0 ({FRAME_RATE:g} frames per second; default 10)")
    s.add_argument("--temperature", type=float, default=0.8, metavar="T", help="audio temperature, >= 0; 0 = greedy (default 0.8)")
    s.add_argument("--text-temperature", type=float, default=0.7, metavar="T", help="text temperature, >= 0 (default 0.7)")
    s.add_argument("--top-k", type=int, default=250, metavar="K", help="audio top-k, >= 0; 0 = off (default 250)")
    s.add_argument("--text-top-k", type=int, default=25, metavar="K", help="text top-k, >= 0; 0 = off (default 25)")
    s.add_argument("--top-p", type=float, default=1.0, metavar="P", help="audio nucleus top-p, in (0, 1]; 1 = off (default 1)")
    s.add_argument("--text-top-p", type=float, default=1.0, metavar="P", help="text nucleus top-p, in (0, 1] (default 1)")
    if live:
        s.add_argument("--seed", type=int, metavar="N", help="sampling seed of each new session (default 0; a "
                                                              "resumed session continues its saved RNG)")
    else:
        s.add_argument("--seed", type=int, metavar="N", help="sampling seed of a new stream (default 0; ignored "
                                                              "with --state-in: a resumed stream continues its saved RNG)")
        s.add_argument("--prompt-text", choices=["force", "free"], default="force",
                       help="text stream during a prompt: its transcript or padding (force, default), or sampled (free)")


def generation_config(args: argparse.Namespace):
    """The `GenerationConfig` of the parsed sampling options (defaults for the ones not offered)."""
    from .config import GenerationConfig, validate

    values = {field: getattr(args, field) for field in OPTIONS if hasattr(args, field)}
    values["seed"] = 0 if values.get("seed") is None else values["seed"]
    validate(values, OPTIONS)
    return GenerationConfig(**values)
