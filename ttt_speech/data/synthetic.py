"""A synthetic long-context code corpus whose structure rewards memory beyond the attention window.

Each recording is a "speaker" reading: 8 codebooks per frame, like Mimi's codes.

- **Semantic codebook (1)**: the speaker has a private *vocabulary* of `vocab` of the `card`
  codes; each frame draws one of them uniformly, or with probability `repeat_prob` keeps the
  previous frame's code (units last several frames, as in speech). Vocabularies are drawn per
  recording, so they cannot be learned into the weights: only what the model heard earlier in
  *this* recording tells them. An attention window holds only a few of them (the demo's 8 frames,
  with vocabulary 8 and repeat probability 0.5: 3.5 distinct codes on average); a model that
  remembers the whole recording knows them all: ln(card) − ln(vocab) nats per frame minus what the window
  already gives. This is what the TTT fast weights can accumulate and attention cannot.
- **Acoustic codebooks (2–8)**: with probability `acoustic_coupling` each is a fixed function
  of the frame's semantic code (one random permutation per codebook, shared by every recording of
  the corpus: learnable into the weights, like a codec's acoustic detail given its semantics),
  otherwise uniform noise that bounds the loss any model can reach.
- **Motifs** (optional, `num_motifs` > 0): the recording is a sequence of segments; with
  probability `motif_prob` a segment replays one of the recording's private motifs (a fixed
  stretch of `motif_frames` frames, all codebooks), otherwise it is free speech as above. A
  motif's first frames name it; the rest is predictable from any earlier occurrence, however far
  back (exact recall, a harder memory than the vocabulary).

Recording lengths are uniform in frames·[1 − length_jitter, 1 + length_jitter] (rows of a
training batch then switch recordings at different steps); held-out recordings are
`eval_frames` long. Deterministic by seed; written as code files + train/eval manifests
(+ corpus.json with the config).
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
from torch import Tensor

from ..files import write_text_atomic
from . import FRAME_RATE
from .codes import Recording, save_codes
from .manifest import ManifestEntry, write_manifest
from .synth_config import SynthConfig

__all__ = ["SynthConfig", "acoustic_maps", "synth_recording", "write_corpus"]
NUM_CODEBOOKS = 8
FIRST_TOKEN_ID = 3  # token corpora (`write_token_corpus`): ids below are the tiny LLMs' special tokens


def acoustic_maps(config: SynthConfig) -> Tensor:
    """The corpus's fixed semantic → acoustic code maps, [7, card] (one permutation per codebook)."""
    g = torch.Generator().manual_seed(config.seed * 1_000_003 + 999_983)
    return torch.stack([torch.randperm(config.card, generator=g) for _ in range(NUM_CODEBOOKS - 1)])


def _speech(config: SynthConfig, vocab: Tensor, maps: Tensor, n: int, g: torch.Generator) -> Tensor:
    """n frames of free speech, [8, n]: semantic codes from `vocab` with repeats, coupled acoustics."""
    draws = vocab[torch.randint(0, len(vocab), (n,), generator=g)]
    keep = torch.rand(n, generator=g) < config.repeat_prob
    keep[:1] = False
    source = torch.where(keep, 0, torch.arange(n)).cummax(0).values  # last frame that drew anew
    semantic = draws[source]
    coupled = maps[:, semantic]
    noise = torch.randint(0, config.card, coupled.shape, generator=g)
    acoustic = torch.where(torch.rand(coupled.shape, generator=g) < config.acoustic_coupling, coupled, noise)
    return torch.cat([semantic[None], acoustic])


def recording_frames(config: SynthConfig, index: int, g: torch.Generator) -> int:
    if config.is_eval(index) and config.eval_frames is not None:
        return config.eval_frames
    if config.length_jitter == 0:
        return config.frames
    lo = max(1, round(config.frames * (1 - config.length_jitter)))
    hi = max(lo, round(config.frames * (1 + config.length_jitter)))
    return int(torch.randint(lo, hi + 1, (), generator=g))


def synth_recording(config: SynthConfig, index: int, maps: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Recording `index`: (codes [8, T], motif id per frame [T], −1 outside motifs)."""
    maps = acoustic_maps(config) if maps is None else maps
    g = torch.Generator().manual_seed(config.seed * 1_000_003 + index)
    frames = recording_frames(config, index, g)
    vocab = torch.randperm(config.card, generator=g)[:config.vocab or config.card]
    if config.num_motifs == 0:
        return _speech(config, vocab, maps, frames, g), torch.full((frames,), -1)
    L = config.motif_frames
    motifs = [_speech(config, vocab, maps, L, g) for _ in range(config.num_motifs)]
    pieces, labels, total = [], [], 0
    while total < frames:
        if torch.rand((), generator=g).item() < config.motif_prob:
            m = int(torch.randint(0, config.num_motifs, (), generator=g))
            piece, label = motifs[m], torch.full((L,), m)
        else:
            n = int(torch.randint(max(1, L // 2), L + L // 2 + 1, (), generator=g))
            piece, label = _speech(config, vocab, maps, n, g), torch.full((n,), -1)
        pieces.append(piece)
        labels.append(label)
        total += piece.shape[1]
    return torch.cat(pieces, 1)[:, :frames], torch.cat(labels)[:frames]


def write_corpus(config: SynthConfig, out: str | Path, progress: bool = False, tokens: bool = False) -> dict[str, Path]:
    """Write the corpus into `out`: recordings/*.safetensors, train.jsonl, eval.jsonl, corpus.json.

    tokens: token streams for host llama instead (`ttt-speech data synth --tokens`), tokens/*.npy: each
    recording's semantic codebook (its private vocabulary, repeats and motifs: what only memory of the
    stream predicts) as token ids FIRST_TOKEN_ID..card+2. Ids 0-2 are left out: the tiny LLMs' pad / bos
    / eos (the pad token's embedding is zero, which would make TTT's inner LayerNorm degenerate)."""
    from ..progress import progress_bar
    from .tokens import write_token_file

    out = Path(out)
    maps = acoustic_maps(config)
    train, held_out = [], []
    for i in progress_bar(range(config.recordings), desc="synth corpus", unit="rec", enabled=progress):
        codes, _ = synth_recording(config, i, maps)
        if tokens:
            entry = ManifestEntry(write_token_file(out / "tokens" / f"rec_{i:05d}.npy", codes[0] + FIRST_TOKEN_ID), None)
        else:
            path = save_codes(out / "recordings" / f"rec_{i:05d}.safetensors",
                              Recording(codes, silence=torch.zeros(NUM_CODEBOOKS, dtype=torch.long),
                                        codec=f"synthetic-card{config.card}", source=f"synthetic:{config.seed}:{i}"))
            entry = ManifestEntry(path, codes.shape[1] / FRAME_RATE)
        (held_out if config.is_eval(i) else train).append(entry)
    files = {"train": write_manifest(out / "train.jsonl", train)}
    if held_out:
        files["eval"] = write_manifest(out / "eval.jsonl", held_out)
    kind = "synthetic_tokens" if tokens else "synthetic"
    write_text_atomic(out / "corpus.json", json.dumps({kind: asdict(config)}, indent=2) + "\n")
    files["corpus"] = out / "corpus.json"
    return files
