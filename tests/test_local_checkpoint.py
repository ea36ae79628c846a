"""A moshi-format checkpoint on disk (scripts/make_local_checkpoint.py: Kyutai's repository layout,
random weights) run offline: every file local with HF_HUB_OFFLINE=1, and `org/repo` resolved from a
hub-layout cache. moshi's `CheckpointInfo.from_hf_repo` fetched the text tokenizer from the hub
unless it was passed: offline, that was an error even with every file local."""
import json
from pathlib import Path

import pytest
import torch

from conftest import local_files

LIBRIVOX = Path("/usr/share/pocketsphinx/test/data/librivox/sense_and_sensibility_01_austen_64kb-0870.wav")


def test_the_checkpoint_has_kyutais_layout(local_checkpoint):
    folder, _, _ = local_checkpoint
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "moshi" and config["dep_q"] == 8 and config["n_q"] == 16
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["config.json", config["moshi_name"], config["mimi_name"], config["tokenizer_name"]])


def test_every_file_local_loads_offline_and_the_hub_cache_resolves_org_repo(local_checkpoint, offline, tmp_path):
    from safetensors.torch import load_file

    from ttt_speech.models import ModelConfig, load_lm, load_mimi, load_text_tokenizer

    folder, cache, repo = local_checkpoint
    offline(tmp_path / "empty-cache")  # nothing cached: only the local files can be read
    config = ModelConfig(name="kyutai/moshiko-pytorch-bf16", device="cpu", **local_files(folder))
    written = load_file(str(folder / json.loads((folder / "config.json").read_text())["moshi_name"]))
    lm = load_lm(config)
    assert lm.text_card == 40 and all(torch.equal(v, written[k]) for k, v in lm.state_dict().items())
    tokenizer = load_text_tokenizer(config)
    assert tokenizer.vocab_size() == 40 and tokenizer.encode("the quick fox")
    mimi = load_mimi(config)
    codes = mimi.encode(0.1 * torch.randn(1, 1, 4 * 1920, generator=torch.Generator().manual_seed(0)))
    assert len(set(codes.flatten().tolist())) > 4  # the codebooks are fitted: codes carry the audio

    offline(cache)
    hub = ModelConfig(name=repo, device="cpu")
    assert all(torch.equal(v, written[k]) for k, v in load_lm(hub).state_dict().items())
    assert load_text_tokenizer(hub).vocab_size() == 40


def test_eval_librilight_runs_offline_from_local_files(local_checkpoint, offline, tmp_path, capsys):
    """The command users run on a cluster: every file local, HF_HUB_OFFLINE=1, both modes + baseline."""
    import yaml

    from ttt_speech.cli import main

    if not LIBRIVOX.is_file():
        pytest.skip("needs Debian's pocketsphinx-testdata")
    folder, _, _ = local_checkpoint
    offline(tmp_path / "empty-cache")
    (tmp_path / "m.jsonl").write_text(json.dumps({"path": str(LIBRIVOX)}) + "\n")
    config = tmp_path / "eval.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"name": "kyutai/moshiko-pytorch-bf16", "device": "cpu", **local_files(folder)},
        "ttt": {"mini_batch_size": 4, "gate_init": 0.5},
        "data": {"manifest": str(tmp_path / "m.jsonl"), "codes_cache": str(tmp_path / "codes"), "max_frames": 48},
        "eval": {"mode": "both", "baseline": True, "chunk_size": 16, "positions": [32], "position_window": 16,
                 "bin_frames": 16, "gain_window": 16, "native_max_frames": 24},
        "output_dir": str(tmp_path / "out")}))
    assert main(["eval", "librilight", str(config), "--quiet"]) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert set(report["runs"]) == {"ttt/chunked", "ttt/native", "baseline/chunked", "baseline/native"}
    assert report["comparisons"]["modes"]["ttt"]["max_abs"] < 1e-4
    assert report["data"]["codes"]["distinct_max"] > 10  # real speech through the checkpoint's Mimi
