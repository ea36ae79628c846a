"""`ttt-speech eval librilight`, `length-gen`, `zero-shot`, `continuation` and `memory`: arguments only;
each builds its probe (`librilight.py`, `length_gen.py`, `zero_shot.py`, `continuation.py`,
`memory_probe.py`) and runs it through `pipeline.evaluate`."""
from __future__ import annotations

import argparse
from pathlib import Path

from ttt_speech.tracking import WANDB_OFFLINE_HELP
from ttt_speech_apps.configs import resolve_config

LIBRILIGHT = (
    "Concatenate each LibriLight book's chapters into one stream (Mimi codes, cached), score "
    "every frame teacher-forced (text, codebook 1, codebooks 2-8) in chunked mode (LMModel "
    "chunks), native mode (one LMGen.step per frame, ground truth forced) or both, and write "
    "report.json, report.md, per_position.safetensors and PNG plots into output_dir."
)
LENGTH_GEN = (
    "Perplexity of the first L frames of each stream (one stateful chunked pass) at "
    "eval.length_gen.num_lengths lengths from min_factor to max_factor x eval.train_window; "
    "lengths no stream reaches are left out (listed once). Writes length_gen.json/.md/.png."
)
MEMORY = (
    "For each model and stream, score S = the first segment_frames frames in a fresh stream "
    "(pre), then again in a new fresh stream (empty KV cache) that starts from the TTT state "
    "the first pass ended with (post), and as the second half of one stream [S; S] (in context). "
    "Writes memory.json, memory.md and memory.png into output_dir. See docs/evaluation.md."
)
ZERO_SHOT = (
    "The spoken-LM zero-shot suite (sWUGGY, sBLIMP, spoken and topic StoryCloze, SALMon): for each pair of "
    "recordings, each scored from a fresh stream, a model should give the real one the lower NLL. Accuracy per "
    "task with a 95% interval for every model, each model - the baseline on the same pairs (McNemar). Reads "
    "each task from zero_shot.path or the local HF cache; writes zero_shot.json/.md/.png. See docs/evaluation.md."
)
CONTINUATION = (
    "Each model continues the first continuation.prompt_seconds of each stream for continuation.max_minutes "
    "(LMGen, the same sampling and seeds for every model); every continuation.span_seconds span is decoded and "
    "scored as it is generated: drift from the prompt (Mimi latents), WavLM speaker similarity, a Whisper "
    "transcript (GenPPL, Auto-BLEU, distinct-2, WER), the model's own NLL, silence. The book's true "
    "continuation is scored beside them. Every judge model comes from the local HF cache or a folder. Writes "
    "continuation.json/.md and one PNG per metric. See docs/evaluation.md."
)
OVERWRITE = ("write into an output_dir that holds this command's earlier results or is a training run's folder "
             "(refused otherwise); files this run writes replace theirs, others are left: an earlier run's "
             "outputs this one does not write (e.g. a plot) stay beside the new report")


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", type=Path, help="evaluation config: a YAML file, or a shipped config by name (e.g. eval_tiny; `ttt-speech config list`)")
    # REMAINDER (not "*"): argparse cannot take positionals after options otherwise; options given
    # among the overrides are parsed by `overrides_and_options`
    parser.add_argument("overrides", nargs=argparse.REMAINDER, metavar="KEY=VALUE",
                        help="config overrides, e.g. data.max_frames=8000 eval.chunk_size=128 output_dir=runs/x")
    parser.add_argument("--baseline", action="store_true",
                        help="also evaluate the same model without TTT layers (eval.baseline=true)")
    _output_options(parser)


