"""Pure metrics for `ttt-speech eval continuation`: a speech LM continues a prompt for minutes and
each span of what it generates is scored against the prompt.

Acoustic drift (k-NN distance of a span's codec latents to the prompt's, in units of the prompt's own
spread) · cosine similarity (speaker embeddings) · word normalisation, word errors (WER) · auto-BLEU
and distinct-n (repetition) · silent fraction (audio) · token fraction (e.g. text padding) ·
quantile bounds (spans) · spread (summary across streams). No model is loaded here.
"""
from __future__ import annotations

import math
import unicodedata
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor


@dataclass(frozen=True)
class Metric:
    """One number `eval continuation` measures on every span: how reports name it, which way is better,
    what it measures, and the judges it needs (`continuation.*_model` fields; none set: not measured)."""

    label: str
    better: str | None  # "lower", "higher" or None (neither: read it beside the ground truth)
    measures: str
    needs: tuple[str, ...] = ()


METRICS: dict[str, Metric] = {
    "drift": Metric("drift from the prompt", "lower", "Mimi-latent k-NN distance to the prompt over the prompt's "
                                                      "own spread (1: as close as the prompt is to itself)"),
    "speaker_similarity": Metric("speaker similarity", "higher", "cosine of WavLM speaker embeddings, span vs prompt",
                                 ("speaker_model",)),
    "gen_ppl": Metric("GenPPL", "lower", "perplexity of the span's Whisper transcript under the text LM",
                      ("asr_model", "text_model")),
    "auto_bleu": Metric("Auto-BLEU-2", "lower", "self-repetition of the transcript (1- and 2-grams seen again)",
                        ("asr_model",)),
    "distinct_2": Metric("distinct-2", "higher", "unique word bigrams / bigrams of the transcript", ("asr_model",)),
    "wer": Metric("WER vs the book", "lower", "the transcript against the true continuation's transcript (summed "
                                              "edits / summed words)", ("asr_model",)),
    "wer_text_stream": Metric("WER vs own text", "lower", "the transcript against the model's own text stream: "
                                                          "does the audio say what the model writes", ("asr_model",)),
    "nll_text": Metric("own NLL, text", None, "the model's NLL of the text tokens it sampled, padding included "
                                              "(nats)"),
    "nll_audio": Metric("own NLL, audio", None, "the model's NLL of the audio tokens it sampled (nats)"),
    "silent_fraction": Metric("silent frames", None, "fraction of 80 ms frames quieter than silence_db"),
    "text_padding": Metric("text padding", None, "fraction of the text stream that is padding"),
}
SPEAKER_MIN_SECONDS = 0.5  # shorter audio has too few frames for WavLM's x-vector (TDNN) layers (0.3 s at least)
# metrics summarised as a ratio of sums over spans (a corpus rate), from these per-span counts
RATIOS = {"wer": ("wer_edits", "wer_words"), "wer_text_stream": ("wer_text_stream_edits", "wer_text_stream_words")}


def knn_distances(reference: Tensor, query: Tensor, k: int, leave_one_out: bool = False) -> Tensor:
    """[M] mean Euclidean distance of each query row [M, D] to its k nearest rows of reference [N, D]
    (float64 math). leave_one_out: query IS reference (M == N) and each row's own entry is excluded.
    k larger than the available neighbours → all of them."""
    if reference.dim() != 2 or query.dim() != 2 or reference.shape[1] != query.shape[1]:
        raise ValueError(f"expected reference [N, D] and query [M, D], got {tuple(reference.shape)} "
                         f"and {tuple(query.shape)}")
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if leave_one_out and reference.shape[0] != query.shape[0]:
        raise ValueError("leave_one_out needs query to be reference (M == N)")
    available = reference.shape[0] - int(leave_one_out)
    if available < 1:
        raise ValueError(f"no neighbours: {reference.shape[0]} reference rows, leave_one_out={leave_one_out}")
    # Direct differences, not the |a|² + |b|² - 2ab expansion: a row's distance to an identical row must
    # be exactly 0 (a replay of the prompt scores 0), which the expansion only gets up to rounding.
    dist = torch.cdist(query.detach().double(), reference.detach().double(),
                       compute_mode="donot_use_mm_for_euclid_dist")
    if leave_one_out:
        dist.fill_diagonal_(math.inf)
    return dist.topk(min(k, available), dim=1, largest=False).values.mean(1)


@dataclass(frozen=True)
class DriftReference:
    latents: Tensor  # [N, D] the prompt's Mimi latents (one per frame), float64
    k: int
    scale: float  # mean leave-one-out k-NN distance of the prompt's frames to the others: its own spread


