"""Fine-tuning with E2E layers (first order and `trainable: e2e-meta`) and LoRA with every flavour."""
import json

import pytest
import torch

from train_utils import make_corpus, write_config
from ttt_speech import TTTModel
from ttt_speech.export import load_exported_lm
from ttt_speech.moshi.teacher_forcing import ChunkModel
from ttt_speech_apps.finetune.config import load_train_config
from ttt_speech_apps.finetune.model import build_model
from ttt_speech_apps.finetune.cli import main as train_main

E2E = {"layer_type": "e2e_mlp", "mode": "hybrid", "mini_batch_size": 4, "gate_init": 0.5}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus"))


def losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


@pytest.mark.parametrize("override,message", [
    ("data.window_frames=10", "data.window_frames: 10 frames is not a multiple of the E2E mini-batch size (4)"),
    ("data.window_frames=4", "meta-training needs >= 2 mini-batches per window"),
    ("gradient_checkpointing=true", "gradient_checkpointing: not available with e2e_mlp"),
    ("ttt.layer_type=linear", "trainable: 'e2e-meta' meta-trains E2E layers; it needs ttt.layer_type: e2e_mlp"),
    ("ttt.mode=replace", "TTTConfig.mode: e2e_mlp adds an MLP beside the layer's own"),
])
def test_bad_e2e_configs_name_the_field(tmp_path, corpus, capsys, override, message):
    path = write_config(tmp_path, corpus, ttt=E2E, trainable="e2e-meta")
    assert train_main([str(path), override, "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("trainable,expected", [
    ("e2e-meta", "all"), ("e2e-meta+lora", "e2e+lora"), ("ttt", "e2e"), ("full", "all")])
def test_trainable_selects_the_parameters(tmp_path, corpus, trainable, expected):
    config = load_train_config(write_config(tmp_path, corpus, ttt=E2E, trainable=trainable, **{"lora.rank": 1}))
    lm = build_model(config, torch.device("cpu"))
    trained = {n for n, p in lm.named_parameters() if p.requires_grad}
    e2e = {n for n in trained if ".ttt_branch." in n}
    lora = {n for n in trained if ".lora_" in n}
    if expected == "all":
        assert trained == {n for n, _ in lm.named_parameters()}
    else:
        assert e2e and trained == e2e | (lora if "lora" in expected else set())
        assert ("lora" in expected) == bool(lora)
    assert config.meta == trainable.startswith("e2e-meta")


def test_meta_training_runs_resumes_exactly_and_exports(tmp_path, corpus):
    """e2e-meta+lora with TinyLoRA rank 1: 4 steps == 2 + resume + 2; the export reloads as E2E."""
    common = dict(ttt=E2E, trainable="e2e-meta+lora", **{"lora.rank": 1, "data.eval_manifest": str(corpus["eval"])})
    one = write_config(tmp_path / "a", corpus, output_dir=str(tmp_path / "a" / "run"), **common)
    assert train_main([str(one), "--quiet"]) == 0
    two = write_config(tmp_path / "b", corpus, output_dir=str(tmp_path / "b" / "run"), steps=2, **common)
    assert train_main([str(two), "--quiet"]) == 0
    assert train_main([str(two), "steps=4", "--resume", str(tmp_path / "b" / "run"), "--quiet"]) == 0
    full = losses(tmp_path / "a" / "run")
    assert len(full) == 4 and losses(tmp_path / "b" / "run") == full
    stats = (tmp_path / "a" / "run" / "ttt_stats.csv").read_text().splitlines()
    assert len(stats) == 1 + 4 and all(float(row.split(",")[-1]) > 0 for row in stats[1:])  # η logged
    lm, _ = load_exported_lm(tmp_path / "a" / "run" / "export")
    assert TTTModel.of(lm).has_e2e and any(".lora_A." in n for n, _ in lm.named_parameters())


@pytest.mark.parametrize("layer_type", ["linear", "mlp", "e2e_mlp"])
def test_tiny_lora_with_every_flavour(tmp_path, corpus, layer_type):
    """ttt+lora at rank 1 trains and exports with each TTT flavour; the adapters moved from zero."""
    ttt = {**E2E, "layer_type": layer_type}
    path = write_config(tmp_path, corpus, ttt=ttt, trainable="ttt+lora", steps=2, **{"lora.rank": 1,
                                                                                      "optim.lr": 1e-2})
    assert train_main([str(path), "--quiet"]) == 0
    lm, _ = load_exported_lm(tmp_path / "run" / "export")
    lora_b = [p for n, p in lm.named_parameters() if ".lora_B." in n]
    assert lora_b and all(p.shape[1] == 1 for p in lora_b) and any(p.abs().max() > 0 for p in lora_b)


def test_meta_trained_export_holds_every_weight(tmp_path, corpus):
    """e2e-meta trains every parameter: the export must carry them all (the reloaded model gives
    the run's final held-out loss exactly)."""
    from ttt_speech.data.manifest import read_manifest
    from ttt_speech_apps.finetune.distributed import Dist
    from ttt_speech_apps.finetune.train import evaluate

    path = write_config(tmp_path, corpus, ttt=E2E, trainable="e2e-meta", steps=2,
                        **{"data.eval_manifest": str(corpus["eval"]), "optim.lr": 1e-2})
    assert train_main([str(path), "--quiet"]) == 0
    run = tmp_path / "run"
    assert (run / "export" / "model.safetensors").is_file()
    final = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]["eval_loss"]
    lm, _ = load_exported_lm(run / "export")
    config = load_train_config(path)
    reloaded = evaluate(ChunkModel(lm), read_manifest(config.data.eval_manifest, "eval"), config, Dist())["eval_loss"]
    assert abs(reloaded - final) < 1e-6
    from ttt_speech.models import ModelConfig

    with pytest.raises(ValueError, match="does not fit the model 'tiny'"):  # another architecture: one clear line
        load_exported_lm(run / "export", model=ModelConfig(name="tiny", tiny={"dim": 64, "num_layers": 2}))
