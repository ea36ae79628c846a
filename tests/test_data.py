"""Data: code files, manifests, audio → Mimi codes (random-init Mimi) → Moshi streams → batches."""
import json

import numpy as np
import pytest
import soundfile
import sphn
import torch

from train_utils import TINY_MODEL, make_corpus, write_config
from ttt_speech.data.codes import Recording, load_codes, save_codes
from ttt_speech.data.layout import moshi_streams
from ttt_speech.data.manifest import read_manifest
from ttt_speech.data.synthetic import SynthConfig, acoustic_maps, synth_recording, write_corpus
from ttt_speech.data.transcript import Word, read_alignments, text_stream
from ttt_speech.models import tiny_moshi_lm
from ttt_speech_apps.finetune.config import load_train_config
from ttt_speech_apps.finetune.data import WindowBatcher
from ttt_speech_apps.finetune.hosts import RecordingLoader


def test_code_file_round_trip_and_errors(tmp_path):
    rec = Recording(torch.randint(0, 2048, (16, 7)), text=torch.arange(7), silence=torch.arange(8), codec="c")
    back = load_codes(save_codes(tmp_path / "a.safetensors", rec))
    assert torch.equal(back.codes, rec.codes) and torch.equal(back.text, rec.text) and back.codec == "c"
    (tmp_path / "bad.safetensors").write_bytes(b"nope")
    with pytest.raises(ValueError, match="bad.safetensors: not a readable code file"):
        load_codes(tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match=r"codes must be \[8 or 16, T\]"):
        save_codes(tmp_path / "c.safetensors", Recording(torch.zeros(3, 4, dtype=torch.long)))


def test_synthetic_corpus_is_deterministic_and_repeats_private_motifs():
    config = SynthConfig(frames=400, length_jitter=0.0, num_motifs=3, motif_frames=8, seed=5)
    codes, labels = synth_recording(config, 0)
    again, _ = synth_recording(config, 0)
    other, _ = synth_recording(config, 1)
    assert torch.equal(codes, again) and not torch.equal(codes, other) and codes.shape == (8, 400)
    starts = [t for t in range(1, 400) if labels[t] >= 0 and labels[t - 1] != labels[t]]
    first = {}
    for t in starts:  # every occurrence of a motif repeats its first occurrence exactly
        m = int(labels[t])
        if t + 8 <= 400:
            first.setdefault(m, codes[:, t:t + 8])
            assert torch.equal(codes[:, t:t + 8], first[m])
    assert len(first) == 3


@pytest.fixture(scope="module")
def audio_tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("audio")
    g = np.random.default_rng(0)
    sphn.write_wav(str(root / "mono.wav"), (0.1 * g.standard_normal(16000)).astype(np.float32), 16000)
    sphn.write_wav(str(root / "stereo.wav"), (0.1 * g.standard_normal((2, 24000))).astype(np.float32), 24000)
    (root / "corrupt.wav").write_bytes(b"RIFF not really")
    nan = (0.1 * g.standard_normal(16000)).astype(np.float32)
    nan[8000] = np.nan  # a float WAV at 16 kHz: resampled, where sphn's resampler used to panic
    soundfile.write(str(root / "nan.wav"), nan, 16000, subtype="FLOAT")
    (root / "train.jsonl").write_text('{"path": "mono.wav", "duration": 1.0}\n{"path": "stereo.wav", "duration": 1.0}\n')
    return root


def test_audio_manifest_to_codes_to_batches(tmp_path, audio_tree):
    corpus = {"train": audio_tree / "train.jsonl"}
    model = {**TINY_MODEL, "tiny": {**TINY_MODEL["tiny"], "card": 2048}}  # the random Mimi's codebook
    config = load_train_config(write_config(tmp_path, corpus, model=model,
                                            **{"data.codes_cache": str(tmp_path / "cache")}))
    lm = tiny_moshi_lm(**config.model.tiny)
    entries = read_manifest(config.data.train_manifest)
    loader = RecordingLoader(entries, lm, config)
    mono, stereo = loader(0), loader(1)  # once-delayed stream: inputs then targets, [2 * 17, T]
    assert mono.shape == (34, 13) and stereo.shape == (34, 13)  # 1 s = 12.5 frames → 13
    assert loader.cache.misses == 2
    loader(0)
    assert loader.cache.hits == 1
    for entry, rows in zip(entries, (8, 16)):  # the codes carry the audio: no codebook is constant
        codes = load_codes(loader.cache.path_for(entry.path)).codes
        assert codes.shape[0] == rows and all(len(row.unique()) > 1 for row in codes), entry.path
    mono_codes = moshi_streams(lm, load_codes(loader.cache.path_for(entries[0].path)))
    stereo_codes = moshi_streams(lm, load_codes(loader.cache.path_for(entries[1].path)))
    assert (mono_codes[0] == lm.text_padding_token_id).all()  # no transcript: padding text
    assert (mono_codes[9:] == mono_codes[9:, :1]).all()  # user stream: the silence code, every frame
    assert stereo_codes.shape == (17, 13)
    batcher = WindowBatcher(entries, loader, global_batch=2, window=8, shuffle=False)
    batch = batcher.next()
    assert batch.codes.shape == (2, 34, 8) and batch.new_recording.all()
    assert not batcher.next().new_recording.any()


