"""Evaluation streams: LibriLight books (chapters concatenated in order) or manifest entries.

LibriLight layout (facebookresearch/libri-light): `<root>/<split>/<speaker>/<book>/<file>.flac`
with one `<file>.json` per audio file: {"speaker", "book_meta": {..., "genre": [...],
"Dramatic Readings": bool, "meta_genre": str}, "snr": float, "voice_activity": [[on, off], ...]}.
A book's files are its chapters; sorted in natural order ("2_x" before "10_x") they are
concatenated, as Mimi codes, into one long stream. Unreadable, corrupt, empty, truncated and
non-finite (NaN / inf samples) files are skipped with a warning and counted; a book that gives no
stream (no readable file, or mono and stereo files mixed) is left out and counted (`BookLeftOut`):
nothing is dropped silently.
"""
from __future__ import annotations

import functools
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from ttt_speech.files import read_json
from ttt_speech.data import FRAME_RATE
from ttt_speech.data.audio import AUDIO_SUFFIXES
from ttt_speech.data.cache import CodecUnavailable, CodesCache
from ttt_speech.data.codes import Recording
from ttt_speech.data.layout import moshi_streams
from ttt_speech.data.recording import load_recording
from ttt_speech.data.transcript import TokenizerMissing

from .config import DataConfig

logger = logging.getLogger(__name__)


@dataclass
class Skipped:
    """A file or book left out, and why."""

    path: str
    reason: str

    def to_dict(self) -> dict[str, str]:
        return {"path": self.path, "reason": self.reason}


@dataclass
class Book:
    """One evaluation stream's sources: a LibriLight book (files = chapters in order) or a manifest entry."""

    id: str  # "<split>/<speaker>/<book>" or the manifest path
    files: list[Path]
    seconds: float | None  # readable audio, from the file headers (None: code files / unknown)
    durations: list[float | None] = field(default_factory=list)  # per file, from its header (None: unknown)
    snr: float | None = None
    genres: list[str] = field(default_factory=list)
    dramatic: bool | None = None
    title: str | None = None

    def to_dict(self) -> dict:
        return {"id": self.id, "files": len(self.files), "seconds": self.seconds, "snr": self.snr,
                "genres": self.genres, "dramatic": self.dramatic, "title": self.title}


@dataclass
class Stream:
    """A loaded stream: codes [K, T] in Moshi's layout, and where its files start (frames)."""

    book: Book
    codes: Tensor
    file_starts: list[int]
    skipped_files: list[Skipped]
    # distinct codes in each of Moshi's 8 audio codebooks (the codec's output, before the layout):
    # 1 = a constant codebook, which carries nothing about the audio
    distinct_codes: list[int]

    @property
    def frames(self) -> int:
        return self.codes.shape[1]


class BookLeftOut(ValueError):
    """A book that gives no stream: `reason` says why, `skipped_files` lists the files skipped on the way
    (they are counted like those of the books that load)."""

    def __init__(self, book: Book, reason: str, skipped_files: list[Skipped]):
        super().__init__(f"{book.id}: {reason}")
        self.reason = reason
        self.skipped_files = skipped_files


@dataclass
class Discovery:
    books: list[Book]
    skipped_files: list[Skipped]
    filtered_books: list[Skipped]


