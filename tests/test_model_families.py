"""Kyutai's model families on moshi's LMModel (config.json's model_type: moshi, hibiki, stt, tts),
from checkpoints in Kyutai's layout (scripts/make_local_checkpoint.py --model-type): the library
patches and streams each one with its own condition tensors and cross-attention; the commands run
Moshi's family (a checkpoint folder as model.name, bf16 weights with float32 TTT state) and refuse
the others in one line, before the weights are read (ttt_speech/families.py)."""
import json
from pathlib import Path

import pytest
import torch

FAMILIES = ("moshi", "hibiki", "stt", "tts")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """model_type (and "bf16": a moshi checkpoint of bfloat16 weights) → checkpoint folder; random
    weights, one Mimi written and hard-linked into the others."""
    from make_local_checkpoint import MIMI_NAME, make_checkpoint

    root = tmp_path_factory.mktemp("families")
    out = {"moshi": make_checkpoint(root / "moshi", seed=1)}
    for family in FAMILIES[1:]:
        out[family] = make_checkpoint(root / family, seed=1, model_type=family, mimi_from=out["moshi"] / MIMI_NAME)
    out["bf16"] = make_checkpoint(root / "bf16", seed=1, dtype="bfloat16", mimi_from=out["moshi"] / MIMI_NAME)
    return out


def build(folder: Path, dtype=torch.float32):
    """The checkpoint's LM as moshi's loaders build it, from the folder's files (no family check)."""
    from moshi.models import loaders

    from ttt_speech.kyutai_files import checkpoint_files

    info = loaders.CheckpointInfo.from_hf_repo(str(folder), **checkpoint_files(str(folder), {}, "moshi_weights"))
    return info.model_type, info.get_moshi(device="cpu", dtype=dtype)


def conditions(lm, model_type: str, batch: int):
    """(sum condition, cross-attention source) of each family, as moshi's run_inference / tts build them."""
    from moshi.conditioners import ConditionAttributes, TensorCondition

    if model_type == "hibiki":
        attributes = [ConditionAttributes(text={"description": "very_good"}, tensor={}) for _ in range(batch)]
    elif model_type == "tts":
        speaker = torch.randn(1, 5, 32, generator=torch.Generator().manual_seed(2))
        attributes = [ConditionAttributes(text={"control": "ok", "cfg": "2.0"}, tensor={
            "speaker_wavs": TensorCondition(speaker, torch.ones(1, 5, dtype=torch.bool))}) for _ in range(batch)]
    else:
        return None, None
    tensors = lm.condition_provider.prepare_and_provide(attributes)
    return lm.fuser.get_sum(tensors), lm.fuser.get_cross(tensors)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_patches_and_streams_with_its_conditions(folders, family):
    from ttt_speech.config import TTTConfig
    from ttt_speech.moshi.patch import patch_moshi

    model_type, lm = build(folders[family])
    assert model_type == family
    B, T = 2, 24
    summed, cross = conditions(lm, family, B)
    if family in ("hibiki", "tts"):
        assert summed is not None and summed.abs().sum() > 0
    if family == "tts":
        assert cross is not None and any("cross_attention" in n for n, _ in lm.named_parameters())
    codes = torch.randint(0, 30, (B, lm.num_codebooks, T), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        plain, _ = lm.forward_text(codes, summed, cross)
        if summed is not None:  # the conditions change the output: they are really used
            assert not torch.allclose(plain, lm.forward_text(codes, torch.zeros_like(summed), cross)[0], atol=1e-3)
        if cross is not None:
            assert not torch.allclose(plain, lm.forward_text(codes, summed, torch.zeros_like(cross))[0], atol=1e-3)
        patch_moshi(lm, TTTConfig(mini_batch_size=4, gate_init=0.0))
        assert torch.equal(lm.forward_text(codes, summed, cross)[0], plain)  # zero gate == unpatched, exactly
        _, gated = build(folders[family])
        patch_moshi(gated, TTTConfig(mini_batch_size=4, gate_init=0.5))
        full, _ = gated.forward_text(codes, summed, cross)
        assert (full - plain).abs().max() > 1e-2  # the TTT branch is live
        with gated.streaming(B):  # chunks off the mini-batch grid: 5 frames, b = 4
            chunks = [gated.forward_text(codes[:, :, t:t + 5], summed, cross)[0] for t in range(0, T, 5)]
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, atol=2e-5, rtol=0)


@pytest.mark.parametrize("family, reason", [("stt", "(dep_q = 0) predicts only the text stream"),
                                            ("tts", "conditioned on ['cfg', 'control', 'speaker_wavs']"),
                                            ("hibiki", "conditioned on ['description'] (sum: description)")])
