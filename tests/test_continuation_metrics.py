"""Known answers for the continuation metrics (eval/continuation_metrics.py): drift, WER, repetition,
silence, spans and summaries. Every input is checked to carry information before its answer is."""
import math
import random
from functools import lru_cache
from pathlib import Path

import pytest
import torch

from ttt_speech_apps.eval.continuation_metrics import (
    WordErrors, auto_bleu, cosine_similarity, distinct_n, drift, drift_reference, knn_distances,
    normalize_words, quantile_groups, silent_fraction, spread, token_fraction, word_errors,
)

LIBRIVOX = Path("/usr/share/pocketsphinx/test/data/librivox/sense_and_sensibility_01_austen_64kb-0870.wav")


def gaussian(n: int, dim: int = 16, shift: float = 0.0, seed: int = 0) -> torch.Tensor:
    """[n, dim] draws of N(shift, 1): one "recording" per shift."""
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + shift


def brute_knn(reference: torch.Tensor, query: torch.Tensor, k: int, leave_one_out: bool) -> list[float]:
    out = []
    for i, q in enumerate(query.tolist()):
        d = sorted(math.dist(q, r) for j, r in enumerate(reference.tolist()) if not (leave_one_out and i == j))
        out.append(sum(d[:k]) / len(d[:k]))
    return out


@pytest.mark.parametrize("k", [1, 3, 100])
def test_knn_distances_match_a_brute_force_loop(k):
    reference, query = gaussian(20, 4, seed=1), gaussian(7, 4, seed=2)
    got = knn_distances(reference, query, k)
    assert got.dtype == torch.float64 and got.shape == (7,)
    assert got.tolist() == pytest.approx(brute_knn(reference, query, k, False), rel=1e-12)
    loo = knn_distances(reference, reference, k, leave_one_out=True)
    assert loo.tolist() == pytest.approx(brute_knn(reference, reference, k, True), rel=1e-12)
    # not degenerate: the rows' distances differ, and excluding the row itself changes the answer
    assert got.unique().numel() == 7
    assert (loo > knn_distances(reference, reference, k)).all()


def test_knn_k_beyond_the_neighbours_takes_them_all():
    reference, query = gaussian(5, 3, seed=3), gaussian(2, 3, seed=4)
    assert knn_distances(reference, query, 50).tolist() == pytest.approx(torch.cdist(query, reference).mean(1).tolist())
    assert knn_distances(reference, query, 50).tolist() != pytest.approx(knn_distances(reference, query, 4).tolist())
    with pytest.raises(ValueError, match="no neighbours"):
        knn_distances(reference[:1], reference[:1], 1, leave_one_out=True)


def test_drift_of_a_replay_is_0_with_k1_and_below_1_with_k5():
    prompt = gaussian(300)
    assert drift(drift_reference(prompt, k=1), prompt) == 0.0
    # with k=5 a frame's own copy is 1 of its 5 neighbours, in the spread it is excluded: strictly below 1
    assert 0.5 < drift(drift_reference(prompt, k=5), prompt) < 1.0
    assert drift(drift_reference(prompt, k=1), gaussian(300, seed=1)) > 0.5  # a new sample is not a replay


def test_drift_is_about_1_for_the_same_distribution_and_large_for_another():
    reference = drift_reference(gaussian(300, seed=0), k=5)
    assert reference.scale > 0 and reference.k == 5
    for seed in (1, 2, 3):
        assert drift(reference, gaussian(300, seed=seed)) == pytest.approx(1.0, abs=0.2)
    assert drift(reference, gaussian(300, shift=3.0, seed=4)) > 2.0


def test_drift_rises_over_the_spans_of_a_stream_that_switches_recording():
    reference = drift_reference(gaussian(300, seed=0), k=5)
    stream = torch.cat([gaussian(400, seed=1), gaussian(400, shift=1.5, seed=2)])
    spans = [drift(reference, stream[i:i + 100]) for i in range(0, 800, 100)]
    assert max(spans[:4]) < min(spans[4:])
    assert all(s == pytest.approx(1.0, abs=0.3) for s in spans[:4])


