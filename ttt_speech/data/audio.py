"""Audio files → Mimi codes: reading (sphn: wav/flac/ogg/mp3), resampling, chunked encoding."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3", ".opus")
SILENCE_SECONDS = 2.0


def read_audio(path: str | Path, sample_rate: int) -> Tensor:
    """pcm [C, S] float32 at `sample_rate` (C = 1 or 2). Unreadable or empty → ValueError."""
    import sphn

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: audio file not found")
    try:
        pcm, _ = sphn.read(str(path), sample_rate=sample_rate)
    except (ValueError, OSError, RuntimeError) as e:
        raise ValueError(f"{path}: cannot decode audio ({str(e).strip()})") from None
    pcm = np.asarray(pcm, dtype=np.float32)
    if pcm.ndim == 1:
        pcm = pcm[None]
    if pcm.shape[-1] == 0:
        raise ValueError(f"{path}: empty audio")
    if pcm.shape[0] > 2:
        raise ValueError(f"{path}: {pcm.shape[0]} channels; expected mono or stereo")
    if not np.isfinite(pcm).all():
        raise ValueError(f"{path}: audio contains NaN or inf samples")
    return torch.from_numpy(pcm)


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
    """The codec's code of silence, per codebook [8]: the most frequent code over 2 s of zeros."""
    pcm = torch.zeros(1, int(SILENCE_SECONDS * mimi.sample_rate))
    codes = encode_pcm(mimi, pcm)
    return codes.mode(dim=-1).values
