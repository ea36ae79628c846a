"""A synthetic long-context code corpus whose structure rewards memory beyond the attention window.

Each recording r draws its own set of `num_motifs` motifs (random code sequences of
`motif_frames` frames over all 8 codebooks) and is a sequence of segments: with probability
`motif_prob` a motif of r (uniformly chosen), otherwise filler (i.i.d. random codes, length
uniform in [motif_frames/2, 3·motif_frames/2]). Motifs are never shared between recordings, so
they cannot be learned into the weights: only what the model saw earlier *in this recording*
predicts them. A motif's first frame names it; the rest of an occurrence is predictable from
any earlier occurrence, however far back. With num_motifs · motif_frames / motif_prob frames
between repeats well beyond the attention context, a sliding-window model can only guess,
while a model with memory of the whole recording (TTT) can recall.
Optionally (`vocab` > 0) each recording also speaks its own *vocabulary*: in every codebook, its
codes (motifs and filler) come from a private random subset of `vocab` of the `card` codes, as a
voice uses its own region of the codec's space. A window of attention sees only a few of them;
a model that remembers the recording so far knows the whole subset (ln card − ln vocab nats of
gain on filler). Filler is otherwise unpredictable: it bounds the loss any model can reach.
Deterministic by seed; written as code files + train/eval manifests (+ corpus.json).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..checkpoint import write_text_atomic
from .codes import FRAME_RATE, Recording, save_codes
from .manifest import ManifestEntry, write_manifest


@dataclass
class SynthConfig:
    recordings: int = 16
    frames: int = 2048
    card: int = 64
    num_motifs: int = 8
    motif_frames: int = 16
    motif_prob: float = 0.5
    eval_recordings: int = 4
    vocab: int = 0  # codes per codebook a recording uses (0: all `card`)
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("recordings", "frames", "card", "num_motifs", "motif_frames"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"synth.{name}: expected a positive integer, got {value!r}")
        if not 0 < self.motif_prob <= 1:
            raise ValueError(f"synth.motif_prob: expected a number in (0, 1], got {self.motif_prob!r}")
        if not 0 <= self.eval_recordings < self.recordings:
            raise ValueError(f"synth.eval_recordings: expected 0..{self.recordings - 1}, got {self.eval_recordings}")
        if self.card < 2 or self.card > 2048:
            raise ValueError(f"synth.card: expected 2..2048, got {self.card}")
        if isinstance(self.vocab, bool) or not isinstance(self.vocab, int) or not 0 <= self.vocab <= self.card:
            raise ValueError(f"synth.vocab: expected 0..card ({self.card}), got {self.vocab!r}")


def synth_recording(config: SynthConfig, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Recording `index`: (codes [8, frames], motif id per frame [frames], −1 on filler)."""
    g = torch.Generator().manual_seed(config.seed * 1_000_003 + index)
    L, card = config.motif_frames, config.card
    vocab = config.vocab or card
    # per codebook, the codes this recording uses: draws are indices into its own subset
    subset = torch.stack([torch.randperm(card, generator=g)[:vocab] for _ in range(8)])  # [8, vocab]

    def draw(n: int) -> torch.Tensor:  # [8, n] codes of this recording
        return subset.gather(1, torch.randint(0, vocab, (8, n), generator=g))

    motifs = torch.stack([draw(L) for _ in range(config.num_motifs)])
    pieces, labels, total = [], [], 0
    while total < config.frames:
        if torch.rand((), generator=g).item() < config.motif_prob:
            m = int(torch.randint(0, config.num_motifs, (), generator=g))
            piece, label = motifs[m], torch.full((L,), m)
        else:
            n = int(torch.randint(max(1, L // 2), L + L // 2 + 1, (), generator=g))
            piece, label = draw(n), torch.full((n,), -1)
        pieces.append(piece)
        labels.append(label)
        total += piece.shape[1]
    return torch.cat(pieces, 1)[:, :config.frames], torch.cat(labels)[:config.frames]


def write_corpus(config: SynthConfig, out: str | Path, progress: bool = False) -> dict[str, Path]:
    """Write the corpus into `out`: recordings/*.safetensors, train.jsonl, eval.jsonl, corpus.json."""
    from tqdm import tqdm

    out = Path(out)
    entries = []
    for i in tqdm(range(config.recordings), desc="synth corpus", unit="rec", disable=not progress):
        codes, _ = synth_recording(config, i)
        path = save_codes(out / "recordings" / f"rec_{i:05d}.safetensors",
                          Recording(codes, silence=torch.zeros(8, dtype=torch.long),
                                    codec=f"synthetic-card{config.card}", source=f"synthetic:{config.seed}:{i}"))
        entries.append(ManifestEntry(path, config.frames / FRAME_RATE))
    n_eval = config.eval_recordings
    train = write_manifest(out / "train.jsonl", entries[:len(entries) - n_eval])
    files = {"train": train, "corpus": out / "corpus.json"}
    if n_eval:
        files["eval"] = write_manifest(out / "eval.jsonl", entries[len(entries) - n_eval:])
    write_text_atomic(out / "corpus.json", json.dumps({"synthetic": asdict(config)}, indent=2) + "\n")
    return files