def log_band_frames(pcm: torch.Tensor) -> torch.Tensor:
    """[T, 32] log power in 32 equal frequency bands every 20 ms of 16 kHz pcm [S]: a cheap stand-in for
    Mimi latents."""
    power = torch.stft(pcm, 512, hop_length=320, window=torch.hann_window(512), return_complex=True).abs() ** 2
    return power[1:257].reshape(32, 8, -1).mean(1).clamp_min(1e-10).log().T


@lru_cache
def speech() -> tuple[torch.Tensor, int]:
    if not LIBRIVOX.exists():
        pytest.skip("pocketsphinx-testdata is not installed (apt-get install -y pocketsphinx-testdata)")
    import soundfile
    pcm, rate = soundfile.read(LIBRIVOX, dtype="float32")
    return torch.from_numpy(pcm), rate


def test_drift_on_real_speech_orders_replay_rest_of_utterance_and_noise():
    pcm, rate = speech()
    assert rate == 16000 and pcm.shape[0] > 5 * rate
    frames = log_band_frames(pcm)
    half = frames.shape[0] // 2
    reference = drift_reference(frames[:half], k=5)
    # noise and tone as loud as the speech: drift must tell them apart by more than their level
    rms = pcm.square().mean().sqrt().item()
    noise = torch.randn(pcm.shape[0], generator=torch.Generator().manual_seed(0)) * rms
    tone = torch.sin(2 * math.pi * 440 * torch.arange(pcm.shape[0]) / rate) * rms * math.sqrt(2)
    assert noise.square().mean().sqrt().item() == pytest.approx(rms, rel=0.01)
    assert tone.square().mean().sqrt().item() == pytest.approx(rms, rel=0.01)
    replay, rest = drift(reference, frames[:half]), drift(reference, frames[half:])
    noisy, tonal = drift(reference, log_band_frames(noise)), drift(reference, log_band_frames(tone))
    assert replay < rest < noisy and rest < tonal
    assert min(noisy, tonal) > 2 * rest


def test_drift_reference_refuses_a_prompt_without_spread():
    with pytest.raises(ValueError, match="at least 2"):
        drift_reference(gaussian(1), k=5)
    with pytest.raises(ValueError, match="zero spread"):
        drift_reference(torch.ones(50, 16), k=5)
    with pytest.raises(ValueError, match="at least one frame"):
        drift(drift_reference(gaussian(10), k=5), gaussian(0))


def test_cosine_similarity_known_angles():
    # for this x, x·x / (|x| |x|) rounds to 1.0000000000000002: a cosine past its maximum
    x = gaussian(1, 32, seed=5).squeeze(0)
    assert x.norm() > 0 and (x @ x / (x.norm() * x.norm())).item() > 1.0
    assert cosine_similarity(x, x) == 1.0
    assert cosine_similarity(x, 3 * x) == pytest.approx(1.0, abs=1e-15)
    assert cosine_similarity(x, -x) == pytest.approx(-1.0, abs=1e-15)
    assert cosine_similarity(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])) == 0.0
    assert cosine_similarity(torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0])) == pytest.approx(math.sqrt(0.5))
    with pytest.raises(ValueError):
        cosine_similarity(x, torch.zeros_like(x))


@pytest.mark.parametrize("text, words", [
    ("Hello, World!", ["hello", "world"]),
    ("Don't STOP", ["don't", "stop"]),
    ("It\u2019s fine", ["it's", "fine"]),  # typographic apostrophe
    ("'Quoted' and the dogs' toys", ["quoted", "and", "the", "dogs", "toys"]),
    ("well-known fact\u2014yes", ["well", "known", "fact", "yes"]),
    ("  extra \t spaces\n here ", ["extra", "spaces", "here"]),
    ("\uff26\uff55\uff4c\uff4c width \ufb01ne", ["full", "width", "fine"]),  # NFKC: fullwidth, ligature
    ("U.S.A. costs $5", ["usa", "costs", "5"]),
    ("Café", ["café"]),
    ("... !", []),
    ("", []),
])
def test_normalize_words(text, words):
    assert normalize_words(text) == words


