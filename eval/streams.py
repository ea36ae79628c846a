"""The "load streams" stage of an evaluation: LibriLight books or manifest entries (`books.py`) as
Mimi codes (cached per codec) laid out for the model, with every file or book left out counted."""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field

from ttt_speech.data import FRAME_RATE
from ttt_speech.data.cache import CodesCache
from ttt_speech.models import ModelConfig, load_mimi, load_text_tokenizer

from .books import BookLeftOut, Skipped, Stream, find_books, load_stream
from .config import DataConfig

logger = logging.getLogger(__name__)


@dataclass
class LoadedData:
    """The streams of an evaluation and what was left out on the way (each with its reason)."""

    streams: list[Stream]
    skipped_files: list[Skipped] = field(default_factory=list)
    left_out_books: list[Skipped] = field(default_factory=list)
    cache: dict = field(default_factory=dict)

    @property
    def constant_streams(self) -> list[str]:
        """Ids of the streams with a constant audio codebook (a codec that carries no information)."""
        return [s.book.id for s in self.streams if min(s.distinct_codes) <= 1]

    def to_dict(self) -> dict:
        distinct = [n for s in self.streams for n in s.distinct_codes]
        return {
            "streams": [{"id": s.book.id, "frames": s.frames, "minutes": s.frames / FRAME_RATE / 60,
                         "files_used": len(s.file_starts), "file_starts": s.file_starts,
                         "distinct_codes": s.distinct_codes, "book": s.book.to_dict()}
                        for s in self.streams],
            "skipped_files": [s.to_dict() for s in self.skipped_files],
            "left_out_books": [s.to_dict() for s in self.left_out_books],
            "counts": {"streams": len(self.streams), "frames": sum(s.frames for s in self.streams),
                       "files_skipped": len(self.skipped_files), "books_left_out": len(self.left_out_books)},
            # distinct codes per audio codebook, min and max over streams and codebooks
            "codes": {"distinct_min": min(distinct), "distinct_max": max(distinct),
                      "constant_streams": self.constant_streams},
            "cache": self.cache,
        }


def load_data(config: DataConfig, lm, model_config: ModelConfig, progress: bool = True) -> LoadedData:
    """Find the books / manifest entries of `config`, encode (or read cached) codes with `model_config`'s
    codec, lay them out for `lm` (Moshi's streams: the layout needs a model)."""
    from ttt_speech.progress import progress_bar

    found = find_books(config)
    device = model_config.torch_device()
    cache = CodesCache(config.codes_cache, model_config.codec_id(), lambda: load_mimi(model_config, device))
    tokenizer = functools.cache(lambda: load_text_tokenizer(model_config))  # only for files with a transcript
    data = LoadedData([], list(found.skipped_files), list(found.filtered_books))
    with progress_bar(found.books, desc="loading streams", unit="book", enabled=progress) as bar:
        for book in bar:
            try:
                stream = load_stream(book, lm, cache, config.max_frames,
                                     progress=lambda name: bar.set_postfix_str(name[-40:], refresh=False),
                                     tokenizer=tokenizer)
            except BookLeftOut as e:
                logger.warning("leaving out %s", e)
                data.skipped_files.extend(e.skipped_files)
                data.left_out_books.append(Skipped(book.id, e.reason))
                continue
            data.skipped_files.extend(stream.skipped_files)
            if stream.frames < config.min_frames:
                data.left_out_books.append(Skipped(book.id, f"{stream.frames} frames < min_frames {config.min_frames}"))
            else:
                data.streams.append(stream)
    data.cache = {"codec": cache.codec_id, "hits": cache.hits, "misses": cache.misses, "root": str(cache.root)}
    if not data.streams:
        raise ValueError("data: no stream left to evaluate (" + "; ".join(
            f"{s.path}: {s.reason}" for s in (data.left_out_books + data.skipped_files)[:5]) + ")")
    if data.constant_streams:
        logger.warning("%d stream(s) have a constant audio codebook (e.g. %s): the codec carries no information, "
                       "their audio NLL measures nothing", len(data.constant_streams), data.constant_streams[0])
    return data
