"""The zero-shot suite's data (eval/zero_shot_data.py) on its fixture (eval/zero_shot_fixture.py): real
LibriVox speech from Debian's pocketsphinx-testdata (skipped cleanly when it is not installed), read
through `datasets` from a saved folder and from a hub-layout cache, offline."""
from __future__ import annotations

import io

import numpy as np
import pytest

from ttt_speech_apps.eval import fixture
from ttt_speech_apps.eval import zero_shot_data as zsd
from ttt_speech_apps.eval import zero_shot_fixture as zsf

TASKS = zsd.TASKS


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    if not fixture.SOURCE.is_dir():
        pytest.skip("pocketsphinx-testdata is not installed (apt-get install -y pocketsphinx-testdata)")
    root = tmp_path_factory.mktemp("zero_shot")
    return root, zsf.write_fixture(root), zsf.windows()


@pytest.fixture
def offline_hf(tmp_path, monkeypatch):
    """An empty hub cache and datasets cache under tmp_path, offline, as HF_HUB_OFFLINE=1 sets them up
    (the libraries read the variables at import, so their module constants are patched too)."""
    import datasets
    from huggingface_hub import constants

    hub, cache = tmp_path / "hub", tmp_path / "datasets"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    return hub, cache


def _one_line_error(call, *patterns: str) -> str:
    with pytest.raises(ValueError) as e:
        call()
    message = str(e.value)
    assert "\n" not in message, message
    for pattern in patterns:
        assert pattern in message, message
    return message


def _wav(audio: np.ndarray, rate: int = 16000, subtype: str = "PCM_16") -> bytes:
    import soundfile

    buffer = io.BytesIO()
    soundfile.write(buffer, audio, rate, format="WAV", subtype=subtype)
    return buffer.getvalue()


def test_the_task_table():
    speed = [TASKS[n] for n in ("swuggy", "sblimp", "sstorycloze", "tstorycloze")]
    assert [t.hub_id for t in speed] == ["speed/sWUGGY", "speed/sBLIMP", "speed/sStoryCloze", "speed/tStoryCloze"]
    assert all((t.config, t.positive, t.negative, t.tokens, t.split) == (None, "positive", "negative", "cb1", "train")
               for t in speed)
    salmon = [t for t in TASKS.values() if t.hub_id == "slprl/SALMon"]
    assert sorted(t.config for t in salmon) == sorted([
        "speaker_consistency", "gender_consistency", "sentiment_consistency", "bg_domain_consistency",
        "bg_all_consistency", "rir_consistency", "sentiment_alignment", "bg_alignment"])
    assert all((t.positive, t.negative, t.tokens) == ("positive_audio", "negative_audio", "audio") for t in salmon)
    assert all(name == t.name for name, t in TASKS.items())


def test_the_fixture_round_trips_through_read_pairs(suite):
    root, info, pieces = suite
    assert set(info["tasks"]) == set(zsf.DEFAULT_TASKS) and len(pieces) >= 24
    for name, written in info["tasks"].items():
        zsd.check_available(TASKS[name], root, f"zero_shot.tasks.{name}")
        got = zsd.read_pairs(TASKS[name], root, 16000, None, 0)
        assert got.total == written["pairs"] == len(pieces) and got.source == str(root / name)
        assert [pid for pid, _ in got.skipped] == written["unreadable"]
        assert len(list(got)) == got.total - len(written["unreadable"])
        for pair in list(got):
            row = int(pair.id.split("/")[1])
            assert pair.id == f"{name}/{row}"
            assert pair.positive.dtype == np.float32 and pair.positive.shape == (32000,) == pair.negative.shape
            # the real speech window, to PCM-16 precision, not silence, and the fake one is not the real one
            assert np.abs(pair.positive - pieces[row]).max() <= 1 / 32768 + 1e-7
            assert pair.positive.std() > 0.01 and np.abs(pair.positive - pair.negative).max() > 0.1
            np.testing.assert_array_equal(pair.negative, zsf.negative(pair.positive, written["negative"]))