@pytest.mark.parametrize("hypothesis, reference, counts", [
    ("the cat sat", "the cat sat", (0, 0, 0)),
    ("the cat sat down", "the cat sat", (0, 0, 1)),  # an extra hypothesis word: insertion
    ("the cat sat", "the cat sat down", (0, 1, 0)),  # a reference word missing: deletion
    ("the dog sat", "the cat sat", (1, 0, 0)),
    # uno/one (S), "four" missing (D), "seven" extra (I), the other 4 match: the one 3-edit alignment
    ("uno two three five six seven", "one two three four five six", (1, 1, 1)),
    ("a cat sat on mat", "the cat sat on the mat", (1, 1, 0)),
    # a tie: 2 substitutions or 1 insertion + 1 deletion; the rule prefers substitutions
    ("a b", "b c", (2, 0, 0)),
    ("", "a b", (0, 2, 0)),
])
def test_word_errors_hand_counted(hypothesis, reference, counts):
    e = word_errors(hypothesis.split(), reference.split())
    assert (e.substitutions, e.deletions, e.insertions) == counts
    assert e.reference_words == len(reference.split()) and e.rate == sum(counts) / len(reference.split())


def levenshtein(a: tuple, b: tuple) -> int:
    @lru_cache(None)
    def d(i: int, j: int) -> int:
        if i == 0 or j == 0:
            return i + j
        return min(d(i - 1, j) + 1, d(i, j - 1) + 1, d(i - 1, j - 1) + (a[i - 1] != b[j - 1]))
    return d(len(a), len(b))


def test_word_errors_are_minimal_and_consistent_on_random_texts():
    rng = random.Random(0)
    for _ in range(200):
        hyp = [rng.choice("abcd") for _ in range(rng.randint(0, 9))]
        ref = [rng.choice("abcd") for _ in range(rng.randint(1, 9))]
        e = word_errors(hyp, ref)
        assert e.edits == levenshtein(tuple(hyp), tuple(ref))
        # any alignment: the hypothesis is the reference less its deletions plus the insertions
        assert len(hyp) == len(ref) - e.deletions + e.insertions
        assert word_errors(hyp, ref) == e  # deterministic


def test_word_errors_empty_reference():
    empty = word_errors(["uh"], [])
    assert empty.insertions == 1 and empty.edits == 1 and empty.rate is None


def test_auto_bleu_known_answers():
    # unigrams: each a/b recurs → 1; bigrams "a b"@0 recurs at 2 (no overlap), "b a"@1 nowhere else,
    # "a b"@2 recurs at 0 → 2/3; mean (1 + 2/3) / 2 = 5/6
    assert auto_bleu(["a", "b", "a", "b"]) == pytest.approx(5 / 6)
    # "a a"@0 and "a a"@1 overlap each other: not a repetition → bigrams 0, mean (1 + 0) / 2
    assert auto_bleu(["a", "a", "a"]) == pytest.approx(0.5)
    # one "the cat sat on the mat": only "the" recurs (2 of 6 unigrams), no bigram → (1/3 + 0) / 2
    assert auto_bleu("the cat sat on the mat".split()) == pytest.approx(1 / 6)
    assert auto_bleu(("the cat sat on the mat " * 5).split()) > 0.7
    varied = [f"w{i}" for i in range(30)]
    assert len(set(varied)) == 30 and auto_bleu(varied) == 0.0
    assert auto_bleu(["a", "b"]) is None and auto_bleu(["a", "b", "c"]) == 0.0
    assert auto_bleu(["a", "b", "a"], max_n=1) == pytest.approx(2 / 3)


