"""The judges of `ttt-speech eval continuation` (eval/judges.py) on tiny random-init stand-ins
(scripts/make_local_judges.py) of the default Whisper, WavLM and Qwen2.5, loaded offline from a
hub-layout cache under the default ids and from folders. The weights are random: the tests check shapes,
batching, cutting, padding and the refusals, not what is heard."""
from __future__ import annotations

import math
import shutil
import socket
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("transformers")  # the `omni` extra: the judges load through it

from conftest import go_offline  # noqa: E402
from ttt_speech_apps.eval.config import DEFAULT_ASR, DEFAULT_SPEAKER, DEFAULT_TEXT_LM  # noqa: E402
from ttt_speech_apps.eval.judges import SpeakerEncoder, TextScorer, Transcriber, check_judge  # noqa: E402

LIBRIVOX = Path("/usr/share/pocketsphinx/test/data/librivox/sense_and_sensibility_01_austen_64kb-0870.wav")
CPU = torch.device("cpu")
WHERE = "continuation.asr_model"


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """(folders by judge name, hub cache holding them under the default ids), built once."""
    from make_local_judges import make_judges

    root = tmp_path_factory.mktemp("judges")
    return make_judges(root / "judges", root / "hf-cache"), root / "hf-cache"


@pytest.fixture(scope="session")
def judges(tiny):
    """The three judges loaded from their folders, once (short transcripts: the random ASR never stops)."""
    folders, _ = tiny
    return SimpleNamespace(asr=Transcriber(folders["asr"], CPU, max_new_tokens=8),
                           speaker=SpeakerEncoder(folders["speaker"], CPU), text=TextScorer(folders["text_lm"], CPU))


@pytest.fixture(scope="session")
def speech() -> torch.Tensor:
    """[S] 16 kHz: 7 s of LibriVox speech, or without pocketsphinx-testdata a synthetic voiced signal."""
    if LIBRIVOX.is_file():
        from ttt_speech.data.audio import read_audio

        return read_audio(LIBRIVOX, 16000)[0]
    t = torch.arange(7 * 16000) / 16000
    pitch = 140 * (1 + 0.1 * torch.sin(2 * math.pi * 3 * t))
    return 0.3 * torch.sin(2 * math.pi * pitch * t) * torch.sin(math.pi * t) ** 2