def test_the_commands_refuse_other_families_in_one_line_before_reading_weights(folders, family, reason, tmp_path,
                                                                                 capsys, monkeypatch):
    from ttt_speech import models
    from ttt_speech.cli import main
    from ttt_speech.models import ModelConfig, load_lm

    def no_weights(*args, **kwargs):
        raise AssertionError("the checkpoint's files were resolved")

    monkeypatch.setattr(models, "_checkpoint", no_weights)  # refused from config.json alone: nothing fetched
    with pytest.raises(ValueError, match=rf"^model.name {folders[family]}: this {family} model .*not supported"):
        load_lm(ModelConfig(name=str(folders[family]), device="cpu"))
    prompt = tmp_path / "prompt.safetensors"
    from ttt_speech.data.codes import Recording, save_codes

    save_codes(prompt, Recording(torch.randint(0, 30, (16, 8)), source="synthetic:0:0"))
    capsys.readouterr()
    assert main(["generate", "--model", str(folders[family]), "--device", "cpu", "--out", str(tmp_path / "g"),
                 "--max-duration", "0.4", "--quiet", str(prompt)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and reason in err[0], err
    assert not (tmp_path / "g").exists() or not any((tmp_path / "g").iterdir())


def test_a_checkpoint_folder_is_a_model_name_and_generates(folders, tmp_path, capsys, monkeypatch):
    from ttt_speech.cli import main
    from ttt_speech.models import ModelConfig, load_lm

    monkeypatch.chdir(folders["moshi"].parent)
    config = ModelConfig(name="moshi", device="cpu")  # relative: held resolved, as an export records it
    assert config.is_folder and config.name == str(folders["moshi"])
    from safetensors.torch import load_file

    written = load_file(str(folders["moshi"] / "model.safetensors"))
    assert all(torch.equal(v, written[k]) for k, v in load_lm(config).state_dict().items())
    with pytest.raises(ValueError, match=r"^model.name: ./nope: no such checkpoint folder"):
        ModelConfig(name="./nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"^model.name: .*/empty has no config.json"):
        ModelConfig(name=str(tmp_path / "empty"))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text(json.dumps({"moshi_name": "lm.safetensors"}))
    broken = ModelConfig(name=str(tmp_path / "broken"), device="cpu")  # each load checks the files it reads
    with pytest.raises(ValueError, match=r"has no lm.safetensors \(config.json's moshi_name\)"):
        load_lm(broken)
    prompt = tmp_path / "prompt.safetensors"
    from ttt_speech.data.codes import Recording, save_codes

    save_codes(prompt, Recording(torch.randint(0, 30, (16, 8), generator=torch.Generator().manual_seed(0)),
                                 source="synthetic:0:0"))
    assert main(["generate", "--model", str(folders["moshi"]), "--device", "cpu", "--out", str(tmp_path / "g"),
                 "--max-duration", "0.4", "--no-audio", "--quiet", str(prompt)]) == 0
    (codes_file,) = (tmp_path / "g").glob("*.safetensors")  # the continuation's codes (--no-audio: no wav)
    from ttt_speech.data.codes import load_codes

    assert load_codes(codes_file).codes.shape[-1] >= 5


def test_bf16_weights_load_as_written_with_float32_ttt_state(folders):
    from safetensors.torch import load_file

    from ttt_speech.config import TTTConfig
    from ttt_speech.handle import TTTModel
    from ttt_speech.models import ModelConfig, load_lm
    from ttt_speech.moshi.patch import patch_moshi

    written = load_file(str(folders["bf16"] / "model.safetensors"))
    assert {v.dtype for v in written.values() if v.is_floating_point()} == {torch.bfloat16}
    lm = load_lm(ModelConfig(name=str(folders["bf16"]), device="cpu", dtype="bfloat16"))
    assert all(v.dtype == torch.bfloat16 and torch.equal(v, written[k]) for k, v in lm.state_dict().items()
               if v.is_floating_point())
    wide = load_lm(ModelConfig(name=str(folders["bf16"]), device="cpu", dtype="float32"))
    assert all(v.dtype == torch.float32 and torch.equal(v, written[k].float()) for k, v in wide.state_dict().items()
               if v.is_floating_point())  # bf16 → float32 is exact
    patch_moshi(lm, TTTConfig(mini_batch_size=4, gate_init=0.5))
    codes = torch.randint(0, 30, (1, lm.num_codebooks, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), lm.streaming(1):
        out, _ = lm.forward_text(codes)
        states = TTTModel.of(lm).live_states()
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    assert states and all(t.dtype == torch.float32 for s in states for t in s.weights + s.grads)
    assert all(int(s.offset[0]) == 12 % 4 for s in states)  # the state moved: 3 mini-batches, then none open


def test_eval_refuses_another_family_before_any_data_is_encoded(folders, tmp_path, capsys):
    import yaml

    from ttt_speech.cli import main

    wav = tmp_path / "a.wav"
    import numpy as np
    import soundfile

    soundfile.write(wav, np.zeros(24000, dtype=np.float32), 24000)
    (tmp_path / "m.jsonl").write_text(json.dumps({"path": str(wav)}) + "\n")
    config = tmp_path / "eval.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"name": str(folders["stt"]), "device": "cpu"}, "ttt": {"mini_batch_size": 4},
        "data": {"manifest": str(tmp_path / "m.jsonl"), "codes_cache": str(tmp_path / "codes"), "max_frames": 16},
        "eval": {"chunk_size": 8, "positions": [8], "position_window": 4, "bin_frames": 8, "gain_window": 8},
        "output_dir": str(tmp_path / "out")}))
    capsys.readouterr()
    assert main(["eval", "librilight", str(config), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "this stt model (dep_q = 0) predicts only the text stream" in err[0], err
    assert not (tmp_path / "codes").exists() and not (tmp_path / "out").exists()