def natural_key(name: str) -> list:
    """Sort key putting "ch2" before "ch10" (LibriVox chapter numbers are not zero-padded everywhere)."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def _audio_seconds(path: Path) -> float:
    """Duration from the file header; corrupt or empty files raise ValueError."""
    import soundfile

    if path.stat().st_size == 0:
        raise ValueError("empty file (0 bytes)")
    try:
        info = soundfile.info(str(path))
    except (RuntimeError, soundfile.LibsndfileError) as e:  # libsndfile's "Format not recognised", ...
        raise ValueError(f"unreadable audio ({str(e).strip().splitlines()[-1]})") from None
    if info.frames <= 0:
        raise ValueError("empty audio (0 samples)")
    return info.frames / info.samplerate


def _read_meta(path: Path) -> dict | None:
    """The LibriLight .json next to an audio file (None when there is none)."""
    return read_json(path.with_suffix(".json"), "LibriLight metadata", missing_ok=True)


def _book_genres(meta: dict) -> list[str]:
    book = meta.get("book_meta") or {}
    genres = book.get("genre") or []
    genres = [genres] if isinstance(genres, str) else [g for g in genres if isinstance(g, str)]
    if isinstance(book.get("meta_genre"), str):
        genres.append(book["meta_genre"])
    return genres


def _filter_reason(book: Book, n_files: int, metas: list[dict], config: DataConfig) -> str | None:
    """Why `book` is filtered out by the config, or None when it is kept."""
    if n_files < config.min_files:
        return f"{n_files} readable file(s) < min_files {config.min_files}"
    if (book.seconds or 0.0) < config.min_duration:
        return f"{book.seconds:.1f} s of readable audio < min_duration {config.min_duration:g} s"
    if config.min_snr is not None:
        if book.snr is None:
            return "no 'snr' in its metadata (min_snr is set)"
        if book.snr < config.min_snr:
            return f"SNR {book.snr:.2f} < min_snr {config.min_snr:g}"
    wanted = {g.lower() for g in config.genres}
    have = {g.lower() for g in book.genres}
    if wanted and not wanted & have:
        return f"genres {book.genres or 'unknown'} match none of {config.genres}"
    banned = have & {g.lower() for g in config.exclude_genres}
    if banned:
        return f"excluded genre(s) {sorted(banned)}"
    if config.exclude_dramatic and book.dramatic:
        return "a dramatic reading (exclude_dramatic)"
    return None


def discover_books(config: DataConfig) -> Discovery:
    """Find and filter the books of a LibriLight tree (`config.root`, `config.splits`)."""
    root = config.root
    if root is None or not Path(root).is_dir():
        raise ValueError(f"data.root: {root} is not a folder")
    root = Path(root)
    splits = config.splits or sorted(p.name for p in root.iterdir() if p.is_dir())
    for split in splits:
        if not (root / split).is_dir():
            raise ValueError(f"data.splits: {root / split} is not a folder")
    books, skipped, filtered = [], [], []
    for split in splits:
        for book_dir in sorted(p for p in (root / split).glob("*/*") if p.is_dir()):
            files = sorted((p for p in book_dir.iterdir() if p.suffix.lower() in AUDIO_SUFFIXES),
                           key=lambda p: natural_key(p.name))
            if not files:
                continue
            book_id = f"{split}/{book_dir.parent.name}/{book_dir.name}"
            readable, durations, seconds, metas, snr_weighted, snr_seconds = [], [], 0.0, [], 0.0, 0.0
            for path in files:
                try:
                    duration = _audio_seconds(path)
                    meta = _read_meta(path)
                except (ValueError, OSError) as e:
                    logger.warning("skipping %s: %s", path, e)
                    skipped.append(Skipped(str(path), str(e)))
                    continue
                readable.append(path)
                durations.append(duration)
                seconds += duration
                if meta is not None:
                    metas.append(meta)
                    if isinstance(meta.get("snr"), (int, float)):
                        snr_weighted += float(meta["snr"]) * duration
                        snr_seconds += duration
            first = metas[0] if metas else {}
            book_meta = first.get("book_meta") or {}
            book = Book(book_id, readable, seconds, durations,
                        snr=snr_weighted / snr_seconds if snr_seconds else None,
                        genres=_book_genres(first),
                        dramatic=book_meta.get("Dramatic Readings") if metas else None,
                        title=book_meta.get("title"))
            reason = _filter_reason(book, len(readable), metas, config)
            if reason is not None:
                filtered.append(Skipped(book_id, reason))
            else:
                books.append(book)
    if not books and not filtered:
        raise ValueError(f"data.root: no books under {root} (expected <root>/<split>/<speaker>/<book>/*.flac, "
                         f"splits {splits})")
    return Discovery(books, skipped, filtered)


def manifest_books(config: DataConfig) -> Discovery:
    """One stream per entry of a JSONL manifest (audio or code files)."""
    from ttt_speech.data.manifest import read_manifest

    entries = read_manifest(config.manifest, field="data.manifest")
    # no truncation check for manifest entries: their declared durations may be approximate
    books = [Book(str(e.path), [e.path], e.duration) for e in entries]
    return Discovery(books, [], [])


def find_books(config: DataConfig) -> Discovery:
    """The streams the config selects (LibriLight tree or manifest), capped at max_books."""
    if config.manifest is not None:
        found = manifest_books(config)
    elif config.root is not None:
        found = discover_books(config)
    else:
        raise ValueError("data: set root (a LibriLight tree) or manifest")
    found.books.sort(key=lambda b: natural_key(b.id))
    if config.max_books is not None and len(found.books) > config.max_books:
        for book in found.books[config.max_books:]:
            found.filtered_books.append(Skipped(book.id, f"beyond max_books {config.max_books}"))
        found.books = found.books[:config.max_books]
    return found


def load_stream(book: Book, lm, cache: CodesCache, max_frames: int,
                progress: Callable[[str], None] | None = None,
                tokenizer: Callable[[], object | None] = lambda: None) -> Stream:
    """Codes of a book's files, concatenated in order up to `max_frames`, laid out for `lm`.

    Files past `max_frames` are not encoded. Files that fail to decode are skipped (warning) and
    listed in `Stream.skipped_files`. `BookLeftOut` when no file could be read, or when the files
    mix mono and stereo (Moshi's user stream would switch between the right channel and silence).
    A file with a word-timed transcript next to it gives its text stream (`tokenizer()` → the
    SentencePiece processor), as in training; the stream's text is padding unless every file used
    has one.
    """
    pieces, starts, skipped, silence, total = [], [], [], None, 0
    durations = book.durations or [None] * len(book.files)
    for path, declared in zip(book.files, durations):
        if total >= max_frames:
            break
        if progress is not None:
            progress(path.name)
        try:
            recording = load_recording(path, cache, lm, tokenizer)
        except (TokenizerMissing, CodecUnavailable):
            raise  # the config lacks a tokenizer, or its codec cannot be loaded: not a bad file to skip
        except (ValueError, OSError) as e:
            reason = str(e).removeprefix(f"{path}: ")
            logger.warning("skipping %s: %s", path, reason)
            skipped.append(Skipped(str(path), reason))
            continue
        if recording.codec and recording.codec != cache.codec_id:
            _warn_codec_mismatch(recording.codec, cache.codec_id)
        if recording.num_frames == 0:
            skipped.append(Skipped(str(path), "no frames"))
            continue
        if declared is not None and recording.num_frames < declared * FRAME_RATE * 0.98 - 2:
            # a truncated file decodes "successfully" to less audio than its header declares
            reason = f"truncated: decoded {recording.duration:.1f} s of the {declared:.1f} s its header declares"
            logger.warning("skipping %s: %s", path, reason)
            skipped.append(Skipped(str(path), reason))
            continue
        starts.append(total)
        pieces.append(recording)
        total += recording.num_frames
        silence = silence if silence is not None else recording.silence
    if not pieces:
        raise BookLeftOut(book, "no readable audio file", skipped)
    stereo = sum(p.codes.shape[0] == 16 for p in pieces)
    if 0 < stereo < len(pieces):
        raise BookLeftOut(book, f"files mix mono and stereo ({len(pieces) - stereo} mono, {stereo} stereo)", skipped)
    texts = [p.text for p in pieces]
    text = torch.cat(texts)[:max_frames] if all(t is not None for t in texts) else None
    joined = Recording(torch.cat([p.codes for p in pieces], dim=1)[:, :max_frames], text=text, silence=silence,
                       codec=pieces[0].codec, source=book.id)
    distinct = [int(row.unique().numel()) for row in joined.codes[:8]]
    return Stream(book, moshi_streams(lm, joined, where=book.id), starts, skipped, distinct)


@functools.lru_cache(maxsize=None)
def _warn_codec_mismatch(codes_codec: str, model_codec: str) -> None:
    """Once per pair of codecs (a corpus of code files would repeat it for every file)."""
    logger.warning("code files of codec %r evaluated with a model whose codec is %r (reported once)",
                   codes_codec, model_codec)