def drift_reference(prompt_latents: Tensor, k: int) -> DriftReference:
    """The prompt [N, D] as a drift reference. Raise ValueError if fewer than 2 prompt frames (no spread)
    or a zero spread (constant prompt)."""
    if prompt_latents.dim() != 2 or prompt_latents.shape[0] < 2:
        raise ValueError(f"a drift reference needs at least 2 prompt frames [N, D], got {tuple(prompt_latents.shape)}")
    latents = prompt_latents.detach().double()
    scale = knn_distances(latents, latents, k, leave_one_out=True).mean().item()
    if not scale > 0:
        raise ValueError("the prompt's frames have zero spread (a constant prompt): drift would divide by 0")
    return DriftReference(latents, k, scale)


def drift(reference: DriftReference, latents: Tensor) -> float:
    """Drift of a span [M, D] from the prompt: mean over its frames of the k-NN distance to the prompt's
    latents (exact matches allowed), divided by the prompt's own spread. 0: every frame is one of the
    prompt's (with k=1); about 1: as close to the prompt as the prompt's frames are to each other;
    larger: further. (Kyutai's tts_longeval uses the same k-NN idea with k=5; we normalise by the
    prompt's leave-one-out spread so that a replay of the prompt scores 0 with k=1 and the scale means
    something.)"""
    if latents.dim() != 2 or latents.shape[0] == 0:
        raise ValueError(f"drift needs a span of at least one frame [M, D], got {tuple(latents.shape)}")
    return knn_distances(reference.latents, latents, reference.k).mean().item() / reference.scale


def cosine_similarity(a: Tensor, b: Tensor) -> float:
    """Cosine of the angle between a [D] and b [D] (float64), in [-1, 1]."""
    a, b = a.detach().double().flatten(), b.detach().double().flatten()
    norms = a.norm() * b.norm()
    if a.shape != b.shape or norms == 0:
        raise ValueError(f"cosine similarity needs two non-zero vectors of one size, "
                         f"got {tuple(a.shape)} and {tuple(b.shape)}")
    # rounding can take |cos| just past 1; a cosine cannot be
    return (a @ b / norms).clamp(-1.0, 1.0).item()


# Typographic apostrophes (ASR output often has them) count as the ASCII one; NFKC leaves them apart.
_APOSTROPHES = str.maketrans({"\u2019": "'", "\u02bc": "'"})


def normalize_words(text: str) -> list[str]:
    """Lowercase words: unicode-normalised (NFKC), punctuation (and symbols: $, %, …) removed except
    apostrophes inside words, hyphens and whitespace split words. '' → []."""
    text = unicodedata.normalize("NFKC", text).translate(_APOSTROPHES).lower()
    chars = []
    for c in text:
        kind = unicodedata.category(c)
        if kind == "Pd":  # any dash joins two words: "well-known" is "well known"
            chars.append(" ")
        elif c == "'" or not kind.startswith(("P", "S")):
            chars.append(c)
    # Apostrophes at a word's ends are quotes or plural possessives ("dogs'"), not part of the word.
    words = (w.strip("'") for w in "".join(chars).split())
    return [w for w in words if w]


@dataclass(frozen=True)
class WordErrors:
    substitutions: int
    deletions: int  # reference words missing from the hypothesis
    insertions: int  # hypothesis words not in the reference
    reference_words: int

    @property
    def edits(self) -> int:
        return self.substitutions + self.deletions + self.insertions

    @property
    def rate(self) -> float | None:
        """Word error rate, edits / reference words; None when the reference is empty."""
        return self.edits / self.reference_words if self.reference_words else None


def word_errors(hypothesis: list[str], reference: list[str]) -> WordErrors:
    """Levenshtein alignment on words (minimum edits), counting S, D, I. Among alignments with the
    minimum, the backtrace from the end prefers a match or substitution, then a deletion, then an
    insertion, so the split into S, D and I is deterministic."""
    h, r = len(hypothesis), len(reference)
    # cost[i][j]: edits turning hypothesis[:i] into reference[:j]
    cost = [[i + j if i == 0 or j == 0 else 0 for j in range(r + 1)] for i in range(h + 1)]
    for i in range(1, h + 1):
        for j in range(1, r + 1):
            diagonal = cost[i - 1][j - 1] + (hypothesis[i - 1] != reference[j - 1])
            cost[i][j] = min(diagonal, cost[i][j - 1] + 1, cost[i - 1][j] + 1)
    s = d = n_ins = 0
    i, j = h, r
    while i or j:
        if i and j and cost[i][j] == cost[i - 1][j - 1] + (hypothesis[i - 1] != reference[j - 1]):
            s += hypothesis[i - 1] != reference[j - 1]
            i, j = i - 1, j - 1
        elif j and cost[i][j] == cost[i][j - 1] + 1:
            d, j = d + 1, j - 1
        else:
            n_ins, i = n_ins + 1, i - 1
    return WordErrors(s, d, n_ins, r)


