"""The seeded random Mimi's codes carry the audio (it used to encode every sound as code 0).

On 5 s of real LibriVox speech (Debian's pocketsphinx-testdata; skipped without it) and on
generated signals: many distinct codes per codebook, speech apart from silence, one utterance
apart from another, the same codes for the same seed, other codes for another seed.
"""
import numpy as np
import pytest
import torch

from ttt_speech.data.audio import encode_pcm, read_audio, silence_codes
from ttt_speech.models import ModelConfig, load_mimi
from ttt_speech.moshi.random_mimi import VERSION, fit_signal
from ttt_speech_apps.eval import fixture

UTTERANCE = "sense_and_sensibility_01_austen_64kb-{}.wav"


@pytest.fixture(scope="module")
def mimi():
    return load_mimi(ModelConfig(device="cpu"))


def speech(name: str, seconds: float, mimi) -> torch.Tensor:
    path = fixture.SOURCE / UTTERANCE.format(name)
    if not path.is_file():
        pytest.skip("pocketsphinx-testdata is not installed (apt-get install -y pocketsphinx-testdata)")
    return read_audio(path, mimi.sample_rate)[:, :int(seconds * mimi.sample_rate)]


def distinct(codes: torch.Tensor) -> list[int]:
    return [len(row.unique()) for row in codes]


def test_speech_codes_use_many_values_and_differ_from_silence_and_other_speech(mimi):
    first = encode_pcm(mimi, speech("0870", 5.0, mimi))  # [8, 63]
    assert first.shape == (8, 63)
    assert min(distinct(first)) >= 20, distinct(first)  # measured 30-38 (code 0 everywhere before)
    quiet = encode_pcm(mimi, torch.zeros(1, 5 * mimi.sample_rate))
    assert (first != quiet).float().mean() > 0.8
    # past the encoder's warm-up, silence is one semantic code (deeper residual stages still drift)
    assert (quiet[0, 25:] == silence_codes(mimi)[0]).all()
    other = encode_pcm(mimi, speech("0880", 3.0, mimi))
    assert (first[:, :other.shape[1]] != other).float().mean() > 0.8


def test_the_fit_is_seeded_and_the_codec_id_names_it(mimi):
    signal = torch.from_numpy(np.random.default_rng(0).standard_normal((1, 2 * mimi.sample_rate)).astype(np.float32))
    codes = encode_pcm(mimi, 0.1 * signal)
    assert min(distinct(codes)) > 1
    assert torch.equal(codes, encode_pcm(load_mimi(ModelConfig(device="cpu")), 0.1 * signal))
    assert not torch.equal(codes, encode_pcm(load_mimi(ModelConfig(device="cpu", seed=1)), 0.1 * signal))
    # caches of codes written by another fit (v1: every code 0) are never reused
    assert ModelConfig().codec_id() == f"mimi-random-v{VERSION}-seed0" and VERSION >= 2
    assert ModelConfig(seed=1).codec_id() != ModelConfig().codec_id()


def test_fit_signal_is_deterministic_and_not_silent():
    a, b = fit_signal(24000, 2.0, seed=3), fit_signal(24000, 2.0, seed=3)
    assert torch.equal(a, b) and a.shape == (48000,) and a.abs().max() > 1e-3
    assert not torch.equal(a, fit_signal(24000, 2.0, seed=4))
