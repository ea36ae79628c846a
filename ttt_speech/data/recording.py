"""One file of a manifest or a book → its `Recording`, the same way for training and evaluation.

A code file is read as stored. An audio file goes through the content-addressed codes cache, and
gets the text stream of its word-timed transcript when one lies next to it (`transcript.py`);
otherwise its text stream stays padding.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from .cache import CodesCache
from .codes import Recording, load_codes
from .manifest import CODE_SUFFIX
from .transcript import transcript_text


def load_recording(path: str | Path, cache: CodesCache, lm, tokenizer: Callable[[], object | None]) -> Recording:
    """`tokenizer()` gives the SentencePiece processor of `lm`'s text stream; it is called only for a
    file that has a transcript (so loading it, e.g. from the hub, happens once and only if needed)."""
    path = Path(path)
    if path.suffix == CODE_SUFFIX:
        return load_codes(path)
    recording = cache.get(path)
    text = transcript_text(path, recording.num_frames, lm, tokenizer)
    if text is not None:
        recording.text = text
    return recording