@pytest.fixture
def no_network(monkeypatch):
    """Offline in the tiny cache, and any connection attempt fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"a judge tried to reach the network: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    return lambda cache: go_offline(monkeypatch, cache)


def test_make_judges_writes_small_models(tiny, tmp_path):
    from make_local_judges import REPO_IDS, main

    folders, cache = tiny
    for name, folder in folders.items():
        assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
        assert sum(f.stat().st_size for f in folder.iterdir()) < 3e6, name
        snapshot = next((cache / f"models--{REPO_IDS[name].replace('/', '--')}" / "snapshots").iterdir())
        assert sorted(p.name for p in snapshot.iterdir()) == sorted(p.name for p in folder.iterdir())
    assert main([str(tmp_path / "out"), "--hub-cache", str(tmp_path / "cache")]) == 0  # the CLI, same bytes
    assert (tmp_path / "out/asr/model.safetensors").read_bytes() == (folders["asr"] / "model.safetensors").read_bytes()


def test_default_ids_load_offline_from_the_hub_cache(tiny, no_network, speech):
    _, cache = tiny
    no_network(cache)
    for source in (DEFAULT_ASR, DEFAULT_SPEAKER, DEFAULT_TEXT_LM):
        check_judge(source, WHERE)
    [transcript] = Transcriber(DEFAULT_ASR, CPU, max_new_tokens=4).transcribe([speech], 16000)
    embeddings = SpeakerEncoder(DEFAULT_SPEAKER, CPU).embed([speech, speech[:16000]], 16000)
    [(nll, count)] = TextScorer(DEFAULT_TEXT_LM, CPU).nll(["the quick brown fox"])
    assert isinstance(transcript, str) and transcript
    assert embeddings.shape == (2, 16) and embeddings.dtype == torch.float32
    assert count > 0 and nll > 0


def test_folders_load(judges, tiny, speech):
    folders, _ = tiny
    for folder in folders.values():
        check_judge(folder, WHERE)
    transcripts = judges.asr.transcribe([speech, speech[:20000]], 16000)
    embeddings = judges.speaker.embed([speech, speech[:20000], -speech], 16000)
    assert len(transcripts) == 2 and all(isinstance(t, str) and t for t in transcripts)
    assert embeddings.shape == (3, 16)
    torch.testing.assert_close(embeddings.norm(dim=-1), torch.ones(3))


def test_check_judge_refuses_a_missing_id_in_one_line(tiny, no_network):
    _, cache = tiny
    no_network(cache)
    with pytest.raises(ValueError) as e:
        check_judge("org/not-downloaded", WHERE)
    message = str(e.value)
    assert "\n" not in message
    for part in (WHERE, "org/not-downloaded", "hf download org/not-downloaded", str(cache), f"{WHERE}=null"):
        assert part in message
    with pytest.raises(ValueError, match=f"^{WHERE}: the judge /no/such/folder is neither a folder nor a hub repo id"):
        check_judge("/no/such/folder", WHERE)


def test_check_judge_refuses_incomplete_judges(tiny, tmp_path, no_network):
    from make_local_checkpoint import cache_as_hub

    folders, _ = tiny
    no_weights = tmp_path / "no_weights"
    shutil.copytree(folders["speaker"], no_weights)
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(ValueError, match=f"folder {no_weights} has no weights"):
        check_judge(no_weights, WHERE)
    with pytest.raises(ValueError, match="has no config.json"):
        check_judge(tmp_path, WHERE)
    # a snapshot without its weights (a partial download, the hub's tree listing not cached)
    cache_as_hub(no_weights, tmp_path / "cache", "org/partial")
    no_network(tmp_path / "cache")
    with pytest.raises(ValueError, match="org/partial is no folder and has a snapshot that has no weights"):
        check_judge("org/partial", WHERE)
    # an index whose shards are not all there
    sharded = tmp_path / "sharded"
    shutil.copytree(folders["speaker"], sharded)
    (sharded / "model.safetensors").rename(sharded / "model-00001-of-00002.safetensors")
    (sharded / "model.safetensors.index.json").write_text(
        '{"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}')
    with pytest.raises(ValueError, match="misses weight shards model-00002-of-00002.safetensors"):
        check_judge(sharded, WHERE)


def test_a_judge_that_cannot_load_is_one_line(tiny, no_network):
    folders, cache = tiny
    no_network(cache)
    with pytest.raises(ValueError, match="^cannot load the ASR judge org/not-downloaded: [^\n]*$"):
        Transcriber("org/not-downloaded", CPU)
    with pytest.raises(ValueError, match=f"^cannot load the text LM judge {folders['speaker']}: [^\n]*$"):
        TextScorer(folders["speaker"], CPU)  # a folder of another kind: no tokenizer


def test_speaker_similarity(judges, speech):
    noise = torch.randn(speech.shape, generator=torch.Generator().manual_seed(0)) * 0.1
    e = judges.speaker.embed([speech, speech, noise], 16000)
    assert float(e[0] @ e[1]) == pytest.approx(1.0, abs=1e-6)
    assert float(e[0] @ e[2]) < 1 - 1e-3
    # a waveform's embedding does not depend on the batch (no padding: WavLM group-normalises over time)
    [alone] = judges.speaker.embed([speech[:20000]], 16000)
    torch.testing.assert_close(judges.speaker.embed([speech, speech[:20000]], 16000)[1], alone)
    # any rate: resampled to 16 kHz
    assert judges.speaker.embed([speech[:24000]], 24000).shape == (1, 16)
    with pytest.raises(ValueError, match="shorter than 0.5 s"):
        judges.speaker.embed([speech, speech[:4000]], 16000)


def test_text_scorer_batched_equals_one_at_a_time(judges):
    texts = ["the quick brown fox jumps over the lazy dog", "", "hello", "a long conversation needs a memory",
             "She read the story aloud, and he wrote down every word of it!"]
    batched = judges.text.nll(texts)
    for text, (nll, count) in zip(texts, batched):
        [(alone, alone_count)] = judges.text.nll([text])
        assert count == alone_count == len(judges.text.tokenizer(text, add_special_tokens=False).input_ids)
        assert nll == pytest.approx(alone, abs=1e-5)
    assert batched[1] == (0.0, 0)
    assert all(nll > 0 for nll, count in batched if count)
    # Qwen2.5's tokenizer has no BOS: each text is scored after EOS
    assert judges.text.tokenizer.bos_token_id is None and judges.text.start == judges.text.tokenizer.eos_token_id


def test_transcriber_batches_and_cuts(judges, speech, monkeypatch):
    generated = []
    generate = judges.asr.model.generate

    def spy(features, **kwargs):
        ids = generate(features, **kwargs)
        generated.append((features.shape[0], ids.shape[1]))
        return ids

    monkeypatch.setattr(judges.asr.model, "generate", spy)
    long = speech.repeat(math.ceil(45 * 16000 / len(speech)))[:45 * 16000]  # 45 s at Whisper's 16 kHz
    # the two pieces as one batch of two waveforms: the same generate() call's numbers as the cut one's (at
    # Whisper's own rate, so that no resampling edge makes the pieces differ by a rounding)
    first, second = judges.asr.transcribe([long[:30 * 16000], long[30 * 16000:]], 16000)
    generated.clear()
    [whole] = judges.asr.transcribe([long], 16000)  # 45 s: two pieces, 30 s and 15 s
    assert generated == [(2, 8)]  # one generate() call, at most max_new_tokens per piece
    assert whole == f"{first} {second}"
    generated.clear()
    silent = judges.asr.transcribe([torch.zeros(16000), torch.zeros(0)], 16000)
    assert silent == ["", ""] and generated == []  # nothing to transcribe: no generate() call
    assert judges.asr.transcribe([], 16000) == []


def test_transcriber_without_a_forced_language(judges, speech, monkeypatch):
    monkeypatch.setattr(judges.asr, "language", None)  # Whisper detects it (the tiny one knows every language)
    [transcript] = judges.asr.transcribe([speech], 16000)
    assert isinstance(transcript, str)
