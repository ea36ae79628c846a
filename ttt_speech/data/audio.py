"""Audio files → Mimi codes: reading (sphn: wav/flac/ogg/mp3), resampling, chunked encoding; wav writing."""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..files import require_file

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3", ".opus")
SILENCE_SECONDS = 4.0


def read_audio(path: str | Path, sample_rate: int) -> Tensor:
    """pcm [C, S] float32 at `sample_rate` (C = 1 or 2). Anything that cannot be decoded cleanly
    (unreadable, empty, more than 2 channels, NaN / inf samples) → ValueError naming the file.

    Decoded at the file's own rate, checked, then resampled: sphn's resampler panics on non-finite
    samples (a Rust panic: a `BaseException` and a backtrace on stderr), so it never sees them."""
    import sphn

    path = require_file(path, "an audio file")
    pcm, rate = _guarded(path, "cannot decode audio", lambda: sphn.read(str(path)))
    pcm = np.asarray(pcm, dtype=np.float32)
    if pcm.ndim == 1:
        pcm = pcm[None]
    if pcm.shape[-1] == 0:
        raise ValueError(f"{path}: empty audio")
    if pcm.shape[0] > 2:
        raise ValueError(f"{path}: {pcm.shape[0]} channels; expected mono or stereo")
    bad = ~np.isfinite(pcm)
    if bad.any():
        first = int(np.argmax(bad.any(axis=0)))
        raise ValueError(f"{path}: audio contains {int(bad.sum())} NaN or inf sample(s) (first at "
                         f"{first / rate:.3f} s)")
    if rate != sample_rate:
        pcm = _guarded(path, f"cannot resample audio from {rate} Hz", lambda: resample(pcm, rate, sample_rate))
    return torch.from_numpy(np.ascontiguousarray(pcm, dtype=np.float32))


SPHN_CHUNK = 1024  # input samples per chunk of sphn's resampler


def resample(pcm: np.ndarray, rate: int, sample_rate: int) -> np.ndarray:
    """pcm [C, S] float32 at `rate` → [C, round(S · sample_rate / rate)] at `sample_rate`, aligned
    with the input. sphn's resampler works in chunks of 1024 input samples, delays its output by
    about half a chunk (32 ms from 16 to 24 kHz) and pads it to whole chunks: as it is, every
    resampled recording would start late and end with up to a frame of made-up silence, and a
    word-timed transcript would be off by the delay. The input is padded with two chunks of zeros
    (the delayed tail comes out) and the output cut from the measured delay on."""
    import sphn

    delay = _resampler_delay(rate, sample_rate)
    padded = np.concatenate([pcm, np.zeros((pcm.shape[0], 2 * SPHN_CHUNK), np.float32)], axis=1)
    out = np.asarray(sphn.resample(padded, src_sample_rate=rate, dst_sample_rate=sample_rate))
    return out[:, delay:delay + round(pcm.shape[1] * sample_rate / rate)]


@functools.lru_cache(maxsize=None)
def _resampler_delay(rate: int, sample_rate: int) -> int:
    """sphn's resampler's delay from `rate` to `sample_rate`, in output samples: where an impulse
    comes out, less where it should (the median over three positions, to the nearest sample)."""
    import sphn

    positions = (3 * SPHN_CHUNK, 3 * SPHN_CHUNK + 333, 4 * SPHN_CHUNK + 517)
    pcm = np.zeros((len(positions), 8 * SPHN_CHUNK), np.float32)
    for i, p in enumerate(positions):
        pcm[i, p] = 1.0
    out = np.asarray(sphn.resample(pcm, src_sample_rate=rate, dst_sample_rate=sample_rate))
    return round(float(np.median([np.argmax(out[i]) - p * sample_rate / rate for i, p in enumerate(positions)])))


def write_wav(path: str | Path, pcm: Tensor, sample_rate: int) -> None:
    """pcm [S] (or [C, S]) as a wav file, written atomically (a temporary name, then a rename)."""
    import os
    import tempfile

    import sphn

    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".wav")
    os.close(fd)
    try:
        sphn.write_wav(tmp, torch.as_tensor(pcm).float().numpy(), sample_rate)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _guarded(path: Path, what: str, call):
    """`call()`, any failure of the decoder (a Rust panic included) → ValueError naming `path`."""
    try:
        return call()
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # sphn raises pyo3's PanicException (a BaseException) on a Rust panic
        raise ValueError(f"{path}: {what} ({str(e).strip() or type(e).__name__})") from None


@torch.no_grad()
def encode_pcm(mimi, pcm: Tensor, chunk_frames: int = 250) -> Tensor:
    """pcm [C, S] at mimi.sample_rate → codes [C·8, T], T = ceil(S / frame_size).

    Encoded in streaming chunks of `chunk_frames` frames so a 30-minute book needs the memory of
    a few seconds of audio; the tail is zero-padded to a whole frame.
    """
    device = next(mimi.parameters()).device
    frame = mimi.frame_size
    total = -(-pcm.shape[-1] // frame)
    pcm = torch.nn.functional.pad(pcm, (0, total * frame - pcm.shape[-1]))
    out = []
    with mimi.streaming(pcm.shape[0]):
        for start in range(0, total * frame, chunk_frames * frame):
            piece = pcm[:, None, start:start + chunk_frames * frame].to(device)
            out.append(mimi.encode(piece).cpu())
    codes = torch.cat(out, dim=-1)  # [C, 8, T]
    return codes.reshape(-1, codes.shape[-1])


@torch.no_grad()
def silence_codes(mimi) -> Tensor:
    """The codec's code of silence, per codebook [8]: the most frequent code over the second half
    of 4 s of zeros (the first frames are the encoder's warm-up, not its steady state)."""
    pcm = torch.zeros(1, int(SILENCE_SECONDS * mimi.sample_rate))
    codes = encode_pcm(mimi, pcm)
    return codes[:, codes.shape[-1] // 2:].mode(dim=-1).values
