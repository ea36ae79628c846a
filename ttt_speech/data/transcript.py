"""Word-timed transcripts (moshi-finetune's `<audio>.json`) → Moshi's text stream, one token per frame.

The file next to an audio file (same name, `.json`) holds `{"alignments": [[word, [start, end],
speaker], ...]}` (seconds; moshi-finetune's `annotate.py` writes it with Whisper, speaker
"SPEAKER_MAIN" for Moshi's own channel). Moshi's text stream is *inner monologue*: each word's
tokens are written one per frame from the frame in which the word starts; the frame just before
a word holds the end-of-padding token when it would otherwise be padding; every other frame is
padding. A word that starts while the previous one is still being written cuts off the rest of the
previous one (the convention Moshi was trained with). Only the main speaker's words are used
(the text stream is Moshi's own), and words without a positive duration are dropped.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import Tensor

from ..files import read_json
from . import FRAME_RATE

MAIN_SPEAKER = "SPEAKER_MAIN"


class TokenizerMissing(ValueError):
    """A transcript needs a tokenizer the model config does not give: a config error, not a bad file."""


@dataclass(frozen=True)
class Word:
    text: str
    start: float  # seconds
    end: float
    speaker: str = MAIN_SPEAKER


def transcript_path(audio_path: str | Path) -> Path:
    return Path(audio_path).with_suffix(".json")


def read_alignments(path: str | Path) -> list[Word] | None:
    """The words of a transcript file; None when there is no file or it holds no "alignments" (e.g.
    LibriLight's per-file metadata json). A malformed entry is a ValueError naming file and entry."""
    data = read_json(path, "a readable transcript", missing_ok=True)
    if data is None or "alignments" not in data:
        return None
    words = []
    for i, entry in enumerate(data["alignments"]):
        try:
            text, (start, end), *rest = entry
            words.append(Word(str(text), float(start), float(end), str(rest[0]) if rest else MAIN_SPEAKER))
        except (TypeError, ValueError):
            raise ValueError(f"{path}: alignments[{i}]: expected [word, [start, end], speaker], got {entry!r}") from None
    return words


def text_stream(words: Sequence[Word], frames: int, tokenize: Callable[[str], list[int]], padding_id: int,
                end_of_padding_id: int, speaker: str = MAIN_SPEAKER, frame_rate: float = FRAME_RATE) -> Tensor:
    """The text stream [frames] (int64) of `words` (see the module docstring for the layout)."""
    kept = sorted((w for w in words if w.speaker == speaker and w.end > w.start), key=lambda w: w.start)
    stream = [padding_id] * frames
    pending: deque[int] = deque()
    i = 0
    for t in range(frames):
        while i < len(kept) and kept[i].start * frame_rate < t + 1:  # words starting by the end of frame t
            pending = deque(tokenize(kept[i].text.strip()))
            i += 1
        if pending:
            if t > 0 and stream[t - 1] == padding_id:
                stream[t - 1] = end_of_padding_id
            stream[t] = pending.popleft()
    return torch.tensor(stream, dtype=torch.long)


def spm_tokenizer(processor) -> Callable[[str], list[int]]:
    """A SentencePiece processor as a word → token ids function."""
    return lambda word: list(processor.encode(word))


def transcript_text(audio_path: str | Path, frames: int, lm, tokenizer: Callable[[], object | None]) -> Tensor | None:
    """The text stream [frames] of the transcript next to `audio_path` for Moshi model `lm`, or None
    when there is none. `tokenizer()` gives the SentencePiece processor (called only when needed)."""
    path = transcript_path(audio_path)
    words = read_alignments(path)
    if words is None:
        return None
    processor = tokenizer()
    if processor is None:
        raise TokenizerMissing(f"{path}: a word-timed transcript needs a text tokenizer; set model.text_tokenizer "
                         "(a SentencePiece .model; the tiny model has none)")
    return text_stream(words, frames, spm_tokenizer(processor), lm.text_padding_token_id, lm.end_of_text_padding_id)
