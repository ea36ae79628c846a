"""Every command offline against a moshi-format checkpoint on disk (issue 21; `local_checkpoint` in
tests/conftest.py: scripts/make_local_checkpoint.py's random checkpoint in Kyutai's layout).

HF_HUB_OFFLINE=1 with an empty hub cache, so that only the checkpoint's local files can be read (the
model: section's moshi_weights, mimi_weights, config_path, text_tokenizer, or an export recording
them); `--model` of generate / serve / data encode names org/moshi-tiny in a hub-layout cache of
the same files, or the checkpoint folder itself. No connection off this machine is let
through either. Sizes are the other tests': a few frames, 4 steps, chunks of 16.
"""
import json
import re
import socket
from pathlib import Path

import numpy as np
import pytest
import sphn
import torch
import yaml
from safetensors.torch import load_file

from conftest import go_offline, local_files
from train_utils import make_corpus, write_config
from ttt_speech.cli import main
from ttt_speech.data.codes import load_codes

LIBRIVOX = Path("/usr/share/pocketsphinx/test/data/librivox/sense_and_sensibility_01_austen_64kb-0870.wav")
PNG = b"\x89PNG\r\n\x1a\n"
RATE, FRAME = 24000, 1920  # Mimi's sample rate and frame size
BASE = "kyutai/moshiko-pytorch-bf16"  # the name a model: section with every file local gives


@pytest.fixture(autouse=True, scope="module")
def no_network():
    """A connection to anything but this machine fails (whatever would try it: hub, wandb, ...)."""
    real = {name: getattr(socket.socket, name) for name in ("connect", "connect_ex")}

    def guarded(name):
        def call(self, address):
            if self.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in ("127.0.0.1", "::1"):
                raise OSError(f"test_offline_commands: no network (connect to {address})")
            return real[name](self, address)
        return call

    with pytest.MonkeyPatch.context() as mp:
        for name in real:
            mp.setattr(socket.socket, name, guarded(name))
        yield


def sweep(path: Path, seconds: float, seed: int = 0) -> Path:
    """A wav of a rising tone in a syllable-rate envelope with a little noise: audio whose codes vary."""
    t = np.arange(int(seconds * RATE)) / RATE
    noise = np.random.default_rng(seed).standard_normal(t.size)
    pcm = 0.3 * np.sin(2 * np.pi * (200 + 300 * t) * t) * (1 + np.sin(2 * np.pi * 3 * t)) / 2 + 0.02 * noise
    sphn.write_wav(str(path), pcm.astype(np.float32), RATE)
    return path


def speech_manifest(root: Path) -> Path:
    """A manifest of one real recording (7 s of LibriVox), encoded by each command with the checkpoint's Mimi."""
    if not LIBRIVOX.is_file():
        pytest.skip("needs Debian's pocketsphinx-testdata")
    manifest = root / "speech.jsonl"
    manifest.write_text(json.dumps({"path": str(LIBRIVOX)}) + "\n")
    return manifest


def cached_codes(cache: Path):
    """The one code file a command wrote into the codes cache `cache`, and its codec folder's name."""
    files = list(cache.rglob("*.safetensors"))
    assert len(files) == 1, files
    return load_codes(files[0]), files[0].relative_to(cache).parts[0]


@pytest.fixture(scope="module")
def trained(local_checkpoint, tmp_path_factory):
    """The run folder of `ttt-speech train` from the checkpoint's local files, offline with an empty hub
    cache: 4 steps of `trainable: ttt` (gates from 0.5) on a tiny synthetic corpus."""
    folder, _, _ = local_checkpoint
    root = tmp_path_factory.mktemp("train")
    config = write_config(root, make_corpus(root), trainable="ttt",
                          model={"name": BASE, "device": "cpu", **local_files(folder)})
    with pytest.MonkeyPatch.context() as mp:
        go_offline(mp, root / "empty-cache")
        assert main(["train", str(config), "--quiet"]) == 0
    return root / "run"