def test_layout_of_stereo_and_mono_recordings():
    lm = tiny_moshi_lm(card=64, text_card=100)
    codes = torch.arange(16)[:, None].repeat(1, 5)  # row i holds code i
    stereo = moshi_streams(lm, Recording(codes, text=torch.full((5,), 7)))
    assert torch.equal(stereo[1:9, 0], torch.arange(8)) and torch.equal(stereo[9:, 0], torch.arange(8, 16))
    assert (stereo[0] == 7).all()  # a given transcript is the text stream
    mono = moshi_streams(lm, Recording(codes[:8], silence=torch.full((8,), 42)))
    assert torch.equal(mono[1:9], codes[:8]) and (mono[9:] == 42).all()
    with pytest.raises(ValueError, match="mono codes without 'silence'"):
        moshi_streams(lm, Recording(codes[:8]))


def test_corrupt_audio_is_a_clear_error(tmp_path, audio_tree):
    (tmp_path / "m.jsonl").write_text(f'{{"path": "{audio_tree / "corrupt.wav"}"}}\n'
                                      f'{{"path": "{audio_tree / "nan.wav"}"}}\n')
    config = load_train_config(write_config(tmp_path, {"train": tmp_path / "m.jsonl"},
                                            **{"data.codes_cache": str(tmp_path / "cache")}))
    loader = RecordingLoader(read_manifest(config.data.train_manifest), tiny_moshi_lm(card=2048, text_card=100), config)
    with pytest.raises(ValueError, match="corrupt.wav: cannot decode audio"):
        loader(0)
    with pytest.raises(ValueError, match=r"nan.wav: audio contains 1 NaN or inf sample\(s\) \(first at 0.500 s\)"):
        loader(1)


def test_data_encode_stops_at_a_bad_file_unless_skip_bad(tmp_path, audio_tree, capfd):
    from ttt_speech.cli import main

    (tmp_path / "m.jsonl").write_text(f'{{"path": "{audio_tree / "mono.wav"}"}}\n'
                                      f'{{"path": "{audio_tree / "nan.wav"}"}}\n')
    out, cache = tmp_path / "out/codes.jsonl", tmp_path / "cache"
    args = ["data", "encode", str(tmp_path / "m.jsonl"), str(out), "--cache", str(cache), "--device", "cpu"]
    assert main(args) == 2
    err = capfd.readouterr().err
    assert "panicked" not in err and "Traceback" not in err
    assert err.strip().splitlines()[-1] == (f"ttt-speech data: error: {audio_tree / 'nan.wav'}: audio contains 1 NaN "
                                            "or inf sample(s) (first at 0.500 s) (--skip-bad leaves such files out)")
    assert not out.exists()  # nothing half-written

    assert main(args + ["--skip-bad"]) == 0
    printed = capfd.readouterr()
    assert "panicked" not in printed.err and "Traceback" not in printed.err
    assert f"skipped 1 file(s) that cannot be decoded:\n  {audio_tree / 'nan.wav'}: audio contains 1 NaN" in printed.out
    (entry,) = read_manifest(out)
    assert entry.is_codes and entry.path.is_relative_to(cache.resolve())

    in_the_way = tmp_path / "a_file"  # outputs that cannot be written: one line, before any encoding
    in_the_way.write_text("")
    for out_manifest, cache_dir, message in [
            (out, in_the_way, f"--cache: {in_the_way} is a file, expected a folder"),
            (in_the_way / "codes.jsonl", cache, f"out_manifest (its folder): {in_the_way} is a file"),
            (tmp_path, cache, f"out_manifest: {tmp_path} is a folder, expected a file name")]:
        assert main([*args[:3], str(out_manifest), "--cache", str(cache_dir)]) == 2
        err = capfd.readouterr().err.strip()
        assert message in err and "\n" not in err, err


def test_codes_out_of_range_for_the_model(tmp_path):
    corpus = make_corpus(tmp_path)
    rec = load_codes(read_manifest(corpus["train"])[0].path)
    with pytest.raises(ValueError, match="out of range for a model with card 16"):
        moshi_streams(tiny_moshi_lm(card=16, text_card=100), rec)


