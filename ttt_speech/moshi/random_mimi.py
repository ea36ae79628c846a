"""A seeded random-init Mimi whose codes carry the audio (docs/architecture.md §11).

moshi's `loaders.get_mimi(None)` leaves every quantizer codebook uninitialised (all-zero
centroids, `_initialized` = 0): every input, speech or silence, encodes to code 0 on every
codebook. Here each residual stage's codebook is set from the encoder's own latents on a fixed,
seeded synthetic signal (harmonic complexes with gliding pitch, noise bursts, chirps and silences
at levels from -50 to -6 dBFS), stage after stage as the residual quantizer sees them:

    centroid_k = x_{i_k} + JITTER · std(x) ⊙ z_k,   i_k ~ U{0..N-1},  z_k ~ N(0, I)

where x [N, D] are the stage's inputs (the residuals left by the stages before it) on the fit
signal. Centroids thus lie where the encoder's outputs lie, at their scale, and the jitter spreads
the 2048 entries around the N < 2048 samples so that nearby latents get different codes. Measured
on 5 s of LibriVox speech (`tests/test_audio_codes.py`): 30-38 distinct codes per codebook in 63
frames, speech and silence apart, two utterances apart. Deterministic by seed on one machine
(float32 on the CPU); `VERSION` is part of the codec id, so code caches of another fit are never
reused.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

VERSION = 2  # 1: moshi's uninitialised codebooks (every code 0)
FIT_SECONDS = 10.0
JITTER = 0.5  # centroid noise, in units of the stage inputs' per-dimension std


def fit_signal(sample_rate: int, seconds: float, seed: int) -> Tensor:
    """A deterministic speech-like test signal [S] in [-0.5, 0.5]: segments of 0.3-1.5 s."""
    rng = np.random.default_rng(seed)
    total = int(seconds * sample_rate)
    pieces, n = [], 0
    while n < total:
        length = int(rng.uniform(0.3, 1.5) * sample_rate)
        t = np.arange(length) / sample_rate
        kind = rng.integers(0, 4)
        if kind == 0:  # voiced: harmonics of a gliding f0 under one formant-like bump
            f0 = rng.uniform(80, 300) * (1 + 0.2 * np.sin(2 * np.pi * rng.uniform(0.5, 3) * t))
            phase = 2 * np.pi * np.cumsum(f0) / sample_rate
            formant = rng.uniform(300, 3000)
            x = sum(np.sin(k * phase) / k * np.exp(-((k * f0.mean() - formant) / 1500) ** 2) for k in range(1, 30))
        elif kind == 1:  # unvoiced: noise
            x = rng.standard_normal(length)
        elif kind == 2:  # pause
            x = np.zeros(length)
        else:  # chirp
            f_start, f_end = rng.uniform(50, 6000, size=2)
            x = np.sin(2 * np.pi * np.cumsum(np.linspace(f_start, f_end, length)) / sample_rate)
        level = 10 ** rng.uniform(-2.5, -0.3)
        pieces.append(x / (np.abs(x).max() + 1e-9) * level * np.hanning(length) ** 0.2)
        n += length
    return torch.tensor(np.concatenate(pieces)[:total], dtype=torch.float32)


@torch.no_grad()
def initialise_codebooks(mimi, seed: int) -> None:
    """Set the active codebooks of a random-init Mimi (on the CPU) from its latents on `fit_signal`."""
    from .internals import fit_mimi_codebooks  # here: `VERSION` (a codec id) must not import moshi

    signal = fit_signal(mimi.sample_rate, FIT_SECONDS, seed)
    latent = mimi.encode_to_latent(signal[None, None], quantize=False)  # [1, C, N]
    gen = torch.Generator().manual_seed(seed)
    fit_mimi_codebooks(mimi, latent, lambda x, bins: jittered_samples(x, bins, gen))


def jittered_samples(x: Tensor, bins: int, gen: torch.Generator) -> Tensor:
    """`bins` centroids [bins, D] from stage inputs x [N, D]: sampled rows of x plus JITTER·std(x) noise."""
    picks = torch.randint(0, x.shape[0], (bins,), generator=gen)
    noise = torch.randn(bins, x.shape[1], generator=gen)
    return x[picks] + JITTER * x.std(0) * noise
