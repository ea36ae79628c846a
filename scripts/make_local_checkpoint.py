#!/usr/bin/env python
"""A moshi-format checkpoint on disk, random weights, laid out as Kyutai's hub repositories are:
config.json (the LM kwargs and file names, as moshi's `CheckpointInfo` reads it), the LM's
safetensors, Mimi's safetensors (the real codec's architecture, random weights with codebooks
fitted so that its codes carry the audio, as the tiny model's) and a SentencePiece text tokenizer
trained on a few lines. For running commands offline against a "real" checkpoint (docs/commands.md).

    .venv/bin/python scripts/make_local_checkpoint.py runs/local_ckpt
    .venv/bin/python scripts/make_local_checkpoint.py runs/local_ckpt --hub-cache runs/hf-cache --repo org/moshi-tiny

With `--hub-cache DIR --repo ORG/NAME` the files are also laid out in DIR as huggingface_hub lays out
its cache (blobs, snapshots/<commit>, refs/main), so that with HF_HUB_CACHE=DIR HF_HUB_OFFLINE=1,
`model.name=ORG/NAME` resolves without a network.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from ttt_speech.models import TINY_MOSHI_KWARGS  # noqa: E402

from moshi.models.loaders import MIMI_NAME, MOSHI_NAME  # noqa: E402 - Kyutai's file names, spelled out in config.json
from moshi.models.loaders import TEXT_TOKENIZER_NAME as TOKENIZER_NAME  # noqa: E402
TOKENIZER_TEXT = ["the quick brown fox jumps over the lazy dog",
                  "a long conversation needs a memory beyond its attention window",
                  "test time training layers learn while they listen to a book"]
COMMIT = "0123456789abcdef0123456789abcdef01234567"  # the snapshot's name in a hub-layout cache


def _lut(values: list[str]) -> dict:
    """A lookup-table conditioner of config.json (moshi's `get_conditioner`, type lut)."""
    return {"type": "lut", "lut": {"n_bins": len(values), "dim": 16, "tokenizer": "noop", "possible_values": values}}


# config.json entries of each family beyond the tiny Moshi's kwargs, shaped as Kyutai's repos' (shrunk)
FAMILY_KWARGS = {
    "moshi": {},
    # Hibiki: Moshi's layout, a quality label summed into the input (moshi's run_inference passes "very_good")
    "hibiki": {"conditioners": {"description": _lut(["very_bad", "bad", "neutral", "good", "very_good"])},
               "fuser": {"sum": ["description"]}},
    # STT: the audio streams are only read, the text stream alone is predicted (no depformer)
    "stt": {"n_q": 8, "dep_q": 0, "delays": [0] * 9,
            "stt_config": {"audio_silence_prefix_seconds": 1.0, "audio_delay_seconds": 0.5}},
    # TTS: one audio stream written, a speaker embedding read by cross-attention, control labels summed
    "tts": {"n_q": 8, "dep_q": 8, "delays": [0] + [1] * 8, "cross_attention": True,
            "conditioners": {"speaker_wavs": {"type": "tensor", "tensor": {"dim": 32}},
                             "control": _lut(["ok"]), "cfg": _lut(["1.0", "2.0"])},
            "fuser": {"cross": ["speaker_wavs"], "sum": ["control", "cfg"]},
            "tts_config": {"audio_delay": 1.28, "second_stream_ahead": 2}},
}
NOT_LM_KWARGS = ("stt_config", "tts_config")  # config.json entries moshi's loaders pop before building the LM


def make_checkpoint(out: Path, seed: int = 0, text_card: int = 40, model_type: str = "moshi",
                    dtype: str = "float32", mimi_from: Path | None = None, **tiny) -> Path:
    """Write the checkpoint into `out` (created); its folder.

    Args:
        model_type: a key of FAMILY_KWARGS (config.json's model_type).
        dtype: of the LM weights written ("bfloat16" as Kyutai's *-bf16 repos).
        mimi_from: a Mimi file to link instead of writing the seeded random one.
        tiny: overrides of the tiny LM's kwargs.
    """
    import sentencepiece
    from moshi.models import loaders
    from safetensors.torch import save_file

    from ttt_speech.models import DTYPES, _random_mimi_state

    out.mkdir(parents=True, exist_ok=True)
    kwargs = {**TINY_MOSHI_KWARGS, **FAMILY_KWARGS[model_type], **tiny, "text_card": text_card}
    with torch.random.fork_rng(devices=[]):  # moshi's own builder: conditioners and fuser included
        torch.manual_seed(seed)
        # a deep copy: moshi's get_conditioner writes output_dim and device into the kwargs it is given
        lm_kwargs = copy.deepcopy({k: v for k, v in kwargs.items() if k not in NOT_LM_KWARGS})
        lm = loaders.get_moshi_lm(None, lm_kwargs=lm_kwargs, device="cpu", dtype=torch.float32)
    state = {k: v.to(DTYPES[dtype]) if v.is_floating_point() else v for k, v in lm.state_dict().items()}
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / MOSHI_NAME))
    if mimi_from is not None:  # another checkpoint's Mimi, hard-linked (tests build several: 385 MB each)
        os.link(mimi_from, out / MIMI_NAME)
    else:
        save_file({k: v.contiguous() for k, v in _random_mimi_state(seed).items()}, str(out / MIMI_NAME))
    text = out / "tokenizer.txt"
    text.write_text("\n".join(TOKENIZER_TEXT * 20) + "\n")
    # the text card counts the tokenizer's pieces (moshi's text_card is the tokenizer's size)
    sentencepiece.SentencePieceTrainer.train(input=str(text), model_prefix=str(out / "spm"), vocab_size=text_card,
                                             model_type="unigram", minloglevel=2)
    (out / "spm.model").rename(out / TOKENIZER_NAME)
    for leftover in (text, out / "spm.vocab"):
        leftover.unlink()
    config = {**{k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()}, "model_type": model_type,
              "moshi_name": MOSHI_NAME, "mimi_name": MIMI_NAME, "tokenizer_name": TOKENIZER_NAME}
    (out / "config.json").write_text(json.dumps(config, indent=1) + "\n")
    return out


