"""`ttt-speech eval memory`: the three passes are what they claim to be, and the command's I/O.

Tiny random-init Moshi-architecture models (dim 64, 2 layers, attention context 16), 64-frame
segments (32 through the command), TTT mini-batch 8. A random-init model remembers nothing useful: these tests check that
the state is carried exactly as described (docs/evaluation.md, "Memory test"), not that it helps.
"""
import json
from pathlib import Path

import pytest
import torch
import yaml

from ttt_speech import TTTConfig, TTTModel, patch_moshi, tiny_moshi_lm
from ttt_speech.cli import main
from ttt_speech.data.synthetic import SynthConfig, write_corpus
from ttt_speech.moshi import MoshiTTT
from ttt_speech.moshi.internals import streaming_state
from ttt_speech.moshi.teacher_forcing import chunk_logits, delayed_streams, widen_kv_caches
from ttt_speech.schema import from_dict, markdown_reference
from ttt_speech_apps.eval.memory_probe import (
    MemoryConfig,
    MemoryModel,
    memory_groups,
    plan_memory,
    probe_segment,
    remembered,
    summarize,
)
from ttt_speech_apps.eval.nll import chunked_nll, token_nll, undelay_nll

ROOT = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"
TINY = {"dim": 64, "num_layers": 2, "num_heads": 2, "text_card": 100, "card": 64, "context": 16,
        "depformer_num_layers": 1}
B, S, CHUNK = 8, 64, 16


def tiny_lm(ttt: TTTConfig | None = None):
    lm = tiny_moshi_lm(**TINY)
    if ttt is not None:
        patch_moshi(lm, ttt)
    return lm