def _ngrams(words: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]


def auto_bleu(words: list[str], max_n: int = 2) -> float | None:
    """Self-repetition of one transcript (GSLM's auto-BLEU, Lakhotia et al. 2021): for each n in 1..max_n,
    the fraction of its n-grams that occur again elsewhere in the same text *without overlapping* them
    (an occurrence entirely before it or entirely after it), averaged over n (arithmetic, equal weights).
    None when the text has fewer than max_n + 1 words (too short to say)."""
    if max_n < 1:
        raise ValueError(f"max_n must be at least 1, got {max_n}")
    if len(words) < max_n + 1:
        return None
    fractions = []
    for n in range(1, max_n + 1):
        grams = _ngrams(words, n)
        first, last = {}, {}
        for i, g in enumerate(grams):
            first.setdefault(g, i)
            last[g] = i
        # The n-gram at i recurs without overlap iff some copy ends by i (starts at ≤ i - n) or starts
        # at ≥ i + n: the earliest and the latest copies decide it.
        repeated = sum(first[g] <= i - n or last[g] >= i + n for i, g in enumerate(grams))
        fractions.append(repeated / len(grams))
    return sum(fractions) / len(fractions)


def distinct_n(words: list[str], n: int) -> float | None:
    """Unique n-grams / n-grams; None without any n-gram."""
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    grams = _ngrams(words, n)
    return len(set(grams)) / len(grams) if grams else None


def silent_fraction(pcm: Tensor, frame_size: int, threshold_db: float) -> float | None:
    """Fraction of whole frames of `frame_size` samples of pcm [S] whose RMS level (dBFS, full scale = 1.0) is
    below threshold_db. None for no whole frame."""
    if pcm.dim() != 1 or frame_size <= 0:
        raise ValueError(f"expected pcm [S] and a positive frame size; got {tuple(pcm.shape)}, {frame_size}")
    frames = pcm.shape[0] // frame_size
    if frames == 0:
        return None
    rms = pcm[:frames * frame_size].double().view(frames, frame_size).square().mean(1).sqrt()
    # rms < 10^(dB/20) is 20·log10(rms) < dB without the log of a silent (zero) frame
    return (rms < 10.0 ** (threshold_db / 20.0)).double().mean().item()


def token_fraction(tokens: Tensor, ids: Sequence[int]) -> float | None:
    """Fraction of tokens [T] that are one of ids (e.g. the text stream's padding tokens); None when T == 0."""
    if tokens.numel() == 0:
        return None
    return torch.isin(tokens, torch.tensor(list(ids), dtype=tokens.dtype)).double().mean().item()


def quantile_groups(spans: Sequence[tuple[int, int]], quantiles: Sequence[float]) -> list[tuple[int, int]]:
    """[start, end) index ranges of `spans` (consecutive [a, b) frame ranges from 0) in each quantile
    (lo, hi] of their total length (quantiles: increasing cumulative fractions ending at 1, e.g. [0.25, 0.5,
    0.75, 1.0]): a span belongs to the quantile that holds its centre, so each span is in exactly one.
    (tts_longeval cuts frames at int(q · total); scored spans cannot be cut, and int() of a few spans
    would leave the first quarter empty.) A quantile no centre falls in is an empty range."""
    total = spans[-1][1] if spans else 0
    centres = [(a + b) / 2 / total for a, b in spans]
    edges = [0.0, *quantiles]
    count = lambda edge: sum(c <= edge for c in centres)  # noqa: E731 - centres increase: a prefix
    return [(count(lo), count(hi)) for lo, hi in zip(edges, edges[1:])]


def spread(values: Sequence[float | None]) -> dict | None:
    """Summary across streams of one number: {"mean", "std" (sample std, n - 1; 0 for n = 1), "min",
    "max", "n"}; values that are None or NaN are left out; None when nothing is left."""
    kept = [float(v) for v in values if v is not None and not math.isnan(v)]
    if not kept:
        return None
    n = len(kept)
    mean = sum(kept) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in kept) / (n - 1)) if n > 1 else 0.0
    return {"mean": mean, "std": std, "min": min(kept), "max": max(kept), "n": n}
