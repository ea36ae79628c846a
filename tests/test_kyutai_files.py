"""The files one load reads of a Kyutai checkpoint (ttt_speech/kyutai_files.py), offline: only those
(Mimi without the LM), optional names (null lora_name / mimi_config_name) left out, legacy
checkpoints without config.json (Moshi-7B, moshi's default names) in a folder and in a hub cache,
and one line naming the file that is missing."""
import json
import os
import warnings
from pathlib import Path

import pytest
import torch

from make_local_checkpoint import MIMI_NAME, MOSHI_NAME, TOKENIZER_NAME, cache_as_hub
from safetensors.torch import save_file

from ttt_speech.cli import main

MOSHI_7B_NORMS = {"out_norm.alpha": (1, 1, 4096), "depformer.layers.0.norm1.alpha": (1, 1, 1024)}  # Moshi-7B's shapes


def linked(source: Path, out: Path, config: dict | None, skip: tuple[str, ...] = ()) -> Path:
    """A copy of the checkpoint `source` by hard links, with `config` as its config.json (None: none)."""
    out.mkdir()
    for file in source.iterdir():
        if file.name != "config.json" and file.name not in skip:
            os.link(file, out / file.name)
    if config is not None:
        (out / "config.json").write_text(json.dumps(config))
    return out


def config_of(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


def test_optional_names_that_are_null_are_left_out_and_a_named_lora_is_read_only_with_the_lm(local_checkpoint,
                                                                                            tmp_path, offline):
    from ttt_speech.kyutai_files import checkpoint_files
    from ttt_speech.models import ModelConfig, load_lm, load_mimi

    source, _, _ = local_checkpoint
    offline(tmp_path / "empty-cache")
    folder = linked(source, tmp_path / "nulls", {**config_of(source), "lora_name": None, "mimi_config_name": None})
    for reads in ("moshi_weights", "mimi_weights", "tokenizer", "config"):
        files = checkpoint_files(str(folder), {}, reads)
        assert "lora_weights" not in files and "mimi_config_path" not in files
        assert all(not str(path).startswith("<") for key, path in files.items() if key == reads)
    config = ModelConfig(name=str(folder), device="cpu")
    assert load_lm(config).text_card == 40 and load_mimi(config).num_codebooks == 8

    folder = linked(source, tmp_path / "lora", {**config_of(source), "lora_name": "lora.safetensors"})
    config = ModelConfig(name=str(folder), device="cpu")
    assert load_mimi(config).num_codebooks == 8  # the LoRA file is the LM's: Mimi does not need it
    with pytest.raises(ValueError, match=r"has no lora.safetensors \(config.json's lora_name\)$"):
        load_lm(config)


def test_mimi_loads_offline_from_a_hub_cache_without_the_lm_which_is_one_line(local_checkpoint, tmp_path, offline):
    from ttt_speech.models import ModelConfig, load_lm, load_mimi, load_text_tokenizer

    source, _, _ = local_checkpoint
    partial = linked(source, tmp_path / "partial", config_of(source), skip=(MOSHI_NAME, TOKENIZER_NAME))
    cache_as_hub(partial, tmp_path / "hf-cache", "org/codec-only")
    offline(tmp_path / "hf-cache")
    config = ModelConfig(name="org/codec-only", device="cpu")
    codes = load_mimi(config).encode(0.1 * torch.randn(1, 1, 4 * 1920, generator=torch.Generator().manual_seed(0)))
    assert codes.shape == (1, 8, 4) and len(set(codes.flatten().tolist())) > 4
    with pytest.raises(ValueError, match=rf"^model.name: {MOSHI_NAME} of hub repo org/codec-only is not in the local "
                                         r"cache .* while HF_HUB_OFFLINE is set"):
        load_lm(config)
    with pytest.raises(ValueError, match=rf"^model.name: {TOKENIZER_NAME} of hub repo org/codec-only is not"):
        load_text_tokenizer(config)
    with pytest.raises(ValueError, match=r"^model.name: config.json of hub repo org/elsewhere is not in the local"):
        load_mimi(ModelConfig(name="org/elsewhere", device="cpu"))


@pytest.mark.parametrize("where", ["folder", "hub cache"])
def test_a_legacy_checkpoint_without_config_json_is_moshi_7b(local_checkpoint, tmp_path, offline, where):
    """moshi's loaders take a repo without config.json for Moshi-7B with its default file names; offline,
    such a repo is told from an uncached config.json by its default files being there."""
    from ttt_speech.models import ModelConfig, load_lm, load_mimi, load_text_tokenizer

    source, _, _ = local_checkpoint
    folder = linked(source, tmp_path / "legacy", None)
    assert {MOSHI_NAME, MIMI_NAME, TOKENIZER_NAME} <= {p.name for p in folder.iterdir()}
    if where == "hub cache":
        cache_as_hub(folder, tmp_path / "hf-cache", "org/legacy")
        offline(tmp_path / "hf-cache")
        name = "org/legacy"
    else:  # its LM file is checked against Moshi-7B's shapes: a few of its tensors stand in for the 15 GB
        offline(tmp_path / "empty-cache")
        (folder / MOSHI_NAME).unlink()
        save_file({key: torch.zeros(shape) for key, shape in MOSHI_7B_NORMS.items()}, str(folder / MOSHI_NAME))
        name = str(folder)
    config = ModelConfig(name=name, device="cpu")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lm = load_lm(config, device=torch.device("meta"))  # the architecture only: Moshi-7B's
        assert load_mimi(config).num_codebooks == 8 and load_text_tokenizer(config).vocab_size() == 40
    assert lm.dim == 4096 and lm.n_q == 16 and lm.dep_q == 8
    assert any("no config.json: a legacy checkpoint, taken for Moshi-7B" in str(w.message) for w in caught)


def test_a_folder_whose_config_json_is_missing_is_one_line_before_any_model_is_built(local_checkpoint, tmp_path,
                                                                                    capsys):
    """Without config.json a folder is taken for Moshi-7B; the tiny checkpoint's LM is not one, which
    is said when the config is read (not in load_state_dict, after a dim-4096 model was built)."""
    source, _, _ = local_checkpoint
    folder = linked(source, tmp_path / "no-config", None)
    out = tmp_path / "out"
    assert main(["eval", "length-gen", "eval_tiny", f"model.name={folder}", "model.tiny={}", "model.device=cpu",
                 f"output_dir={out}", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"model.name: {folder}: config.json missing; without one a folder is taken for Moshi-7B, but its " \
           f"{MOSHI_NAME} is another model (its emb.0.weight is [2049, 128], Moshi-7B's [2049, 4096])" in err
    assert err.count("\n") == 1 and not out.exists()