def segment(seed: int = 0, T: int = S) -> torch.Tensor:
    """Random codes [17, T] in Moshi's layout (text row 0, then 8 + 8 audio rows)."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, TINY["card"], (17, T), generator=g)
    codes[0] = torch.randint(0, TINY["text_card"], (T,), generator=g)
    return codes


def planned_chunk_sizes(config: MemoryConfig) -> dict[str, int]:
    return {m.label: m.chunk_size for m in plan_memory(config).models}


def masked_equal(a, b) -> bool:
    return torch.equal(a.mask, b.mask) and torch.equal(a.nll[a.mask], b.nll[b.mask])


def masked_diff(a, b) -> float:
    assert torch.equal(a.mask, b.mask)
    return (a.nll[a.mask] - b.nll[b.mask]).abs().max().item()


@pytest.fixture(scope="module")
def ttt_lm():
    return tiny_lm(TTTConfig(mini_batch_size=B, gate_init=1.0))  # an open gate: TTT visibly acts


@pytest.fixture(scope="module")
def ttt_probe(ttt_lm):
    return probe_segment(ttt_lm, segment(), CHUNK)


def test_pre_is_the_chunked_nll_of_the_segment_in_a_fresh_stream(ttt_lm, ttt_probe):
    assert masked_equal(ttt_probe.pre, chunked_nll(ttt_lm, segment(), CHUNK))
    assert ttt_probe.carried and ttt_probe.pre.state is None  # the snapshot is not kept in the result


def test_baseline_post_equals_pre_exactly():
    probe = probe_segment(tiny_lm(), segment(), CHUNK)
    assert not probe.carried and probe.post_equals_pre
    result = summarize([probe], ["s0"])
    assert result["post_equals_pre"] and not result["carried_state"]
    assert len(result["groups"]) == 4 and all(g["delta"] == 0.0 for g in result["groups"].values())
    assert "post = pre exactly" in remembered(result)


def test_fresh_ttt_layers_with_an_open_gate_change_post(ttt_probe):
    assert not ttt_probe.post_equals_pre
    assert masked_diff(ttt_probe.pre, ttt_probe.post) > 1e-3


def test_post_is_scoring_with_the_first_occurrences_state_by_an_independent_path(ttt_lm, ttt_probe):
    """One stream: S, then every streaming state *except* the TTT one reset (KV caches, positions),
    then S again: the second scoring is `post`, with no snapshot or load in between."""
    codes = segment()
    inputs, targets = delayed_streams(ttt_lm, codes[None])
    a0, a1 = ttt_lm.audio_offset, ttt_lm.audio_offset + ttt_lm.dep_q
    with torch.inference_mode(), ttt_lm.streaming(1):
        widen_kv_caches(ttt_lm, CHUNK)
        for occurrence in range(2):
            if occurrence == 1:
                for module in ttt_lm.modules():
                    state = streaming_state(module)
                    if state is not None and not isinstance(module, MoshiTTT):
                        state.reset(torch.ones(1, dtype=torch.bool))
            texts, audios = [], []
            for start in range(0, S, CHUNK):
                t, a = chunk_logits(ttt_lm, inputs[:, :, start:start + CHUNK], targets[:, :, start:start + CHUNK])
                texts.append(token_nll(t, targets[:, :1, start:start + CHUNK]))
                audios.append(token_nll(a, targets[:, a0:a1, start:start + CHUNK]))
    nll, mask = undelay_nll(ttt_lm, codes, torch.cat(texts, 2), torch.cat(audios, 2), "second occurrence")
    assert torch.equal(mask, ttt_probe.post.mask)
    assert (nll[mask] - ttt_probe.post.nll[mask]).abs().max().item() <= 1e-5


def test_loading_the_initial_state_gives_pre_back(ttt_lm, ttt_probe):
    with torch.inference_mode(), ttt_lm.streaming(1):
        initial = TTTModel.of(ttt_lm).stream_state()
    assert masked_equal(chunked_nll(ttt_lm, segment(), CHUNK, initial_state=initial), ttt_probe.pre)


def test_post_in_context_is_the_second_half_of_the_repeated_stream(ttt_lm, ttt_probe):
    twice = chunked_nll(ttt_lm, torch.cat([segment(), segment()], 1), CHUNK)
    assert torch.equal(ttt_probe.post_in_context.mask, ttt_probe.pre.mask)  # same scored positions as S alone
    assert torch.equal(ttt_probe.post_in_context.nll.nan_to_num(), twice.nll[:, S:].nan_to_num())


def test_state_round_trip_of_chunked_nll(ttt_lm, ttt_probe):
    first = chunked_nll(ttt_lm, segment(), CHUNK, return_state=True)
    assert first.state and set(first.state) == set(_initial_state(ttt_lm))
    assert masked_equal(chunked_nll(ttt_lm, segment(), CHUNK, initial_state=first.state), ttt_probe.post)
    assert chunked_nll(ttt_lm, segment(), CHUNK).state is None  # only when asked for
    baseline = tiny_lm()
    assert chunked_nll(baseline, segment(), CHUNK, return_state=True).state == {}
    chunked_nll(baseline, segment(), CHUNK, initial_state={})  # nothing to carry: a no-op
    with pytest.raises(ValueError, match="no TTT layers"):
        chunked_nll(baseline, segment(), CHUNK, initial_state=first.state)


def _initial_state(lm):
    with torch.inference_mode(), lm.streaming(1):
        return TTTModel.of(lm).stream_state()


def test_summary_groups_and_per_stream_values(ttt_probe):
    assert memory_groups(9) == {"text": [0], "cb1": [1], "cb2-8": list(range(2, 9)), "audio": list(range(1, 9))}
    result = summarize([ttt_probe, ttt_probe], ["a", "b"])
    cb1 = result["groups"]["cb1"]
    assert cb1["pre"]["n_streams"] == 2 and cb1["pre"]["n_tokens"] == 2 * S  # codebook 1 has no delay
    assert cb1["delta"] == pytest.approx(cb1["post"]["nll"] - cb1["pre"]["nll"])
    pre = ttt_probe.pre
    assert cb1["pre"]["nll"] == pytest.approx(pre.nll[1][pre.mask[1]].double().mean().item())
    audio = result["groups"]["audio"]["pre"]["nll"]
    # "audio": per position, the mean over the audio codebooks scored there; then over positions
    per_position = torch.nanmean(pre.nll[1:9].double(), dim=0)
    assert audio == pytest.approx(per_position[~per_position.isnan()].mean().item())
    stream = result["streams"][1]
    assert stream["id"] == "b" and stream["pre"]["cb1"] == pytest.approx(cb1["pre"]["nll"])
    assert stream["max_abs_post_minus_pre"] > 0
    assert remembered(result).startswith("post < pre on codebook 1: ")


# ---------------------------------------------------------------- config and command


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Code files: 2 held-out streams of 48 frames and 2 of 24 (too short for a 32-frame segment)."""
    root = tmp_path_factory.mktemp("corpus")
    files = write_corpus(SynthConfig(recordings=4, eval_recordings=2, frames=24, length_jitter=0.0,
                                     eval_frames=48, card=64), root)
    manifest = root / "all.jsonl"
    manifest.write_text(files["train"].read_text() + files["eval"].read_text())
    return manifest, tmp_path_factory.mktemp("codes")


