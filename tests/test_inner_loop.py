"""Evaluation-time inner-loop overrides (ttt_speech.inner_loop): the rules, the layer under an
override against the independent per-token reference, and exact restoration."""
import pytest
import torch

from reference import reference_ttt
from ttt_speech.config import TTTConfig
from ttt_speech.inner_loop import InnerLoopOverride, apply, lr_factor, resized_offsets
from ttt_speech.layer import TTTLayer
from ttt_speech.ops.inner_lr import position_scale

TRAINED = TTTConfig(layer_type="linear", mini_batch_size=4, base_lr=1.0, num_heads=2)


def trained_layer(config: TTTConfig = TRAINED, dim: int = 16) -> TTTLayer:
    """A float64 layer with learned-looking offsets a_i (non-zero, distinct) and a moving inner loop."""
    torch.manual_seed(0)
    layer = TTTLayer(dim, config, dtype=torch.float64)
    with torch.no_grad():
        layer.tau_offset.copy_(torch.tensor([0.3, -0.1, 0.05, 0.2], dtype=torch.float64)[:config.mini_batch_size])
        layer.lr_gate_bias.fill_(2.0)  # σ ≈ 0.88: the fast weights move visibly
    return layer


def test_offsets_rule():
    a = torch.tensor([0.3, -0.1, 0.05, 0.2])
    assert torch.equal(resized_offsets(a, 4, "reset"), a)  # b unchanged: the learned offsets, either rule
    assert torch.equal(resized_offsets(a, 1, "reset"), torch.zeros(1))
    assert torch.equal(resized_offsets(a, 2, "keep"), a[:2])
    assert torch.equal(resized_offsets(a, 6, "keep"), torch.tensor([0.3, -0.1, 0.05, 0.2, 0.0, 0.0]))
    assert torch.equal(resized_offsets(a, 6, "reset"), torch.zeros(6))


def test_lr_compensation_rule():
    plain = lambda b: position_scale(torch.zeros(b, dtype=torch.float64))  # noqa: E731  τ_i = 1/i
    assert lr_factor(plain(16), plain(1), "keep_per_token") == pytest.approx(1 / 16)  # the base_lr·b'/b rule
    assert lr_factor(plain(16), plain(1), "keep_per_minibatch") == pytest.approx(1.0)
    assert lr_factor(plain(16), plain(4), "none") == 1.0
    tau = position_scale(torch.tensor([0.3, -0.1, 0.05, 0.2], dtype=torch.float64))  # τ_4 = 0.45
    assert lr_factor(tau, plain(1), "keep_per_token") == pytest.approx(0.45)
    assert lr_factor(tau, plain(1), "keep_per_minibatch") == pytest.approx(4 * 0.45)
    assert lr_factor(tau, tau, "keep_per_token") == lr_factor(tau, tau, "keep_per_minibatch") == 1.0
    with pytest.raises(ValueError, match="tau > 0"):
        lr_factor(plain(4), position_scale(torch.tensor([-2.0], dtype=torch.float64)), "keep_per_token")


def test_override_fields_are_checked():
    with pytest.raises(ValueError, match="mini_batch_size: expected null or an integer in 1..1024, got 0"):
        InnerLoopOverride(mini_batch_size=0)
    with pytest.raises(ValueError, match="base_lr: expected null or a number > 0, got -1"):
        InnerLoopOverride(base_lr=-1.0)
    with pytest.raises(ValueError, match=r"online.scale: mini_batch_size changes 4 -> 1; say how base_lr follows"):
        InnerLoopOverride(mini_batch_size=1).resolve(TRAINED, "online")
    with pytest.raises(ValueError, match="e2e_mlp layers"):
        InnerLoopOverride(mini_batch_size=1, scale="none").resolve(TTTConfig(layer_type="e2e_mlp"))
    nominal = InnerLoopOverride(mini_batch_size=1, scale="keep_per_token").resolve(TRAINED)
    assert (nominal.mini_batch_size, nominal.base_lr) == (1, pytest.approx(0.25))


