"""Book discovery in a LibriLight tree: chapter order, filters, corrupt / empty / truncated files."""
import json

import numpy as np
import pytest
import soundfile
import torch

from ttt_speech import tiny_moshi_lm
from ttt_speech.data.codes import Recording, save_codes
from ttt_speech.data.manifest import ManifestEntry, write_manifest
from ttt_speech_apps.eval.books import Book, BookLeftOut, discover_books, find_books, load_stream, natural_key
from ttt_speech_apps.eval.config import DataConfig

RATE = 16000


def write_file(path, seconds=1.0, snr=10.0, genre=("General Fiction",), meta_genre="Literature", dramatic=False,
               meta=True):
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(seconds * RATE)) / RATE
    soundfile.write(str(path), (0.1 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), RATE, format="FLAC")
    if meta:
        path.with_suffix(".json").write_text(json.dumps({
            "speaker": path.parent.parent.name, "snr": snr, "voice_activity": [[0.0, seconds]],
            "book_meta": {"id": "1", "title": path.parent.name, "genre": list(genre), "meta_genre": meta_genre,
                          "Dramatic Readings": dramatic}}))


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "librilight"
    for ch in (1, 2, 10):  # natural order: 1, 2, 10 (not 1, 10, 2)
        write_file(root / "small" / "100" / "book_a" / f"{ch}_a.flac", seconds=2.0)
    write_file(root / "small" / "100" / "book_b" / "1_b.flac", seconds=1.0, snr=2.0)
    write_file(root / "small" / "200" / "play" / "1_p.flac", seconds=3.0, dramatic=True)
    write_file(root / "small" / "200" / "history" / "1_h.flac", seconds=3.0, genre=("*Non-fiction", "History"),
               meta_genre="Science, Craft & Essay")
    write_file(root / "medium" / "300" / "book_c" / "1_c.flac", seconds=2.0, meta=False)
    bad = root / "small" / "100" / "book_a"
    (bad / "5_corrupt.flac").write_bytes(b"\x00garbage" * 100)
    (bad / "6_empty.flac").write_bytes(b"")
    (bad / "3_a.json").write_text("{not json")  # metadata of a missing audio file: ignored
    return root


def ids(found):
    return [b.id for b in found.books]


def test_natural_key_orders_chapters():
    assert sorted(["ch10.flac", "ch2.flac", "ch1.flac"], key=natural_key) == ["ch1.flac", "ch2.flac", "ch10.flac"]


def test_discovery_orders_chapters_and_counts_bad_files(tree):
    found = discover_books(DataConfig(root=tree, exclude_dramatic=False))
    assert ids(found) == ["medium/300/book_c", "small/100/book_a", "small/100/book_b", "small/200/history",
                          "small/200/play"]
    book_a = found.books[1]
    assert [p.name for p in book_a.files] == ["1_a.flac", "2_a.flac", "10_a.flac"]
    assert book_a.seconds == pytest.approx(6.0) and book_a.durations == pytest.approx([2.0, 2.0, 2.0])
    reasons = {s.path.rsplit("/", 1)[-1]: s.reason for s in found.skipped_files}
    assert set(reasons) == {"5_corrupt.flac", "6_empty.flac"}
    assert "unreadable audio" in reasons["5_corrupt.flac"] and "empty" in reasons["6_empty.flac"]
    assert found.books[0].snr is None and found.books[0].genres == []  # no json: metadata unknown


def test_filters_say_why_a_book_is_left_out(tree):
    found = discover_books(DataConfig(root=tree, splits=["small"], min_snr=5.0, min_files=1, min_duration=1.5))
    assert ids(found) == ["small/100/book_a", "small/200/history"]
    why = {s.path: s.reason for s in found.filtered_books}
    assert "min_duration" in why["small/100/book_b"]  # 1 s (its SNR is low too; the first reason is given)
    assert "dramatic" in why["small/200/play"]
    found = discover_books(DataConfig(root=tree, splits=["small"], genres=["literature"], min_files=3))
    assert ids(found) == ["small/100/book_a"]
    found = discover_books(DataConfig(root=tree, exclude_genres=["History"], min_snr=5.0))
    assert "small/200/history" not in ids(found)
    assert any("no 'snr'" in s.reason for s in found.filtered_books)  # medium/300/book_c has no json


def test_max_books_and_errors(tree, tmp_path):
    found = find_books(DataConfig(root=tree, max_books=2))
    assert len(found.books) == 2 and any("max_books" in s.reason for s in found.filtered_books)
    with pytest.raises(ValueError, match="data.root: .* is not a folder"):
        find_books(DataConfig(root=tmp_path / "nope"))
    with pytest.raises(ValueError, match="data.splits: .*large"):
        find_books(DataConfig(root=tree, splits=["large"]))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no books under"):
        find_books(DataConfig(root=tmp_path / "empty"))
    with pytest.raises(ValueError, match="set root"):
        find_books(DataConfig())


class FakeCache:
    """Stands in for CodesCache: 'encodes' a file into 12.5 frames per second of its header duration,
    except files listed in `short` (decode to less than declared) and `broken` (fail); files in
    `stereo` give stereo codes (16 rows)."""

    codec_id = "fake"

    def __init__(self, short=(), broken=(), stereo=()):
        self.short, self.broken, self.stereo = set(short), set(broken), set(stereo)

    def get(self, path):
        if path.name in self.broken:
            raise ValueError(f"{path}: cannot decode audio (boom)")
        frames = int(soundfile.info(str(path)).duration * 12.5)
        if path.name in self.short:
            frames //= 3
        first = int(natural_key(path.name)[1]) if natural_key(path.name)[0] == "" else 0
        codes = torch.full((16 if path.name in self.stereo else 8, frames), first)
        return Recording(codes, silence=torch.arange(8), codec="fake", source=str(path))