def write_config(path: Path, corpus, **fields) -> Path:
    manifest, cache = corpus
    data = {"model": {"name": "tiny", "tiny": TINY, "device": "cpu"},
            "models": [{"name": "ttt-linear", "ttt": {"mini_batch_size": B, "gate_init": 1.0}}, {"name": "baseline"}],
            "data": {"manifest": str(manifest), "codes_cache": str(cache)},
            "segment_frames": S // 2, "output_dir": str(path.parent / "out"), **fields}
    path.write_text(yaml.safe_dump(data))
    return path


def test_memory_command_end_to_end(corpus, tmp_path, capsys):
    config = write_config(tmp_path / "memory.yaml", corpus)
    assert main(["eval", "memory", str(config), "--quiet"]) == 0
    out = tmp_path / "out"
    assert (out / "memory.png").read_bytes()[:8] == PNG
    assert not list(out.glob(".*"))  # atomic writes leave no temporary files
    report = json.loads((out / "memory.json").read_text())
    assert report["kind"] == "memory" and report["segment_frames"] == S // 2
    assert list(report["results"]) == ["ttt-linear", "baseline"]
    assert report["data"]["counts"] == {"streams": 2, "left_out": 2, "files_skipped": 0}
    assert all(s["reason"] == f"24 frames < segment_frames {S // 2}" for s in report["data"]["left_out"])
    assert report["models"]["ttt-linear"]["chunk_size"] == 4 * B and report["models"]["baseline"]["chunk_size"] == 64
    base, ttt = report["results"]["baseline"], report["results"]["ttt-linear"]
    assert base["post_equals_pre"] and not base["carried_state"]
    assert ttt["carried_state"] and not ttt["post_equals_pre"]
    for result in (base, ttt):
        assert set(result["groups"]) == {"text", "cb1", "cb2-8", "audio"} and len(result["streams"]) == 2
        for g in result["groups"].values():
            assert {"pre", "post", "post_in_context", "delta", "delta_in_context"} <= set(g)
    md = (out / "memory.md").read_text()
    assert "| model | group | pre | post | Δ post − pre |" in md and "![memory](memory.png)" in md
    assert "- **baseline**: post < pre on codebook 1: no (no TTT layers" in md
    assert "- **ttt-linear**: post < pre on codebook 1: " in md and "24 frames < segment_frames" in md
    printed = capsys.readouterr().out
    assert "memory test: first 32 frames of 2 stream(s)" in printed and "baseline: post < pre" in printed


def _error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err, err  # one line
    return err


def test_command_errors_are_one_line_and_exit_2(corpus, tmp_path, capsys):
    config = str(write_config(tmp_path / "memory.yaml", corpus))
    assert "config: unknown field(s) ['bogus']" in _error(capsys, ["eval", "memory", config, "bogus=1"])
    err = _error(capsys, ["eval", "memory", config, "models=[{name: a, exprt: x}]"])
    assert "config.models[0]: unknown field(s) ['exprt']" in err
    err = _error(capsys, ["eval", "memory", config, "models=[{name: a}, {name: a}]"])
    assert "models: duplicate name(s) ['a']" in err
    err = _error(capsys, ["eval", "memory", config, "chunk_size=0"])
    assert "chunk_size: expected a positive number of frames, got 0" in err
    err = _error(capsys, ["eval", "memory", config, "segment_frames=500", "--quiet"])
    assert "segment_frames: 500 frames is longer than every stream (longest: 48 frames)" in err
    assert "unrecognized arguments: --baseline" in _error(capsys, ["eval", "memory", config, "--baseline"])
    # output_dir is made (and proven writable) before the models load; a failed run leaves it empty
    assert not any((tmp_path / "out").iterdir())


def test_an_output_dir_that_cannot_be_written_fails_before_any_model_loads(corpus, tmp_path, capsys, monkeypatch):
    from ttt_speech_apps.eval import pipeline

    monkeypatch.setattr(pipeline, "build_models", lambda *a, **k: pytest.fail("a model was built before the check"))
    in_the_way = tmp_path / "a_file"
    in_the_way.write_text("")
    config = str(write_config(tmp_path / "memory.yaml", corpus))
    err = _error(capsys, ["eval", "memory", config, "--quiet", f"output_dir={in_the_way}"])
    assert f"output_dir: {in_the_way} is a file, expected a folder" in err
    err = _error(capsys, ["eval", "memory", config, "--quiet", f"output_dir={in_the_way / 'sub'}"])
    assert f"output_dir: cannot write into {in_the_way / 'sub'}" in err


def test_config_validation():
    ok = {"models": [{"name": "a"}], "data": {"manifest": "x.jsonl"}}
    config = from_dict(MemoryConfig, ok, "config")
    assert config.segment_frames == 256 and config.chunk_size is None and config.models == [MemoryModel("a")]
    assert planned_chunk_sizes(config) == {"a": 64}  # the default chunk of a model without TTT layers
    e2e = {"name": "a", "ttt": {"layer_type": "e2e_mlp", "mini_batch_size": 16}}
    linear = {"name": "a", "ttt": {"mini_batch_size": 16}}
    assert planned_chunk_sizes(from_dict(MemoryConfig, {**ok, "models": [linear], "chunk_size": 24}, "config")) == {"a": 24}
    for bad, message in [
        ({**ok, "models": []}, "models: expected a list of at least one"),
        ({**ok, "models": [{"export": "x"}]}, "missing 1 required positional argument: 'name'"),
        ({**ok, "models": [{"name": " "}]}, "config.models[0]: name: expected a non-empty string"),
        ({**ok, "models": [{"name": "a", "export": "x", "ttt": {}}]}, "export and ttt: set one"),
        ({**ok, "segment_frames": 0}, "segment_frames: expected an integer >= 1"),
        ({**ok, "data": {}}, "data: expected manifest (a JSONL of code or audio files) or root"),
        ({**ok, "models": [e2e], "chunk_size": 24},
         "chunk_size: 24 frames is not a multiple of the E2E mini-batch size (16)"),
    ]:
        with pytest.raises(ValueError, match=None) as e:
            from_dict(MemoryConfig, bad, "config")
        assert message in str(e.value), (bad, str(e.value))


def test_chunk_size_of_an_export_is_checked_from_its_metadata(tmp_path):
    from ttt_speech.export import save_export
    from ttt_speech.models import ModelConfig

    model = ModelConfig(tiny=TINY, device="cpu")
    save_export(tiny_lm(TTTConfig(mini_batch_size=B)), model, tmp_path / "ttt", trainable="ttt")
    save_export(tiny_lm(TTTConfig(layer_type="e2e_mlp", mini_batch_size=B)), model, tmp_path / "e2e", trainable="ttt")
    save_export(tiny_lm(), model, tmp_path / "plain", trainable="full")
    models = [{"name": n, "export": str(tmp_path / n)} for n in ("ttt", "e2e", "plain")]
    config = from_dict(MemoryConfig, {"models": models, "data": {"manifest": "x.jsonl"}}, "config")
    assert planned_chunk_sizes(config) == {"ttt": 4 * B, "e2e": 4 * B, "plain": 64}
    config.chunk_size = 12  # fine for TTT layers (padding slots only), not for E2E layers
    with pytest.raises(ValueError, match=r"chunk_size: 12 frames is not a multiple of the E2E mini-batch size \(8\)"):
        planned_chunk_sizes(config)
    config.models = config.models[:1] + config.models[2:]
    assert planned_chunk_sizes(config) == {"ttt": 12, "plain": 12}


def test_example_config_loads_and_docs_hold_the_reference():
    from ttt_speech_apps.eval.memory_probe import load_config

    config = load_config(ROOT / "configs/eval_memory.yaml")
    assert [m.name for m in config.models] == ["ttt-linear", "ttt-mlp", "e2e", "baseline"]
    assert all(m.export == Path(f"runs/memory/{m.name}/export") for m in config.models)
    assert config.data.manifest == Path("runs/memory/corpus/eval.jsonl")
    docs = (ROOT / "docs/evaluation.md").read_text()
    for cls in (MemoryConfig, MemoryModel):
        assert markdown_reference(cls) in docs, (
            f"docs/evaluation.md is out of date; regenerate with: python -c 'from ttt_speech_apps.eval.memory_probe import "
            f"{cls.__name__}; from ttt_speech.schema import markdown_reference; "
            f"print(markdown_reference({cls.__name__}))'")


def test_e2e_layers_carry_their_fast_weights_and_remember_a_random_segment():
    """An E2E model (fresh layers, open gate) learns S by gradient steps on its own loss: the
    post pass, which only has the fast weights, scores S lower than the pre pass."""
    lm = tiny_lm(TTTConfig(layer_type="e2e_mlp", mini_batch_size=B, gate_init=1.0, base_lr=10.0))
    probe = probe_segment(lm, segment(), CHUNK)
    assert probe.carried and masked_diff(probe.pre, probe.post) > 1e-3
    result = summarize([probe], ["s0"])
    assert result["groups"]["audio"]["delta"] < 0 and remembered(result).startswith("post < pre on codebook 1")