def test_synthetic_private_vocabulary_repeats_and_acoustic_coupling():
    config = SynthConfig(frames=4000, card=64, vocab=5, repeat_prob=0.5, acoustic_coupling=1.0, seed=1)
    codes, _ = synth_recording(config, 0)
    other, _ = synth_recording(config, 1)
    assert len(codes[0].unique()) == 5 and set(codes[0].tolist()) != set(other[0].tolist())
    repeats = (codes[0, 1:] == codes[0, :-1]).float().mean().item()
    assert abs(repeats - (0.5 + 0.5 / 5)) < 0.03  # kept, or redrawn the same code
    maps = acoustic_maps(config)  # shared by every recording: acoustics are a function of semantics
    assert torch.equal(codes[1:], maps[:, codes[0]]) and torch.equal(other[1:], maps[:, other[0]])
    noisy, _ = synth_recording(SynthConfig(frames=4000, card=64, acoustic_coupling=0.0, seed=1), 0)
    assert (noisy[1:] == maps[:, noisy[0]]).float().mean() < 0.05
    with pytest.raises(ValueError, match="synth.vocab"):
        SynthConfig(card=8, vocab=9)
    with pytest.raises(ValueError, match="synth.repeat_prob"):
        SynthConfig(repeat_prob=1.0)


def test_synthetic_lengths_jitter_and_held_out_length(tmp_path):
    config = SynthConfig(recordings=12, frames=100, length_jitter=0.5, eval_recordings=2, eval_frames=300)
    lengths = [synth_recording(config, i)[0].shape[1] for i in range(12)]
    assert all(50 <= n <= 150 for n in lengths[:10]) and len(set(lengths[:10])) > 3 and lengths[10:] == [300, 300]
    files = write_corpus(config, tmp_path)
    assert len(read_manifest(files["train"])) == 10 and len(read_manifest(files["eval"])) == 2


def _letters(word):  # a stand-in tokenizer: one token per letter
    return [10 + ord(c) - ord("a") for c in word]


def test_transcript_to_text_stream_layout():
    P, E = 3, 0  # moshi's padding and end-of-padding ids
    words = [Word("ab", 0.10, 0.30), Word("cde", 0.40, 0.60), Word("x", 0.45, 0.5, "SPEAKER_OTHER"),
             Word("f", 0.9, 0.9), Word("gh", 1.0, 1.4)]  # "x": other speaker, "f": no duration
    stream = text_stream(words, 16, _letters, P, E).tolist()
    # frame t covers [t/12.5, (t+1)/12.5): "ab" starts in frame 1, "cde" in frame 5, "gh" in frame 12
    assert stream == [E, 10, 11, P, E, 12, 13, 14, P, P, P, E, 16, 17, P, P]
    # a word that starts before the previous one is written out cuts it off (Moshi's convention)
    cut = text_stream([Word("abcd", 0.0, 0.1), Word("e", 0.1, 0.2)], 6, _letters, P, E).tolist()
    assert cut == [10, 14, P, P, P, P]


def test_transcript_files(tmp_path):
    assert read_alignments(tmp_path / "none.json") is None
    (tmp_path / "meta.json").write_text('{"speaker": "1", "snr": 4.0}')  # LibriLight metadata: no transcript
    assert read_alignments(tmp_path / "meta.json") is None
    (tmp_path / "t.json").write_text('{"alignments": [["hi", [0.0, 0.5], "SPEAKER_MAIN"], ["there", [0.6]]]}')
    with pytest.raises(ValueError, match=r"t.json: alignments\[1\]: expected \[word, \[start, end\], speaker\]"):
        read_alignments(tmp_path / "t.json")
    (tmp_path / "u.json").write_text("{not json")
    with pytest.raises(ValueError, match="u.json: not valid JSON, expected a readable transcript"):
        read_alignments(tmp_path / "u.json")


