"""`ttt-speech data synth` (synthetic long-context corpus) and `ttt-speech data encode` (audio → codes)."""
from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="make or encode training data (synthetic corpus, Mimi codes)",
                          description="Data tools: a synthetic long-context code corpus, and audio → Mimi codes.")
    tools = data.add_subparsers(dest="data_command", required=True, metavar="TOOL")
    synth = tools.add_parser(
        "synth", help="write the synthetic long-context corpus (code files + train/eval manifests)",
        description="Deterministic by seed. Each recording re-uses its own private motifs many windows "
                    "apart, with random filler between: only memory of the recording predicts them "
                    "(see ttt_speech/data/synthetic.py).")
    synth.add_argument("out", type=Path, help="output folder")
    synth.add_argument("--recordings", type=int, default=16, help="number of recordings (default 16)")
    synth.add_argument("--frames", type=int, default=2048, help="frames per recording, 12.5 per second (default 2048)")
    synth.add_argument("--card", type=int, default=64, help="audio codes used, 0..card-1 (default 64)")
    synth.add_argument("--num-motifs", type=int, default=8, help="private motifs per recording (default 8)")
    synth.add_argument("--motif-frames", type=int, default=16, help="frames per motif (default 16)")
    synth.add_argument("--motif-prob", type=float, default=0.5, help="probability that a segment is a motif (default 0.5)")
    synth.add_argument("--vocab", type=int, default=0,
                       help="codes per codebook each recording uses, a private subset of --card (default 0: all)")
    synth.add_argument("--eval-recordings", type=int, default=4, help="recordings held out in eval.jsonl (default 4)")
    synth.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    synth.set_defaults(func=_synth)

    encode = tools.add_parser(
        "encode", help="encode a manifest's audio to Mimi codes ahead of training",
        description="Encode every audio file of a JSONL manifest into the content-addressed codes cache "
                    "and write a manifest of the resulting code files.")
    encode.add_argument("manifest", type=Path, help="JSONL manifest of audio files ({\"path\": ..., \"duration\": ...})")
    encode.add_argument("out_manifest", type=Path, help="manifest of code files to write")
    encode.add_argument("--cache", type=Path, default=Path(".cache/codes"), help="codes cache folder (default .cache/codes)")
    encode.add_argument("--model", default="tiny", help="'tiny' (random Mimi) or the HF repo of the codec (default tiny)")
    encode.add_argument("--mimi-weights", type=Path, help="local Mimi weights instead of the hub file")
    encode.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    encode.set_defaults(func=_encode)


def _synth(args: argparse.Namespace) -> int:
    from .synthetic import SynthConfig, write_corpus

    config = SynthConfig(recordings=args.recordings, frames=args.frames, card=args.card, num_motifs=args.num_motifs,
                         motif_frames=args.motif_frames, motif_prob=args.motif_prob, vocab=args.vocab,
                         eval_recordings=args.eval_recordings, seed=args.seed)
    files = write_corpus(config, args.out, progress=True)
    print("wrote " + ", ".join(f"{k}: {v}" for k, v in files.items()))
    return 0


def _encode(args: argparse.Namespace) -> int:
    from .encode import encode_manifest
    from ..models import ModelConfig

    model = ModelConfig(name=args.model, mimi_weights=args.mimi_weights, device=args.device)
    out, skipped = encode_manifest(args.manifest, args.out_manifest, args.cache, model)
    print(f"wrote {out}" + (f"; skipped {len(skipped)} unreadable file(s)" if skipped else ""))
    return 0