@pytest.mark.parametrize("override", [
    InnerLoopOverride(mini_batch_size=1, scale="keep_per_token"),
    InnerLoopOverride(mini_batch_size=1, scale="keep_per_minibatch", offsets="keep"),
    InnerLoopOverride(mini_batch_size=3, base_lr=0.5, scale="none", offsets="keep"),
    InnerLoopOverride(mini_batch_size=6, scale="keep_per_token", offsets="keep"),
], ids=["b1-token", "b1-minibatch-keep", "b3-lr0.5", "b6-keep"])
def test_override_equals_the_per_token_reference_and_streams(override):
    """float64: the overridden layer == the independent per-token primal loop run with the λ and τ
    rule (b' = 1: every token its own gradient step), for one pass and for any chunking."""
    layer = trained_layer()
    x = torch.randn(2, 13, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before, _ = layer(x)
        with apply([layer], override, TRAINED):
            b = override.mini_batch_size
            tau = position_scale(layer.tau_offset)
            old_tau = position_scale(torch.tensor([0.3, -0.1, 0.05, 0.2], dtype=torch.float64))
            base = override.base_lr or 1.0
            expected_lr = {"keep_per_token": base * old_tau[-1] / tau[-1],
                           "keep_per_minibatch": base * 4 * old_tau[-1] / (b * tau[-1]), "none": base}[override.scale]
            assert layer.config.base_lr == pytest.approx(float(expected_lr), rel=1e-12)
            assert layer.tau_offset.shape == (b,) and layer.mini_batch_size == b == layer.config.mini_batch_size
            full, state = layer(x)
            ref = reference_ttt(layer, x)
            chunks, s = [], None
            for lo, hi in ((0, 1), (1, 5), (5, 6), (6, 13)):  # across and inside mini-batches
                y, s = layer(x[:, lo:hi], s)
                chunks.append(y)
        after, _ = layer(x)
    assert (state.weights[0] - layer.initial_state(2).weights[0]).abs().max() > 1e-3  # the fast weights moved
    assert (full - before).abs().max() > 1e-4  # the override changes the outputs (the check can fail)
    assert (full - ref).abs().max() < 1e-10
    assert (torch.cat(chunks, 1) - full).abs().max() < 1e-10
    assert torch.equal(after, before)  # restored exactly
    assert layer.tau_offset.shape == (4,) and layer.config is TRAINED


def test_override_is_restored_after_an_error():
    layer = trained_layer()
    storage = layer.tau_offset.data_ptr()
    with pytest.raises(RuntimeError, match="inside"):
        with apply([layer], InnerLoopOverride(mini_batch_size=2, scale="keep_per_token"), TRAINED):
            raise RuntimeError("inside")
    assert layer.tau_offset.data_ptr() == storage and layer.tau_offset.shape == (4,) and layer.mini_batch_size == 4 and layer.config is TRAINED


# ---------------------------------------------------------------- the evaluator's grid

CARD, TEXT_CARD = 64, 100


def patched_lm(b: int = 4):
    from ttt_speech import TTTModel, patch_moshi, tiny_moshi_lm

    torch.manual_seed(0)
    lm = tiny_moshi_lm(card=CARD, text_card=TEXT_CARD, context=16)
    patch_moshi(lm, TTTConfig(mini_batch_size=b, layers="every:2", gate_init=0.5))
    handle = TTTModel.of(lm)
    with torch.no_grad():  # learned-looking offsets and a visibly moving inner loop
        for site in handle.sites:
            site.core.tau_offset.copy_(torch.linspace(-0.1, 0.3, b))
            site.core.lr_gate_bias.fill_(2.0)
    return lm, handle


def random_codes(T=45, seed=0):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, CARD, (17, T), generator=g)
    codes[0] = torch.randint(0, TEXT_CARD, (T,), generator=g)
    return codes


VARIANTS = {"b1-token": InnerLoopOverride(mini_batch_size=1, scale="keep_per_token"),
            "b1-minibatch": InnerLoopOverride(mini_batch_size=1, scale="keep_per_minibatch", offsets="keep"),
            "b3-keep": InnerLoopOverride(mini_batch_size=3, scale="keep_per_token", offsets="keep"),
            "b8-lr": InnerLoopOverride(mini_batch_size=8, base_lr=0.5, scale="none")}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_chunked_and_native_agree_under_every_override(name):
    """The streaming contract holds for any b: LMGen.step (native) == aligned and unaligned chunks,
    under the override; the override moves the NLL; the trained model is untouched after it."""
    from ttt_speech_apps.eval.nll import chunked_nll, native_nll

    lm, handle = patched_lm()
    codes = random_codes()
    trained = chunked_nll(lm, codes, chunk_size=8)
    with handle.inner_loop(VARIANTS[name]) as online:
        b = online.config.mini_batch_size
        assert all(site.core.mini_batch_size == b for site in online.sites)
        native = native_nll(lm, codes, trace_every=b)
        chunked = [chunked_nll(lm, codes, chunk_size=c) for c in (b, 5, 45)]
    after = chunked_nll(lm, codes, chunk_size=8)
    assert len(set(codes[1].tolist())) > 10  # informative input
    mask = native.mask
    assert (native.nll[mask] - trained.nll[mask]).abs().max() > 1e-3  # the override changes the scores
    for c in chunked:
        assert torch.equal(c.mask, mask) and (c.nll[mask] - native.nll[mask]).abs().max() < 1e-4
    assert torch.equal(after.nll.nan_to_num(), trained.nll.nan_to_num())  # bit for bit (NaN: no target)
    assert native.weights.distances[0][-1] > 0  # the fast weights moved


