"""Code files: the Mimi codes of one recording, stored as safetensors.

A code file holds `codes` int16 [K, T] (K = 8: Moshi's own stream, mono; K = 16: Moshi's stream
then the user's, stereo), optionally `text` int32 [T] (text tokens aligned to frames) and
`silence` int16 [8] (the codec's per-codebook code of silence, used for a missing user stream).
Metadata records the codec, so codes of another codec are never mixed in silently.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import safe_open
from torch import Tensor

from ..files import read_tensors, save_tensors_atomic
from . import FRAME_RATE

FORMAT = "ttt-speech-codes"
VERSION = "1"


@dataclass
class Recording:
    """The codes of one recording. codes [K, T] (int64), text [T] or None, silence [8] or None."""

    codes: Tensor
    text: Tensor | None = None
    silence: Tensor | None = None
    codec: str = ""
    source: str = ""

    @property
    def num_frames(self) -> int:
        return self.codes.shape[1]

    @property
    def duration(self) -> float:
        return self.num_frames / FRAME_RATE


def save_codes(path: str | Path, recording: Recording) -> Path:
    """Write a code file atomically (temp file + rename)."""
    path = Path(path)
    codes = recording.codes
    if codes.dim() != 2 or codes.shape[0] not in (8, 16):
        raise ValueError(f"{path}: codes must be [8 or 16, T], got {tuple(codes.shape)}")
    if codes.numel() and (codes.min() < 0 or codes.max() > torch.iinfo(torch.int16).max):
        raise ValueError(f"{path}: codes out of the int16 range")
    tensors = {"codes": codes.to(torch.int16).contiguous()}
    if recording.text is not None:
        if recording.text.shape != (codes.shape[1],):
            raise ValueError(f"{path}: text must be [T={codes.shape[1]}], got {tuple(recording.text.shape)}")
        tensors["text"] = recording.text.to(torch.int32).contiguous()
    if recording.silence is not None:
        tensors["silence"] = recording.silence.to(torch.int16).reshape(8).contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_tensors_atomic(path, tensors, metadata={"format": FORMAT, "version": VERSION,
                                                 "codec": recording.codec, "source": recording.source})
    return path


def load_codes(path: str | Path) -> Recording:
    """Read a code file written by `save_codes` (clear error for anything else)."""
    path = Path(path)
    tensors, meta = read_tensors(path, "code file")
    if meta.get("format") != FORMAT or "codes" not in tensors:
        raise ValueError(f"{path}: not a ttt-speech code file (expected metadata format={FORMAT!r} and a 'codes' tensor)")
    codes = tensors["codes"].long()
    if codes.dim() != 2 or codes.shape[0] not in (8, 16):
        raise ValueError(f"{path}: codes must be [8 or 16, T], got {tuple(codes.shape)}")
    text = tensors["text"].long() if "text" in tensors else None
    silence = tensors["silence"].long() if "silence" in tensors else None
    return Recording(codes, text, silence, meta.get("codec", ""), meta.get("source", ""))


def num_frames(path: str | Path) -> int:
    """Frames in a code file, read from its header only."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.get_slice("codes").get_shape()[1]
    except (OSError, SafetensorError) as e:
        raise ValueError(f"{path}: not a readable code file ({e})") from None