def test_audio_with_transcript_gets_its_text_stream(tmp_path, audio_tree):
    import sentencepiece

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "mono.wav").write_bytes((audio_tree / "mono.wav").read_bytes())
    (corpus / "mono.json").write_text('{"alignments": [["hello", [0.1, 0.4], "SPEAKER_MAIN"], '
                                      '["world", [0.5, 0.9], "SPEAKER_MAIN"]]}')
    (corpus / "train.jsonl").write_text('{"path": "mono.wav", "duration": 1.0}\n')
    (tmp_path / "text.txt").write_text("hello world\nthe world says hello\n" * 20)
    sentencepiece.SentencePieceTrainer.train(input=str(tmp_path / "text.txt"), model_prefix=str(tmp_path / "spm"),
                                             vocab_size=16, minloglevel=2)
    model = {**TINY_MODEL, "tiny": {**TINY_MODEL["tiny"], "card": 2048}, "text_tokenizer": str(tmp_path / "spm.model")}
    config = load_train_config(write_config(tmp_path, {"train": corpus / "train.jsonl"}, model=model,
                                            **{"data.codes_cache": str(tmp_path / "cache")}))
    lm = tiny_moshi_lm(**config.model.tiny)
    codes = RecordingLoader(read_manifest(config.data.train_manifest), lm, config).codes(0)
    spm = sentencepiece.SentencePieceProcessor(model_file=str(tmp_path / "spm.model"))
    expected = text_stream([Word("hello", 0.1, 0.4), Word("world", 0.5, 0.9)], 13, lambda w: spm.encode(w),
                           lm.text_padding_token_id, lm.end_of_text_padding_id)
    assert torch.equal(codes[0], expected) and (codes[0] != lm.text_padding_token_id).sum() >= 3
    # the tiny model has no tokenizer of its own: a transcript without model.text_tokenizer is an error
    config = load_train_config(write_config(tmp_path / "b", {"train": corpus / "train.jsonl"},
                                            model={**model, "text_tokenizer": None},
                                            **{"data.codes_cache": str(tmp_path / "cache")}))
    with pytest.raises(ValueError, match="mono.json: a word-timed transcript needs a text tokenizer"):
        RecordingLoader(read_manifest(config.data.train_manifest), lm, config).codes(0)


def test_data_synth_command_reads_a_config_section_then_flags(tmp_path, capsys):
    from ttt_speech.cli import main

    out = tmp_path / "corpus"
    assert main(["data", "synth", str(out), "--config", "configs/demo.yaml", "--section", "corpus",
                 "--recordings", "6", "--eval-recordings", "2", "--frames", "40", "--eval-frames", "null"]) == 0
    saved = json.loads((out / "corpus.json").read_text())["synthetic"]
    assert saved["recordings"] == 6 and saved["eval_frames"] is None and saved["vocab"] == 8  # flag > config
    assert len(read_manifest(out / "train.jsonl")) == 4 and len(read_manifest(out / "eval.jsonl")) == 2
    assert main(["data", "synth", str(tmp_path / "bad"), "--recordings", "2.5"]) == 2
    assert "synth.recordings: expected an integer, got 2.5" in capsys.readouterr().err
    assert main(["data", "synth", str(tmp_path / "bad"), "--config", "configs/demo.yaml", "--section", "nope"]) == 2
    assert "no 'nope' section" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    (tmp_path / "a_file").write_text("")
    for bad, message in [(tmp_path / "a_file", f"out: {tmp_path / 'a_file'} is a file, expected a folder"),
                         (tmp_path / "a_file" / "x", f"out: cannot write into {tmp_path / 'a_file' / 'x'}")]:
        assert main(["data", "synth", str(bad), "--recordings", "2", "--eval-recordings", "0"]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err, err


@pytest.mark.parametrize("rate", [16000, 44100, 48000, 8000])
def test_resampled_audio_is_aligned_with_the_original(rate, tmp_path):
    """sphn's resampler alone delays its output (32 ms from 16 to 24 kHz) and pads it to whole chunks of
    1024 input samples (checked here, so that the test notices when it stops doing so); `resample` and
    `read_audio` give round(S · 24000 / rate) samples with a click where it was, to a sample."""
    from ttt_speech.data.audio import read_audio, resample

    n, click = rate * 2 + 123, int(rate * 0.7) + 5
    pcm = np.zeros((2, n), np.float32)
    pcm[0, click] = 1.0
    pcm[1, click // 2] = 0.5
    raw = np.asarray(sphn.resample(pcm, src_sample_rate=rate, dst_sample_rate=24000))
    expected = (round(click * 24000 / rate), round(click // 2 * 24000 / rate))
    assert raw.shape[1] > round(n * 24000 / rate) and abs(int(np.argmax(raw[0])) - expected[0]) > 5
    for out in (resample(pcm, rate, 24000), read_audio(_wav(tmp_path, pcm, rate), 24000).numpy()):
        assert out.shape == (2, round(n * 24000 / rate))
        assert abs(int(np.argmax(out[0])) - expected[0]) <= 1 and abs(int(np.argmax(out[1])) - expected[1]) <= 1


def _wav(folder, pcm: np.ndarray, rate: int):
    path = folder / f"click_{rate}.wav"
    soundfile.write(str(path), pcm.T, rate, subtype="FLOAT")
    return path
