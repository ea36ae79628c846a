"""Content-addressed cache of Mimi codes: audio file bytes + codec identity → a code file."""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable

from .audio import encode_pcm, read_audio, silence_codes
from .codes import Recording, load_codes, save_codes


def file_digest(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# Part of the cache key beside the codec: bumped when what is cached for the same audio and codec
# changes. 2: the silence codes stored with each recording are the codec's steady state (`silence_codes`).
# 3: audio at another rate than the codec's is resampled aligned (`audio.resample`: without sphn's delay
# and padding), so its codes change.
CACHE_VERSION = 3


class CodecUnavailable(ValueError):
    """The codec cannot be built (a checkpoint file missing, not cached offline, ...): the model's fault,
    not the audio file's, so that a caller skipping bad files stops on it."""


class CodesCache:
    """`root/<codec>.v<CACHE_VERSION>/<sha[:2]>/<sha>.safetensors`; keyed by content, so renamed or
    copied files hit the cache and an edited file does not. `mimi_factory` builds the codec only on
    a cache miss."""

    def __init__(self, root: str | Path, codec_id: str, mimi_factory: Callable[[], object]):
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in codec_id)
        self.root = Path(root) / f"{safe}.v{CACHE_VERSION}"
        self.codec_id = codec_id
        self._factory = mimi_factory
        self._mimi = None
        self._silence = None
        self.hits = 0
        self.misses = 0

    @property
    def mimi(self):
        if self._mimi is None:
            try:
                self._mimi = self._factory()
            except (ValueError, OSError) as e:  # OSError: the hub's (offline: LocalEntryNotFoundError)
                raise CodecUnavailable(f"the codec {self.codec_id} cannot be loaded: {e}") from e
        return self._mimi

    def path_for(self, audio_path: str | Path) -> Path:
        digest = file_digest(audio_path)
        return self.root / digest[:2] / f"{digest}.safetensors"

    def get(self, audio_path: str | Path) -> Recording:
        """Codes of an audio file, encoded on a miss. Unreadable audio → ValueError naming the file."""
        cached = self.path_for(audio_path)
        if cached.is_file():
            self.hits += 1
            return load_codes(cached)
        self.misses += 1
        pcm = read_audio(audio_path, self.mimi.sample_rate)
        if self._silence is None:
            self._silence = silence_codes(self.mimi)
        recording = Recording(encode_pcm(self.mimi, pcm), silence=self._silence, codec=self.codec_id,
                              source=str(audio_path))
        save_codes(cached, recording)
        return recording