def test_the_grid_in_one_report(tmp_path):
    """`eval.inner_loop` on fresh TTT layers: every variant scored in its modes on the same streams,
    the grid's table and plot written, each variant's inner loop described."""
    import json

    from ttt_speech.data.synth_config import SynthConfig
    from ttt_speech.data.synthetic import write_corpus
    from ttt_speech.schema import from_dict
    from ttt_speech_apps.eval.config import EvalConfig
    from ttt_speech_apps.eval.librilight import LibriLight
    from ttt_speech_apps.eval.pipeline import evaluate

    corpus = write_corpus(SynthConfig(recordings=3, frames=40, eval_recordings=2, eval_frames=48, card=CARD), tmp_path)
    config = from_dict(EvalConfig, {
        "model": {"tiny": {"card": CARD, "text_card": TEXT_CARD}, "device": "cpu"},
        "ttt": {"mini_batch_size": 4, "gate_init": 1.0, "layers": "every:2"},
        "data": {"manifest": str(corpus["eval"]), "codes_cache": str(tmp_path / "cache")},
        "eval": {"mode": "both", "chunk_size": 8, "bin_frames": 8, "positions": [16, 48], "position_window": 8,
                 "gain_window": 8,
                 "inner_loop": {"online": {"mini_batch_size": 1, "scale": "keep_per_token"},
                                "aligned": {"mini_batch_size": 2, "scale": "keep_per_minibatch", "chunk_size": 6,
                                            "align": True, "modes": ["chunked"]}}},
        "output_dir": str(tmp_path / "out"), "wandb": {"mode": "disabled"}}, "config")
    result, paths = evaluate(LibriLight(config), progress=False)
    report = result.report
    grid = report["comparisons"]["inner_loop"]
    assert list(grid) == ["ttt/chunked", "ttt/native", "ttt@online/chunked", "ttt@online/native",
                          "ttt@aligned/chunked"]
    assert grid["ttt@online/native"]["mini_batch_size"] == 1 and grid["ttt@online/chunked"]["chunk_size"] == 8
    assert grid["ttt@online/native"]["base_lr"] == pytest.approx(0.25)  # keep_per_token: 1.0 · 1/4
    assert grid["ttt@aligned/chunked"]["slot_efficiency"] == 1.0 and grid["ttt/native"]["slot_efficiency"] == 0.25
    assert report["comparisons"]["modes"]["ttt@online"]["max_abs"] < 1e-4  # chunked == native at b = 1
    nll = {n: r["groups"]["cb1"]["positions"][-1]["nll"] for n, r in grid.items()}
    assert abs(nll["ttt@online/chunked"] - nll["ttt/chunked"]) > 1e-4  # the variants differ from the trained run
    assert report["models"]["ttt@online"]["inner_loop"]["effective_mini_batch_size"] == 1
    text = paths["markdown"].read_text()
    assert "## Inner-loop grid" in text and "| ttt@online/native | 1 | 0.25 | keep_per_token | reset | 1 |" in text
    assert paths["inner_loop"].read_bytes()[:4] == b"\x89PNG"
    assert json.loads(paths["json"].read_text())["plots"]["inner_loop"] == "inner_loop.png"


@pytest.mark.parametrize("variant, message", [
    ({"mini_batch_size": 0}, "eval.inner_loop.v: mini_batch_size: expected null or an integer in 1..1024, got 0"),
    ({"base_lr": 0.0}, "eval.inner_loop.v: base_lr: expected null or a number > 0, got 0.0"),
    ({"mini_batch_size": 1}, "eval.inner_loop.v.scale: mini_batch_size changes 4 -> 1"),
    ({"mini_batch_size": 3, "scale": "none", "chunk_size": 8, "align": True},
     "eval.inner_loop.v.chunk_size: align is set and 8 frames is not a multiple of the mini-batch size 3"),
    ({"scale": "half"}, "eval.inner_loop.v.scale: expected one of"),
])
def test_bad_overrides_fail_before_any_model_loads(tmp_path, monkeypatch, capsys, variant, message):
    """From the command line: one line naming the field, exit 2, nothing loaded."""
    import yaml

    from ttt_speech.cli import main
    from ttt_speech_apps.eval import librilight, pipeline

    monkeypatch.setattr(pipeline, "build_models", lambda *a, **k: pytest.fail("a model was built before the check"))
    monkeypatch.setattr(librilight, "load_data", lambda *a, **k: pytest.fail("data was loaded before the check"))
    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump({"ttt": {"mini_batch_size": 4}, "data": {"manifest": str(tmp_path / "m.jsonl")},
                                    "eval": {"inner_loop": {"v": variant}}, "output_dir": str(tmp_path / "out")}))
    assert main(["eval", "librilight", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