def test_train_offline_from_local_files_writes_an_export_that_inspect_and_load_read(
        trained, local_checkpoint, offline, tmp_path, capsys):
    from ttt_speech.export import load_exported_lm

    folder, _, _ = local_checkpoint
    export = trained / "export"
    assert sorted(p.name for p in export.iterdir()) == ["model.json", "ttt.safetensors", "ttt_config.json"]
    losses = [json.loads(line)["loss"] for line in (trained / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert len(losses) == 4 and losses[-1] < losses[0]
    meta = json.loads((export / "model.json").read_text())
    assert meta["trainable"] == "ttt" and meta["ttt"]
    assert {k: meta["model"][k] for k in local_files(folder)} == local_files(folder)  # the files it was trained from

    offline(tmp_path / "empty-cache")
    capsys.readouterr()
    assert main(["inspect", str(export)]) == 0
    out = capsys.readouterr().out
    assert re.search(rf"^base model +{BASE}\b", out, re.M), out
    assert re.search(r"^trainable +ttt$", out, re.M) and re.search(r"^patched layers +0-3 \(4 of 4\)", out, re.M), out

    lm, config = load_exported_lm(export)
    assert config.moshi_weights == Path(local_files(folder)["moshi_weights"])
    state, written = lm.state_dict(), load_file(local_files(folder)["moshi_weights"])
    ttt = load_file(str(export / "ttt.safetensors"))
    assert set(state) == set(written) | set(ttt) and not set(written) & set(ttt)
    assert all(torch.equal(state[k], v) for k, v in written.items())  # the checkpoint's weights, untouched
    assert all(torch.equal(state[k], v) for k, v in ttt.items())  # the trained TTT weights
    gates = [v for k, v in ttt.items() if k.endswith("gate_alpha")]
    assert len(gates) == 4 and max((g - 0.5).abs().max().item() for g in gates) > 1e-3  # trained, not fresh


def test_eval_length_gen_offline_from_local_files(local_checkpoint, offline, tmp_path):
    folder, _, _ = local_checkpoint
    manifest = speech_manifest(tmp_path)
    offline(tmp_path / "empty-cache")
    config = tmp_path / "eval.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"name": BASE, "device": "cpu", **local_files(folder)},
        "ttt": {"mini_batch_size": 4, "gate_init": 0.5},
        "data": {"manifest": str(manifest), "codes_cache": str(tmp_path / "codes"), "max_frames": 64},
        "eval": {"chunk_size": 16, "train_window": 16, "bin_frames": 16, "positions": [32], "position_window": 16,
                 "gain_window": 16},
        "output_dir": str(tmp_path / "out")}))
    assert main(["eval", "length-gen", str(config), "--quiet", "--baseline"]) == 0
    results = json.loads((tmp_path / "out" / "length_gen.json").read_text())
    assert set(results) == {"ttt", "baseline"} and results["ttt"]["streams"][0]["frames"] == 64
    curves = {name: {p["length"]: p["cumulative"]["ppl"] for p in r["groups"]["cb1"]["points"] if "cumulative" in p}
              for name, r in results.items()}
    assert min(curves["ttt"]) == 8 and max(curves["ttt"]) == 62 and all(1 < v < 1e6 for v in curves["ttt"].values())
    assert curves["ttt"] != curves["baseline"]  # the TTT layers act
    assert (tmp_path / "out" / "length_gen.png").read_bytes()[:8] == PNG
    codes, codec = cached_codes(tmp_path / "codes")
    assert codec.startswith("mimi-local-") and all(len(set(row.tolist())) > 10 for row in codes.codes)  # speech


def test_eval_memory_offline_of_the_trained_export_and_its_base(trained, offline, tmp_path):
    manifest = speech_manifest(tmp_path)
    offline(tmp_path / "empty-cache")
    config = tmp_path / "memory.yaml"
    config.write_text(yaml.safe_dump({  # model: null: the export's base model, i.e. the checkpoint's local files
        "models": [{"name": "trained", "export": str(trained / "export")}, {"name": "base"}],
        "data": {"manifest": str(manifest), "codes_cache": str(tmp_path / "codes")},
        "segment_frames": 32, "output_dir": str(tmp_path / "out")}))
    assert main(["eval", "memory", str(config), "--quiet"]) == 0
    report = json.loads((tmp_path / "out" / "memory.json").read_text())
    assert report["data"]["counts"] == {"streams": 1, "left_out": 0, "files_skipped": 0}
    assert report["models"]["trained"]["chunk_size"] == 16
    trained_result, base = report["results"]["trained"], report["results"]["base"]
    assert trained_result["carried_state"] and not trained_result["post_equals_pre"]
    assert base["post_equals_pre"] and not base["carried_state"]
    cb1 = trained_result["groups"]["cb1"]
    assert 1 < cb1["pre"]["ppl"] < 1e6 and cb1["delta"] != 0
    assert (tmp_path / "out" / "memory.png").read_bytes()[:8] == PNG
    codes, codec = cached_codes(tmp_path / "codes")
    assert codec.startswith("mimi-local-") and all(len(set(row.tolist())) > 10 for row in codes.codes)


@pytest.mark.parametrize("source", ["export", "repo"])
def test_generate_offline_from_the_trained_export_and_from_a_repo_id_in_the_cache(
        source, local_checkpoint, offline, tmp_path, request):
    _, cache, repo = local_checkpoint
    if source == "export":  # the export names the checkpoint's files: nothing cached
        offline(tmp_path / "empty-cache")
        model = ["--export", str(request.getfixturevalue("trained") / "export")]
    else:
        offline(cache)
        model = ["--model", repo]
    prompt = sweep(tmp_path / "a.wav", 0.4)
    assert main(["generate", str(prompt), "--out", str(tmp_path / "out"), "--device", "cpu", "--max-duration", "0.4",
                 "--quiet", *model]) == 0
    pcm, rate = sphn.read(str(tmp_path / "out" / "a.wav"))
    assert rate == RATE and pcm.shape == (1, 5 * FRAME) and pcm.std() > 1e-4
    recording = load_codes(tmp_path / "out" / "a.safetensors")
    assert recording.codes.shape == (8, 5) and len(set(recording.codes.flatten().tolist())) > 5
    assert "random" not in recording.codec  # the checkpoint's Mimi, not the tiny model's


