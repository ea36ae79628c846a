"""Build a small LibriLight-layout tree (FLAC + per-file JSON) for tests and demos.

Real speech: the 5 consecutive LibriVox utterances of *Sense and Sensibility* (chapter 1, 24.7 s,
16 kHz) shipped by Debian's `pocketsphinx-testdata` (`apt-get install pocketsphinx-testdata`;
`dpkg -L pocketsphinx-testdata` lists test/data/librivox/), written as one book of 5 "chapters".
Longer books are synthesised from those same utterances (random order, gain, ±5% speed, pauses
with low noise), deterministic by seed, to exceed a training window. `--corrupt` adds an
undecodable file, an empty one and a truncated one, which the evaluator must skip and count.

    python scripts/make_librilight_fixture.py data/librilight_fixture --synthetic-books 2 --synthetic-seconds 120
    (or: python -m eval.fixture ...; the demo calls make_fixture directly)

Layout: OUT/small/<speaker>/<book>/<file>.flac + <file>.json with the LibriLight fields
{"speaker", "book_meta": {"id", "title", "genre", "Dramatic Readings", "meta_genre", ...}, "snr",
"voice_activity"}; SNR and voice activity are rough energy-based estimates, and a "fixture"
field says where each file comes from.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

SOURCE = Path("/usr/share/pocketsphinx/test/data/librivox")
RATE = 16000
REAL_SPEAKER, REAL_BOOK = "9999", "sense_and_sensibility_01_austen_64kb"
GENRES = [(["General Fiction"], "Literature"), (["Children's Fiction"], "Literature"), (["*Non-fiction", "History"], "Science, Craft & Essay")]


def _energy_db(x: np.ndarray, frame: int = 400) -> np.ndarray:
    n = len(x) // frame
    frames = x[: n * frame].reshape(n, frame)
    return 10 * np.log10((frames.astype(np.float64) ** 2).mean(1) + 1e-10)


def estimate_snr_and_vad(x: np.ndarray) -> tuple[float, list[list[float]]]:
    """Rough SNR (dB: loud-frame vs quiet-frame energy) and voice-activity segments (seconds)."""
    db = _energy_db(x)
    if len(db) == 0:
        return 0.0, []
    noise, speech = np.percentile(db, 10), np.percentile(db, 90)
    active = db > noise + 0.5 * (speech - noise)
    segments, start = [], None
    for i, on in enumerate(list(active) + [False]):
        if on and start is None:
            start = i
        elif not on and start is not None:
            on_s, off_s = start * 400 / RATE, i * 400 / RATE
            if segments and on_s - segments[-1][1] < 0.3:  # bridge short gaps, as a VAD would
                segments[-1][1] = round(off_s, 3)
            else:
                segments.append([round(on_s, 3), round(off_s, 3)])
            start = None
    return round(float(speech - noise), 3), segments


def _write(path: Path, audio: np.ndarray, meta: dict) -> None:
    import soundfile

    path.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(str(path), audio, RATE, format="FLAC", subtype="PCM_16")
    snr, vad = estimate_snr_and_vad(audio)
    path.with_suffix(".json").write_text(json.dumps({**meta, "snr": snr, "voice_activity": vad}, indent=1) + "\n")


def _book_meta(book_id: str, title: str, genre: list[str], meta_genre: str, seconds: float) -> dict:
    return {"id": book_id, "title": title, "language": "English", "totaltimesecs": round(seconds),
            "genre": genre, "Dramatic Readings": False, "meta_genre": meta_genre}


def read_utterances(source: Path = SOURCE) -> list[tuple[str, np.ndarray, str]]:
    """(name, 16 kHz float32 audio, transcript) of the LibriVox utterances, in their order."""
    import soundfile

    if not source.is_dir():
        raise FileNotFoundError(f"{source}: not found; install it with `apt-get install -y pocketsphinx-testdata`")
    transcripts = {}
    listing = source / "transcription"
    if listing.is_file():
        for line in listing.read_text().splitlines():
            if "(" in line:
                text, name = line.rsplit("(", 1)
                transcripts[name.strip(" )")] = text.replace("<s>", "").replace("</s>", "").strip()
    out = []
    for wav in sorted(source.glob("*.wav")):
        audio, rate = soundfile.read(str(wav), dtype="float32")
        if rate != RATE:
            raise ValueError(f"{wav}: expected {RATE} Hz, got {rate}")
        out.append((wav.stem, audio, transcripts.get(wav.stem, "")))
    if not out:
        raise FileNotFoundError(f"{source}: no .wav files")
    return out


def synthesize(utterances: list[np.ndarray], seconds: float, rng: np.random.Generator) -> np.ndarray:
    """`seconds` of speech-like audio: random utterances, gain, ±5% speed, pauses with low noise."""
    target, pieces, total = int(seconds * RATE), [], 0
    while total < target:
        utt = utterances[rng.integers(len(utterances))]
        speed = rng.uniform(0.95, 1.05)
        grid = np.arange(0, len(utt) - 1, speed)
        piece = np.interp(grid, np.arange(len(utt)), utt) * rng.uniform(0.6, 1.2)
        pause = rng.normal(0, 1e-3, int(rng.uniform(0.2, 1.0) * RATE))
        pieces += [piece, pause]
        total += len(piece) + len(pause)
    return np.clip(np.concatenate(pieces)[:target], -1, 1).astype(np.float32)


def make_fixture(out: str | Path, source: Path = SOURCE, synthetic_books: int = 1, synthetic_seconds: float = 60.0,
                 chapters: int = 3, corrupt: bool = False, seed: int = 0) -> dict:
    """Write the tree under `out`; returns {"books": [...], "files": n, "seconds": total, "bad_files": [...]}."""
    out = Path(out)
    rng = np.random.default_rng(seed)
    utterances = read_utterances(source)
    split = out / "small"
    books, files, seconds, bad = [], 0, 0.0, []
    real = split / REAL_SPEAKER / REAL_BOOK
    total = sum(len(a) for _, a, _ in utterances) / RATE
    meta = {"speaker": REAL_SPEAKER, "book_meta": _book_meta("real-0", "Sense and Sensibility", ["General Fiction"],
                                                              "Literature", total)}
    for name, audio, text in utterances:
        _write(real / f"{name}.flac", audio, {**meta, "fixture": {"source": f"pocketsphinx-testdata librivox/{name}.wav",
                                                                   "transcript": text}})
        files += 1
        seconds += len(audio) / RATE
    books.append(str(real.relative_to(out)))
    if corrupt:
        (real / "zz_corrupt.flac").write_bytes(rng.bytes(4096))  # not audio at all
        (real / "zz_empty.flac").write_bytes(b"")                # zero bytes
        whole = (real / f"{utterances[0][0]}.flac").read_bytes()
        (real / "zz_truncated.flac").write_bytes(whole[: len(whole) // 3])  # valid header, data cut short
        bad += [str((real / n).relative_to(out)) for n in ("zz_corrupt.flac", "zz_empty.flac", "zz_truncated.flac")]
    for i in range(synthetic_books):
        speaker = str(9000 + i)
        genre, meta_genre = GENRES[i % len(GENRES)]
        book = split / speaker / f"synthetic_book_{i:02d}"
        per_chapter = synthetic_seconds / chapters
        meta = {"speaker": speaker, "book_meta": _book_meta(f"synthetic-{i}", f"Synthetic book {i}", genre, meta_genre,
                                                             synthetic_seconds)}
        for c in range(chapters):
            audio = synthesize([a for _, a, _ in utterances], per_chapter, rng)
            # chapter numbers without zero padding: the evaluator must sort "2" before "10"
            _write(book / f"{c + 1}_synthetic_{i:02d}.flac", audio,
                   {**meta, "fixture": {"source": f"synthesized from pocketsphinx-testdata librivox (seed {seed})"}})
            files += 1
            seconds += per_chapter
        books.append(str(book.relative_to(out)))
    return {"books": books, "files": files, "seconds": seconds, "bad_files": bad}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="output folder (LibriLight root: OUT/small/<speaker>/<book>/)")
    parser.add_argument("--source", type=Path, default=SOURCE, help=f"pocketsphinx-testdata librivox folder (default {SOURCE})")
    parser.add_argument("--synthetic-books", type=int, default=1, help="synthetic books to add (default 1)")
    parser.add_argument("--synthetic-seconds", type=float, default=60.0, help="seconds per synthetic book (default 60)")
    parser.add_argument("--chapters", type=int, default=3, help="files (chapters) per synthetic book (default 3)")
    parser.add_argument("--corrupt", action="store_true", help="also write a corrupt, an empty and a truncated file")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic books (default 0)")
    args = parser.parse_args(argv)
    if args.synthetic_books < 0 or args.chapters < 1 or args.synthetic_seconds <= 0:
        print("make_librilight_fixture: --synthetic-books >= 0, --chapters >= 1, --synthetic-seconds > 0", file=sys.stderr)
        return 2
    try:
        info = make_fixture(args.out, args.source, args.synthetic_books, args.synthetic_seconds, args.chapters,
                            args.corrupt, args.seed)
    except (FileNotFoundError, ValueError) as e:
        print(f"make_librilight_fixture: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {len(info['books'])} books, {info['files']} files, {info['seconds'] / 60:.1f} min of audio under "
          f"{args.out}" + (f"; bad files: {len(info['bad_files'])}" if info["bad_files"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())