def test_read_pairs_resamples_to_the_codec_rate(suite):
    root, info, _ = suite
    native = zsd.read_pairs(TASKS["swuggy"], root, 16000, 4, 0)
    got = zsd.read_pairs(TASKS["swuggy"], root, 24000, 4, 0)
    assert [p.id for p in list(got)] == [p.id for p in list(native)]
    for pair, ref in zip(list(got), list(native)):
        assert pair.positive.dtype == np.float32 and pair.positive.shape == (48000,) == pair.negative.shape
        # the same sound: 24 kHz back to every 2nd-of-3 sample ≈ the 16 kHz one; reversed stays reversed
        back = np.interp(np.arange(32000) * 1.5, np.arange(48000), pair.positive)
        assert np.corrcoef(back[100:-100], ref.positive[100:-100])[0, 1] > 0.95
        assert np.corrcoef(pair.negative[100:-100], pair.positive[::-1][100:-100])[0, 1] > 0.95


def test_max_pairs_draws_a_reproducible_seeded_subset_in_row_order(suite):
    root, _, _ = suite
    task = TASKS["tstorycloze"]
    full = {p.id: p for p in list(zsd.read_pairs(task, root, 16000, None, 0))}
    a, again, other = (zsd.read_pairs(task, root, 16000, 8, seed) for seed in (1, 1, 2))
    ids = [p.id for p in list(a)]
    assert len(ids) == 8 and a.total == len(full) and set(ids) <= set(full)
    assert ids == sorted(ids, key=lambda i: int(i.split("/")[1]))
    assert ids == [p.id for p in list(again)] and ids != [p.id for p in list(other)]
    for pair in list(a):
        np.testing.assert_array_equal(pair.positive, full[pair.id].positive)
    assert len(list(zsd.read_pairs(task, root, 16000, 10_000, 0))) == len(full)  # more than there are: all
    _one_line_error(lambda: zsd.read_pairs(task, root, 16000, 0, 0), "zero_shot.tasks.tstorycloze: max_pairs")


def test_an_unreadable_recording_is_skipped_and_counted(suite):
    root, info, _ = suite
    got = zsd.read_pairs(TASKS["sblimp"], root, 16000, None, 0)
    assert [pid for pid, _ in got.skipped] == info["tasks"]["sblimp"]["unreadable"] == ["sblimp/3"]
    reason = got.skipped[0][1]
    assert reason.startswith("negative: cannot decode audio") and "\n" not in reason and "BytesIO" not in reason
    assert "sblimp/3" not in {p.id for p in list(got)} and len(list(got)) == got.total - 1


def test_empty_non_finite_and_stereo_recordings(tmp_path):
    task = TASKS["salmon_speaker"]
    tone = (0.3 * np.sin(np.arange(8000) / 5)).astype(np.float32)  # 1 s at 8 kHz
    nan = tone.copy()
    nan[4000] = np.nan
    stereo = np.stack([tone, np.zeros_like(tone)], axis=1)
    rows = [  # (positive, negative)
        (_wav(tone, 8000), b""),                                      # 0: zero bytes
        (_wav(np.zeros(0, np.float32), 8000), _wav(tone, 8000)),      # 1: a WAV with no samples
        (_wav(tone, 8000), _wav(nan, 8000, subtype="FLOAT")),         # 2: NaN
        (_wav(stereo, 8000), _wav(tone, 8000)),                       # 3: stereo → mono mean
    ]
    zsf.write_task(tmp_path / task.name, task, [r[0] for r in rows], [r[1] for r in rows], rate=8000)
    got = zsd.read_pairs(task, tmp_path, 16000, None, 0)
    skipped = dict(got.skipped)
    assert got.total == 4 and set(skipped) == {f"{task.name}/{i}" for i in (0, 1, 2)}
    assert skipped[f"{task.name}/0"] == "negative: empty audio (0 bytes)"
    assert skipped[f"{task.name}/1"].startswith("positive: ") and "empty" in skipped[f"{task.name}/1"]
    assert skipped[f"{task.name}/2"] == "negative: 1 NaN or inf sample(s) (first at 0.500 s)"
    (pair,) = list(got)
    assert pair.id == f"{task.name}/3" and pair.positive.shape == (16000,) == pair.negative.shape
    assert np.abs(pair.positive).max() == pytest.approx(0.15, abs=0.01)  # (tone + silence) / 2
    assert np.abs(pair.negative).max() == pytest.approx(0.3, abs=0.01)


