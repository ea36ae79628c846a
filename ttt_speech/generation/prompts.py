"""Prompts: an audio file (encoded with Mimi) or a code file → Moshi's streams [K, T]."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from torch import Tensor

from ..data.audio import AUDIO_SUFFIXES, encode_pcm, read_audio
from ..data.codes import Recording, load_codes
from ..data.layout import moshi_streams
from ..files import require_file

CODE_SUFFIXES = (".safetensors",)
PROMPT = "a prompt (audio file or code file)"  # what a prompt path must be, for the errors


def load_prompt(path: str | Path, mimi=None, codec: str = "") -> Recording:
    """A prompt file as a `Recording`: audio (wav/flac/ogg/mp3/opus; mono → Moshi's stream,
    stereo → Moshi's stream + the user's) encoded with `mimi`, or a code file as written by
    `ttt_speech.data.codes.save_codes`."""
    path = require_file(path, PROMPT)
    suffix = path.suffix.lower()
    if suffix in CODE_SUFFIXES:  # named by this file in errors, not by where its codes came from
        return dataclasses.replace(load_codes(path), source=str(path))
    if suffix in AUDIO_SUFFIXES:
        if mimi is None:
            raise ValueError(f"{path}: an audio prompt needs the Mimi codec (drop --no-audio)")
        pcm = read_audio(path, mimi.sample_rate)
        return Recording(encode_pcm(mimi, pcm), codec=codec, source=str(path))
    raise ValueError(f"{path}: unknown prompt type {suffix!r}; expected audio ({', '.join(AUDIO_SUFFIXES)}) "
                     f"or a code file (.safetensors)")


def prompt_streams(lm, recording: Recording, silence: Tensor | None = None) -> Tensor:
    """Recording → streams [lm.num_codebooks, T] (text: transcript or padding; user: silence when mono)."""
    if recording.codes.shape[0] == 8 and recording.silence is None:
        if silence is None:
            raise ValueError(f"{recording.source or 'prompt'}: mono codes need the codec's silence codes")
        recording = dataclasses.replace(recording, silence=silence)
    return moshi_streams(lm, recording, where=recording.source or "prompt")
