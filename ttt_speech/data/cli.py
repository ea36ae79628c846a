"""`ttt-speech data synth` (synthetic long-context corpus) and `ttt-speech data encode` (audio → codes)."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..files import writable_dir
from ..schema import reference
from . import CODES_CACHE
from .synth_config import SynthConfig

SYNTH = (
    "Deterministic by seed. Each recording is a 'speaker' with a private vocabulary of "
    "semantic codes (and optional private motifs) that only memory of the recording "
    "reveals; acoustic codebooks follow the semantic one or are noise "
    "(see ttt_speech/data/synthetic.py). Fields come from --config, then the flags."
)
ENCODE = (
    "Encode every audio file of a JSONL manifest into the content-addressed codes cache "
    "and write a manifest of the resulting code files. A file that cannot be decoded cleanly "
    "(corrupt, empty, NaN/inf samples) stops the command with an error naming it, before any "
    "manifest is written, unless --skip-bad."
)


def register(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="make or encode training data (synthetic corpus, Mimi codes)",
                          description="Data tools: a synthetic long-context code corpus, and audio → Mimi codes.")
    tools = data.add_subparsers(dest="data_command", required=True, metavar="TOOL")
    synth = tools.add_parser(
        "synth", help="write the synthetic long-context corpus (code files + train/eval manifests)", description=SYNTH)
    synth.add_argument("out", type=Path, help="output folder")
    synth.add_argument("--config", type=Path, help="YAML file with the corpus fields (e.g. configs/demo.yaml)")
    synth.add_argument("--section", help="the mapping of --config that holds them (e.g. corpus); default: the whole file")
    for name, default, help_text in reference(SynthConfig):
        synth.add_argument(f"--{name.replace('_', '-')}", dest=name, metavar="VALUE",
                           help=f"{help_text} (default {default})")
    synth.add_argument("--tokens", action="store_true",
                       help="write token streams for host llama instead (tokens/*.npy: each recording's semantic "
                            "codes as token ids 3..card+2, past the tiny LLMs' special tokens; docs/llama_omni.md)")
    synth.add_argument("--quiet", action="store_true", help="no progress bar")
    synth.set_defaults(func=_synth)

    encode = tools.add_parser(
        "encode", help="encode a manifest's audio to Mimi codes ahead of training", description=ENCODE)
    encode.add_argument("manifest", type=Path, help="JSONL manifest of audio files ({\"path\": ..., \"duration\": ...})")
    encode.add_argument("out_manifest", type=Path, help="manifest of code files to write")
    encode.add_argument("--cache", type=Path, default=Path(CODES_CACHE),
                        help=f"codes cache folder (default {CODES_CACHE})")
    encode.add_argument("--model", default="tiny", help="'tiny' (random Mimi), the HF repo of the codec, or a local "
                        "checkpoint folder in Kyutai's layout (default tiny)")
    encode.add_argument("--mimi-weights", type=Path, help="local Mimi weights instead of the hub file")
    encode.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    encode.add_argument("--skip-bad", action="store_true",
                        help="leave files that cannot be decoded out of the manifest (warned, then listed at the "
                             "end) instead of stopping with an error")
    encode.add_argument("--quiet", action="store_true", help="no progress bar")
    encode.set_defaults(func=_encode)


def _synth(args: argparse.Namespace) -> int:
    import yaml

    from ..schema import from_dict, load_yaml
    from .synthetic import write_corpus

    data = {}
    if args.config is not None:
        data = load_yaml(args.config)
        if args.section is not None:
            if not isinstance(data.get(args.section), dict):
                raise ValueError(f"{args.config}: no '{args.section}' section")
            data = data[args.section]
    # flag values are YAML scalars, typed and validated by the schema like the config file's
    data.update({name: yaml.safe_load(getattr(args, name)) for name, _, _ in reference(SynthConfig)
                 if getattr(args, name) is not None})
    config = from_dict(SynthConfig, data, "synth")
    writable_dir(args.out, "out")  # a file or a read-only folder there: one line, before any recording is made
    files = write_corpus(config, args.out, progress=not args.quiet, tokens=args.tokens)
    print("wrote " + ", ".join(f"{k}: {v}" for k, v in files.items()))
    return 0


def _encode(args: argparse.Namespace) -> int:
    from .encode import encode_manifest
    from ..models import ModelConfig

    if args.mimi_weights is not None and args.model == "tiny":  # ModelConfig refuses it too, naming the config field
        raise ValueError("--mimi-weights: needs --model, the checkpoint's hub repo id or folder (its config.json "
                         "gives the number of codebooks); the tiny model's Mimi is random")
    model = ModelConfig(name=args.model, mimi_weights=args.mimi_weights, device=args.device)
    out, skipped = encode_manifest(args.manifest, args.out_manifest, args.cache, model, skip_bad=args.skip_bad,
                                   progress=not args.quiet)
    print(f"wrote {out}")
    if skipped:
        print(f"skipped {len(skipped)} file(s) that cannot be decoded:")
        print("\n".join(f"  {path}: {reason}" for path, reason in skipped.items()))
    return 0