def test_data_encode_offline_from_a_repo_id_in_the_cache_and_with_local_mimi_weights(local_checkpoint, offline,
                                                                                      tmp_path):
    folder, cache, repo = local_checkpoint
    offline(cache)
    manifest = tmp_path / "audio.jsonl"
    manifest.write_text(json.dumps({"path": str(sweep(tmp_path / "a.wav", 1.0))}) + "\n")
    codes = {}
    routes = {"hub": [repo], "local": [repo, "--mimi-weights", local_files(folder)["mimi_weights"]],
              "folder": [str(folder)]}
    for name, model in routes.items():
        out = tmp_path / f"{name}.jsonl"
        assert main(["data", "encode", str(manifest), str(out), "--cache", str(tmp_path / name), "--model", *model,
                     "--device", "cpu", "--quiet"]) == 0
        entries = [json.loads(line) for line in out.read_text().splitlines()]
        assert len(entries) == 1 and entries[0]["duration"] == pytest.approx(1.04)
        codes[name], codec = cached_codes(tmp_path / name)
        assert codes[name].codes.shape == (8, 13) and all(len(set(row.tolist())) > 4 for row in codes[name].codes)
        assert codec.startswith("mimi-org" if name == "hub" else "mimi-local-")
    assert torch.equal(codes["hub"].codes, codes["local"].codes)  # the same weights, by every route
    assert torch.equal(codes["hub"].codes, codes["folder"].codes)


def test_a_codec_that_cannot_load_offline_is_one_error_not_bad_audio(local_checkpoint, offline, tmp_path, capsys):
    """A codec that cannot be loaded (a repo not cached at all; Mimi not local nor cached): the command
    stops on that, once; its audio files are not "bad files" (data encode told to --skip-bad them and
    then skipped every one; eval skipped every book)."""
    folder, cache, _ = local_checkpoint
    offline(cache)
    manifest = tmp_path / "audio.jsonl"
    manifest.write_text(json.dumps({"path": str(sweep(tmp_path / "a.wav", 0.4))}) + "\n")
    for extra in ([], ["--skip-bad"]):
        capsys.readouterr()
        assert main(["data", "encode", str(manifest), str(tmp_path / "out.jsonl"), "--cache", str(tmp_path / "codes"),
                     "--model", "org/not-cached", "--device", "cpu", "--quiet", *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert "org/not-cached" in err and "skip" not in err and "no file could be encoded" not in err, err
        assert not (tmp_path / "out.jsonl").exists()

    offline(tmp_path / "empty-cache")  # the LM's files local, Mimi's from the (empty) cache of the base repo
    files = {k: v for k, v in local_files(folder).items() if k != "mimi_weights"}
    config = tmp_path / "eval.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"name": BASE, "device": "cpu", **files}, "data": {"manifest": str(manifest), "codes_cache": str(
            tmp_path / "codes")}, "eval": {"chunk_size": 16, "train_window": 16}, "output_dir": str(tmp_path / "out")}))
    assert main(["eval", "length-gen", str(config), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "cannot be loaded" in err and "no stream left" not in err and "skipping" not in err, err


def test_serve_an_export_offline_answers_a_client_session(trained, tmp_path, capsys):
    from ttt_speech.data.audio import read_audio
    from ttt_speech_apps.serve.process import ServerProcess

    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "empty-cache"),
           "OMP_NUM_THREADS": "1", "NO_TORCH_COMPILE": "1"}  # one thread: the test process computes too (2 cores)
    server = ServerProcess(["--export", str(trained / "export"), "--device", "cpu", "--sessions",
                            str(tmp_path / "sessions")], timeout=120, env=env)
    try:
        wav = sweep(tmp_path / "in.wav", 1.0)
        assert main(["client", str(wav), "--out", str(tmp_path / "reply.wav"), "--url", server.url, "--fast"]) == 0
    finally:
        code = server.stop()
    assert code == 0, server.log()
    assert "sent 1.04 s (13 frames)" in capsys.readouterr().err
    reply = read_audio(tmp_path / "reply.wav", RATE)[0]
    assert reply.shape[0] >= 10 * FRAME and reply.std() > 1e-4  # Moshi spoke: audio, not silence
    assert "anonymous stream: closed after 13 frames" in server.log(), server.log()