def test_load_stream_concatenates_in_order_and_skips_bad_files(tree):
    lm = tiny_moshi_lm(card=64, text_card=100)
    book = discover_books(DataConfig(root=tree, splits=["small"])).books[0]  # book_a: chapters 1, 2, 10
    stream = load_stream(book, lm, FakeCache(), max_frames=1000)
    assert stream.frames == 75 and stream.file_starts == [0, 25, 50]
    assert stream.codes[1].tolist() == [1] * 25 + [2] * 25 + [10] * 25  # Moshi's stream, chapter order
    assert stream.codes[9:].eq(torch.arange(8)[:, None]).all()  # user stream: silence
    assert stream.codes[0].eq(lm.text_padding_token_id).all()
    assert stream.distinct_codes == [3] * 8  # codes 1, 2 and 10 in each of Moshi's 8 codebooks
    capped = load_stream(book, lm, FakeCache(), max_frames=30)
    assert capped.frames == 30 and capped.file_starts == [0, 25]  # chapter 10 is never encoded
    partial = load_stream(book, lm, FakeCache(short={"2_a.flac"}, broken={"10_a.flac"}), max_frames=1000)
    assert partial.frames == 25
    assert [s.reason.split(":")[0] for s in partial.skipped_files] == ["truncated", "cannot decode audio (boom)"]
    with pytest.raises(BookLeftOut, match="small/100/book_a: no readable audio file") as e:
        load_stream(book, lm, FakeCache(broken={"1_a.flac", "2_a.flac", "10_a.flac"}), 1000)
    assert e.value.reason == "no readable audio file" and len(e.value.skipped_files) == 3  # still counted


def test_a_book_mixing_mono_and_stereo_files_is_left_out_with_its_counts(tree):
    lm = tiny_moshi_lm(card=64, text_card=100)
    book = discover_books(DataConfig(root=tree, splits=["small"])).books[0]
    with pytest.raises(BookLeftOut) as e:
        load_stream(book, lm, FakeCache(stereo={"10_a.flac"}, broken={"2_a.flac"}), max_frames=1000)
    assert e.value.reason == "files mix mono and stereo (1 mono, 1 stereo)"
    assert [s.reason for s in e.value.skipped_files] == ["cannot decode audio (boom)"]
    stereo = load_stream(book, lm, FakeCache(stereo={"1_a.flac", "2_a.flac", "10_a.flac"}), max_frames=1000)
    assert stereo.codes[9:].eq(stereo.codes[1:9]).all()  # every file stereo: the user stream is the right channel
    assert load_stream(book, lm, FakeCache(stereo={"10_a.flac"}), max_frames=30).frames == 30  # 10_a never read



class LetterTokenizer:  # a stand-in SentencePiece processor: one token per letter
    def encode(self, word):
        return [10 + ord(c) - ord("a") for c in word]


def test_load_stream_takes_word_timed_transcripts_like_training(tree):
    lm = tiny_moshi_lm(card=64, text_card=100)
    book = discover_books(DataConfig(root=tree, splits=["small"])).books[0]
    for path in book.files:  # the LibriLight metadata json gains moshi-finetune's "alignments"
        meta = json.loads(path.with_suffix(".json").read_text())
        path.with_suffix(".json").write_text(json.dumps({**meta, "alignments": [["ab", [0.1, 0.3], "SPEAKER_MAIN"]]}))
    stream = load_stream(book, lm, FakeCache(), max_frames=1000, tokenizer=LetterTokenizer)
    text = stream.codes[0].tolist()
    for start in stream.file_starts:  # each chapter's word at its own frame 1, end-of-padding before it
        assert text[start:start + 4] == [lm.end_of_text_padding_id, 10, 11, lm.text_padding_token_id]
    assert sum(t != lm.text_padding_token_id for t in text) == 9
    with pytest.raises(ValueError, match="needs a text tokenizer"):  # tiny model, no tokenizer: loud
        load_stream(book, lm, FakeCache(), max_frames=1000)

def test_manifest_of_code_files(tmp_path):
    lm = tiny_moshi_lm(card=64, text_card=100)
    paths = []
    for i, T in enumerate((40, 25)):
        paths.append(save_codes(tmp_path / f"rec{i}.safetensors",
                                Recording(torch.randint(0, 64, (8, T)), silence=torch.zeros(8, dtype=torch.long),
                                          codec="synthetic")))
    manifest = write_manifest(tmp_path / "eval.jsonl", [ManifestEntry(p, None) for p in paths])
    found = find_books(DataConfig(manifest=manifest))
    assert [b.files[0].name for b in found.books] == ["rec0.safetensors", "rec1.safetensors"]
    stream = load_stream(found.books[1], lm, FakeCache(), max_frames=1000)
    assert stream.codes.shape == (17, 25)
    with pytest.raises(ValueError, match="either root .* or manifest"):
        DataConfig(root=tmp_path, manifest=manifest)


def test_book_to_dict_is_json_ready(tree):
    book = discover_books(DataConfig(root=tree)).books[1]
    assert isinstance(book, Book)
    json.dumps(book.to_dict(), allow_nan=False)