def test_recordings_stored_as_paths(tmp_path):
    """A column of file paths (datasets' Audio without embedded bytes reads the same way)."""
    import datasets
    import soundfile

    task = TASKS["swuggy"]
    tone = (0.3 * np.sin(np.arange(16000) / 5)).astype(np.float32)
    soundfile.write(str(tmp_path / "tone.flac"), tone, 16000, format="FLAC", subtype="PCM_16")
    datasets.Dataset.from_dict({"positive": [str(tmp_path / "tone.flac")] * 2,
                                "negative": [str(tmp_path / "tone.flac"), str(tmp_path / "gone.flac")]}
                               ).save_to_disk(str(tmp_path / "data" / "swuggy"))
    got = zsd.read_pairs(task, tmp_path / "data", 16000, None, 0)
    assert [p.id for p in list(got)] == ["swuggy/0"]
    assert np.abs(list(got)[0].positive - tone).max() < 1e-4
    assert got.skipped == [("swuggy/1", f"negative: no audio file at {tmp_path / 'gone.flac'} (and no bytes stored)")]


def test_a_missing_dataset_and_a_wrong_column_are_one_line(tmp_path):
    task = TASKS["swuggy"]
    _one_line_error(lambda: zsd.check_available(task, tmp_path, "zero_shot.tasks.swuggy"),
                    "zero_shot.tasks.swuggy", str(tmp_path / "swuggy"), "save_to_disk", "speed/sWUGGY")
    (tmp_path / "swuggy").mkdir()
    (tmp_path / "swuggy" / "notes.txt").write_text("not a dataset")
    _one_line_error(lambda: zsd.check_available(task, tmp_path, "zero_shot.tasks.swuggy"),
                    "zero_shot.tasks.swuggy", "is not a saved dataset")
    # SALMon's columns (positive_audio / negative_audio) where sWUGGY's are expected
    tone = _wav((0.3 * np.sin(np.arange(1600) / 5)).astype(np.float32))
    zsf.write_task(tmp_path / "wrong" / "swuggy", TASKS["salmon_speaker"], [tone], [tone])
    _one_line_error(lambda: zsd.check_available(task, tmp_path / "wrong", "zero_shot.tasks.swuggy"),
                    "zero_shot.tasks.swuggy", "no column 'positive'", "columns: id, positive_audio, negative_audio")
    _one_line_error(lambda: zsd.read_pairs(task, tmp_path / "wrong", 16000), "no column 'positive'")
    # the right name, not audio
    import datasets
    datasets.Dataset.from_dict({"positive": [1, 2], "negative": [3, 4]}).save_to_disk(str(tmp_path / "ints" / "swuggy"))
    _one_line_error(lambda: zsd.check_available(task, tmp_path / "ints", "zero_shot.tasks.swuggy"),
                    "column 'positive'", "is not audio (int64")


def test_the_hub_cache_offline(suite, offline_hf):
    root, info, _ = suite
    hub, cache = offline_hf
    laid = zsf.cache_as_hub(root, hub, ("swuggy", "salmon_speaker"))
    assert laid["swuggy"] == (hub / "datasets--speed--sWUGGY" / "snapshots" / zsf.COMMIT / "data"
                              / "train-00000-of-00001.parquet")
    assert laid["salmon_speaker"].parent.name == "speaker_consistency"
    for name in ("swuggy", "salmon_speaker"):
        task = TASKS[name]
        zsd.check_available(task, None, f"zero_shot.tasks.{name}")
        got = zsd.read_pairs(task, None, 16000, 6, 3)
        assert got.source.startswith(task.hub_id) and "hub cache" in got.source
        assert got.total == info["tasks"][name]["pairs"]
        local = zsd.read_pairs(task, root, 16000, 6, 3)
        assert [p.id for p in list(got)] == [p.id for p in list(local)] and len(list(got)) == 6
        for a, b in zip(list(got), list(local)):
            np.testing.assert_array_equal(a.positive, b.positive)
            np.testing.assert_array_equal(a.negative, b.negative)
    assert cache.is_dir()  # datasets' Arrow copy went to the patched cache, not the user's
    # absent: a task of a repository that is not there, and a SALMon config that was not downloaded
    _one_line_error(lambda: zsd.check_available(TASKS["tstorycloze"], None, "zero_shot.tasks.tstorycloze"),
                    "zero_shot.tasks.tstorycloze", "speed/tStoryCloze is not in the local Hugging Face cache",
                    str(hub), "hf download --repo-type dataset speed/tStoryCloze", "zero_shot.path")
    _one_line_error(lambda: zsd.check_available(TASKS["salmon_gender"], None, "zero_shot.tasks.salmon_gender"),
                    "slprl/SALMon (config gender_consistency)", "--include 'gender_consistency/*'")