def _output_options(parser: argparse.ArgumentParser) -> None:
    """The options every eval command shares beyond its config."""
    parser.add_argument("--overwrite", action="store_true", help=OVERWRITE)
    parser.add_argument("--wandb-offline", action="store_true", help=WANDB_OFFLINE_HELP)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "eval", help="evaluation: LibriLight NLL curves, chunked vs native, length generalisation, zero-shot suite, "
             "long-form continuation, memory",
        description="Evaluate Moshi (+ TTT) on long streams. See docs/evaluation.md.")
    tools = parser.add_subparsers(dest="eval_command", required=True, metavar="EVAL")
    libri = tools.add_parser(
        "librilight", description=LIBRILIGHT,
        help="teacher-forced NLL of LibriLight books vs position; JSON + Markdown + PNG report")
    _common(libri)
    libri.add_argument("--mode", choices=["chunked", "native", "both"],
                       help="override eval.mode: chunked (fast), native (LMGen.step), both (and compare them)")
    libri.set_defaults(func=_librilight, parser=libri)
    lengths = tools.add_parser(
        "length-gen", help="perplexity at 0.5x..10x the training window (20 lengths)", description=LENGTH_GEN)
    _common(lengths)
    lengths.set_defaults(func=_length_gen, parser=lengths)
    zero_shot = tools.add_parser(
        "zero-shot", description=ZERO_SHOT,
        help="sWUGGY, sBLIMP, StoryCloze, SALMon: did TTT cost short-context skills? accuracy per task vs baseline")
    _common(zero_shot)
    zero_shot.set_defaults(func=_zero_shot, parser=zero_shot)
    continuation = tools.add_parser(
        "continuation", description=CONTINUATION,
        help="does it stay coherent for minutes? generate from each stream's start, score each span vs time")
    _common(continuation)
    continuation.set_defaults(func=_continuation, parser=continuation)
    memory = tools.add_parser(
        "memory", description=MEMORY,
        help="does a model remember a segment after test-time training on it? NLL pre vs post")
    memory.add_argument("config", type=Path, help="memory-test config: a YAML file, or a shipped config by name (eval_memory)")
    memory.add_argument("overrides", nargs=argparse.REMAINDER, metavar="KEY=VALUE",
                        help="config overrides, e.g. segment_frames=128 data.max_books=4 output_dir=runs/x")
    _output_options(memory)
    memory.set_defaults(func=_memory, parser=memory)


def _load(args: argparse.Namespace, extra=lambda: []):
    """The config of `args`; `extra()` gives more overrides, read once the options after them are parsed."""
    from ttt_speech.cli_options import overrides_and_options
    from ttt_speech.tracking import wandb_offline

    from .config import load_config

    overrides = overrides_and_options(args.parser, args) + extra() + wandb_offline(args.wandb_offline)
    if args.baseline:
        overrides.append("eval.baseline=true")
    return load_config(resolve_config(args.config), overrides)


def _librilight(args: argparse.Namespace) -> int:
    from .librilight import LibriLight

    return _evaluate(LibriLight(_load(args, lambda: [f"eval.mode={args.mode}"] if args.mode else [])), args)


def _length_gen(args: argparse.Namespace) -> int:
    from .length_gen import LengthGen

    return _evaluate(LengthGen(_load(args)), args)


def _zero_shot(args: argparse.Namespace) -> int:
    from .zero_shot import ZeroShot

    return _evaluate(ZeroShot(_load(args)), args)


def _continuation(args: argparse.Namespace) -> int:
    from .continuation import Continuation

    return _evaluate(Continuation(_load(args)), args)


def _memory(args: argparse.Namespace) -> int:
    from ttt_speech.cli_options import overrides_and_options
    from ttt_speech.tracking import wandb_offline

    from .memory_probe import Memory, load_config

    config = load_config(resolve_config(args.config),
                         overrides_and_options(args.parser, args) + wandb_offline(args.wandb_offline))
    return _evaluate(Memory(config), args)


def _evaluate(probe, args: argparse.Namespace) -> int:
    """Run `probe` through the evaluation's lifecycle; print its summary and what was written."""
    from .pipeline import evaluate

    result, paths = evaluate(probe, progress=not args.quiet, overwrite=args.overwrite)
    print("\n".join(result.summary_lines()))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0