def test_distinct_n():
    assert distinct_n("the cat sat on a mat".split(), 1) == 1.0
    assert distinct_n(["a", "a", "a", "a"], 1) == 0.25
    assert distinct_n(["a", "a", "a", "a"], 2) == pytest.approx(1 / 3)
    assert distinct_n(["a", "b", "a", "b"], 2) == pytest.approx(2 / 3)
    assert distinct_n([], 1) is None and distinct_n(["a"], 2) is None


def tone(frames: int, dbfs: float, rate: int = 24000, frame: int = 1920) -> torch.Tensor:
    """[frames * frame] sine of RMS `dbfs`; 500 Hz fits 40 whole periods in a 1920-sample frame at 24 kHz,
    so every frame's RMS is the tone's."""
    t = torch.arange(frames * frame, dtype=torch.float64) / rate
    return torch.sin(2 * math.pi * 500 * t) * math.sqrt(2) * 10 ** (dbfs / 20)


def test_silent_fraction():
    loud = tone(10, -20.0)
    assert 20 * math.log10(loud.square().mean().sqrt()) == pytest.approx(-20.0)
    assert silent_fraction(torch.zeros(10 * 1920), 1920, -50.0) == 1.0
    assert silent_fraction(loud, 1920, -50.0) == 0.0
    assert silent_fraction(torch.cat([torch.zeros(5 * 1920, dtype=torch.float64), loud[:5 * 1920]]), 1920, -50.0) == 0.5
    assert silent_fraction(loud, 1920, threshold_db=-19.9) == 1.0
    assert silent_fraction(loud, 1920, threshold_db=-20.1) == 0.0
    # a partial frame at the end is not counted
    assert silent_fraction(torch.cat([torch.zeros(2 * 1920, dtype=torch.float64), loud[:1000]]), 1920, -50.0) == 1.0
    assert silent_fraction(torch.zeros(1919), 1920, -50.0) is None


def test_token_fraction():
    tokens = torch.tensor([3, 0, 3, 5])
    assert token_fraction(tokens, [3]) == 0.5 and token_fraction(tokens, [3, 5]) == 0.75
    assert token_fraction(tokens, []) == 0.0
    assert token_fraction(torch.tensor([], dtype=torch.long), [3]) is None


def test_quantile_groups():
    """Each span goes to the quantile holding its centre: every span in exactly one, in order."""
    quarters = [0.25, 0.5, 0.75, 1.0]
    assert quantile_groups([(0, 25), (25, 50), (50, 75), (75, 100)], quarters) == [(0, 1), (1, 2), (2, 3), (3, 4)]
    assert quantile_groups([(0, 25), (25, 50), (50, 75)], quarters) == [(0, 1), (1, 2), (2, 2), (2, 3)]
    twenty = [(a, a + 375) for a in range(0, 7500, 375)]  # 10 min in 30 s spans: five per quarter
    assert quantile_groups(twenty, quarters) == [(0, 5), (5, 10), (10, 15), (15, 20)]
    assert quantile_groups([(0, 10), (10, 11)], [0.5, 1.0]) == [(0, 1), (1, 2)]  # a short last span
    assert quantile_groups([(0, 10)], [1.0]) == [(0, 1)] and quantile_groups([], quarters) == [(0, 0)] * 4


def test_spread():
    s = spread([1.0, None, 2.0, float("nan"), 3.0])
    assert s == {"mean": 2.0, "std": 1.0, "min": 1.0, "max": 3.0, "n": 3}
    assert spread([5.0]) == {"mean": 5.0, "std": 0.0, "min": 5.0, "max": 5.0, "n": 1}
    assert spread([2.0, 4.0])["std"] == pytest.approx(math.sqrt(2))  # n - 1: population std would be 1
    assert spread([None, float("nan")]) is None and spread([]) is None