def cache_as_hub(folder: Path, cache: Path, repo_id: str, commit: str = COMMIT, ref: str = "main") -> Path:
    """Lay `folder` out in `cache` as huggingface_hub does (blobs/<sha256>, snapshots/<commit>/ of
    relative links to them, refs/<ref> holding the commit hash); the snapshot folder."""
    from huggingface_hub.file_download import repo_folder_name

    storage = cache / repo_folder_name(repo_id=repo_id, repo_type="model")
    snapshot = storage / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    (storage / "blobs").mkdir(exist_ok=True)
    for file in sorted(folder.iterdir()):
        data = file.read_bytes()
        blob = storage / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snapshot / file.name
        link.unlink(missing_ok=True)
        link.symlink_to(os.path.relpath(blob, snapshot))
    (storage / "refs").mkdir(exist_ok=True)
    (storage / "refs" / ref).write_text(commit)
    return snapshot


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="folder to write the checkpoint into")
    parser.add_argument("--seed", type=int, default=0, help="weights seed (default 0)")
    parser.add_argument("--model-type", choices=sorted(FAMILY_KWARGS), default="moshi",
                        help="config.json's model_type, with that family's conditioning and streams (default moshi)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="of the LM weights written (bfloat16: as Kyutai's *-bf16 repos; default float32)")
    parser.add_argument("--hub-cache", type=Path, help="also lay it out in this hub-layout cache (HF_HUB_CACHE)")
    parser.add_argument("--repo", default="local/moshi-tiny", help="its repo id in --hub-cache (default local/moshi-tiny)")
    args = parser.parse_args(argv)
    if args.out.exists() and any(args.out.iterdir()):
        print(f"make_local_checkpoint: {args.out} is not empty", file=sys.stderr)
        return 2
    with torch.no_grad():
        folder = make_checkpoint(args.out, args.seed, model_type=args.model_type, dtype=args.dtype)
    print(f"wrote {folder}: " + ", ".join(sorted(p.name for p in folder.iterdir())))
    if args.hub_cache is not None:
        snapshot = cache_as_hub(folder, args.hub_cache, args.repo)
        print(f"laid out as {args.repo} in {args.hub_cache} ({snapshot}); use HF_HUB_CACHE={args.hub_cache} "
              f"HF_HUB_OFFLINE=1 and model.name={args.repo}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
