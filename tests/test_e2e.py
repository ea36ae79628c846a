"""TTT-E2E (layer_type e2e_mlp): MLP fast weights updated by the model's own next-frame loss.

Tiny float64 Moshi-architecture models (dim 32, 4 layers, 2 + 2 audio streams, attention context
8), so the contract is checked to ~1e-12 and gradients against central finite differences.
"""
import pytest
import torch

from conftest import inserted_modules, max_diff
from ttt_speech import TTTConfig, TTTModel, patch_moshi, tiny_moshi_lm
from ttt_speech.handle import inference_context
from ttt_speech.moshi import teacher_forced_logits
from ttt_speech.moshi.carry import TTTCarry
from ttt_speech.moshi.e2e import MoshiE2E
from ttt_speech.moshi.teacher_forcing import chunk_logits, delayed_streams, widen_kv_caches

CARD, TEXT_CARD, B_MB = 16, 20, 4
KW = dict(dim=32, num_layers=4, num_heads=2, card=CARD, text_card=TEXT_CARD, context=8, n_q=4, dep_q=2,
          delays=[0, 0, 1, 0, 1], depformer_num_layers=1, depformer_dim=16, depformer_dim_feedforward=32,
          norm="rms_norm", dtype=torch.float64)  # rms_norm_f32 would compute in float32


def tiny_lm(seed=0, **overrides):
    return tiny_moshi_lm(seed=seed, **{**KW, **overrides})


def e2e_lm(seed=0, gate=0.5, lr=1.0, b=B_MB, layers=None, **overrides):
    lm = tiny_lm(seed, **overrides)
    torch.manual_seed(seed)
    patch_moshi(lm, TTTConfig(layer_type="e2e_mlp", mini_batch_size=b, gate_init=gate, base_lr=lr, layers=layers))
    return lm


def codes(B=2, T=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = torch.randint(0, CARD, (B, 5, T), generator=g)
    c[:, 0] = torch.randint(0, TEXT_CARD, (B, T), generator=g)
    return c


def diff(a, b):
    return max(max_diff(x.nan_to_num(), y.nan_to_num()) for x, y in ((a.logits, b.logits), (a.text_logits, b.text_logits)))


def streamed(lm, c, chunk):
    with inference_context(lm):
        return teacher_forced_logits(lm, c, chunk)


def test_defaults_last_quarter_and_hybrid_only():
    assert TTTConfig(layer_type="e2e_mlp").layers == "last:0.25"
    assert TTTConfig(layer_type="linear").layers == "all"
    report = patch_moshi(tiny_lm(), TTTConfig(layer_type="e2e_mlp"))
    assert report.layers == [3] and report.layer_type == "e2e_mlp"
    with pytest.raises(ValueError, match="TTTConfig.mode: e2e_mlp"):
        TTTConfig(layer_type="e2e_mlp", mode="replace")


def test_zero_gate_reproduces_the_unpatched_model_exactly():
    c = codes()
    with torch.no_grad():
        base_full, base_streamed = tiny_lm()(c), teacher_forced_logits(tiny_lm(), c, 8)
    lm = e2e_lm(gate=0.0)
    assert diff(streamed(lm, c, 8), base_streamed) == 0.0
    with torch.no_grad():
        assert diff(lm(c), base_full) == 0.0


def test_inner_lr_zero_equals_the_model_without_updates():
    """base_lr = 0: streaming with updates equals one plain forward with the initial weights W0."""
    lm, c = e2e_lm(lr=0.0), codes()
    with torch.no_grad():
        plain = lm(c)
    assert diff(streamed(lm, c, 8), plain) < 1e-12
    assert diff(streamed(e2e_lm(lr=1.0), c, 8), plain) > 1e-3  # the updates do change the predictions


def test_inner_updates_change_only_the_updatable_mlps():
    lm, c = e2e_lm(), codes()
    params = {n: p.detach().clone() for n, p in lm.named_parameters()}
    inputs, targets = delayed_streams(lm, c)
    with inference_context(lm), lm.streaming(2):
        widen_kv_caches(lm, 24)
        chunk_logits(lm, inputs, targets)
        state = TTTModel.of(lm).stream_state()
    assert all(torch.equal(p, params[n]) for n, p in lm.named_parameters())  # parameters untouched
    (name, module), = [(n, m) for n, m in lm.named_modules() if isinstance(m, MoshiE2E)]
    for w in module.layer.fast_names:  # only the E2E layer's fast weights moved, in every row
        moved = (state[f"{name}.{w}"] - getattr(module.layer, w).detach()).flatten(1).abs().amax(dim=1)
        assert (moved > 1e-6).all(), w
    # the first mini-batch is predicted before any update: there it equals the frozen (lr 0) model
    frozen = e2e_lm(lr=0.0)
    with inference_context(lm), lm.streaming(2), frozen.streaming(2):
        updated, still = chunk_logits(lm, inputs, targets)[1], chunk_logits(frozen, inputs, targets)[1]
    assert max_diff(updated[..., :B_MB, :], still[..., :B_MB, :]) < 1e-12  # delayed domain: the same frames
    assert max_diff(updated[..., B_MB:, :], still[..., B_MB:, :]) > 1e-4


@pytest.mark.parametrize("chunk", [4, 8, 12, 20])
def test_chunked_equals_one_pass_at_update_boundaries(chunk):
    """Chunks of a multiple of b (last one shorter: T = 26 is not a multiple of 4) == one pass."""
    lm, c = e2e_lm(), codes(T=26)
    assert diff(streamed(lm, c, chunk), streamed(lm, c, 26)) < 1e-12


def test_chunk_inside_an_unfinished_mini_batch_is_refused():
    lm, c = e2e_lm(), codes()
    with pytest.raises(ValueError, match=r"chunk_size: 6 frames is not a multiple of the E2E mini-batch size \(4\)"):
        streamed(lm, c, 6)  # the chunk rule refuses it up front
    inputs, targets = delayed_streams(lm, c)
    with inference_context(lm), lm.streaming(2), pytest.raises(ValueError, match="unfinished 4-frame mini-batch"):
        chunk_logits(lm, inputs[..., :6], targets[..., :6])  # a short chunk is fine as the last one ...
        chunk_logits(lm, inputs[..., 6:12], targets[..., 6:12])  # ... but nothing may follow it


def test_window_mode_equals_streaming():
    """Training's window mode (TTTCarry, prefix recompute, no KV cache) == the streaming path."""
    lm, c = e2e_lm(), codes()
    inputs, targets = delayed_streams(lm, c)
    with torch.no_grad(), TTTCarry(lm, 2) as carry:
        carry.next_window(torch.ones(2, dtype=torch.bool))
        text, audio = chunk_logits(lm, inputs, targets)
        window_state = carry.state_dict()
    with inference_context(lm), lm.streaming(2):
        widen_kv_caches(lm, 24)
        text2, audio2 = chunk_logits(lm, inputs, targets)
        stream_state = TTTModel.of(lm).stream_state()
    assert max_diff(text, text2) < 1e-12 and max_diff(audio, audio2) < 1e-12
    assert set(window_state) == set(stream_state) and any(k.endswith(".W1") for k in stream_state)
    assert all(max_diff(window_state[k], stream_state[k]) < 1e-12 for k in stream_state)


def outer_loss(lm, c, meta):
    """The training loss of one window under TTTCarry (frames after the first mini-batch are
    predicted after adaptation)."""
    inputs, targets = delayed_streams(lm, c)
    with TTTCarry(lm, c.shape[0]) as carry:
        carry.next_window(torch.ones(c.shape[0], dtype=torch.bool))
        text, audio = chunk_logits(lm, inputs, targets, meta=meta)
    return audio.logsumexp(-1).mean() - audio.mean() + 0.1 * text.square().mean()


def test_meta_gradient_reaches_the_outer_parameters():
    """Gradcheck: the meta-gradient (second order through the inner updates) matches central
    finite differences for the E2E initial weights, its inner lr, and a static attention weight;
    the first-order gradient does not (so this test can fail)."""
    # moshi's RoPE rotates in float32: its rounding would swamp the finite differences
    lm, c = e2e_lm(gate=0.8, lr=2.0, positional_embedding="none"), codes(B=1, T=12)
    lm.train()
    named = dict(lm.named_parameters())
    e2e = next(n for n, m in lm.named_modules() if isinstance(m, MoshiE2E))
    checked = [f"{e2e}.layer.W1", f"{e2e}.layer.lr_logit", "transformer.layers.3.self_attn.in_projs.0.weight",
               "transformer.layers.0.gating.linear_in.weight"]
    g = torch.Generator().manual_seed(0)
    picks = {n: torch.randint(0, named[n].numel(), (3,), generator=g) for n in checked}
    grads = {}
    for meta in (True, False):
        lm.zero_grad()
        outer_loss(lm, c, meta).backward()
        grads[meta] = {n: named[n].grad.flatten()[picks[n]].clone() for n in checked}
    eps = 1e-6
    for n in checked:
        flat = named[n].data.view(-1)
        for j, i in enumerate(picks[n].tolist()):
            with torch.no_grad():
                flat[i] += eps
                up = outer_loss(lm, c, False)
                flat[i] -= 2 * eps
                down = outer_loss(lm, c, False)
                flat[i] += eps
            fd = ((up - down) / (2 * eps)).item()
            assert abs(grads[True][n][j].item() - fd) <= 1e-6 * max(1.0, abs(fd)), (n, i, grads[True][n][j], fd)
    first_order_error = max((grads[False][n] - grads[True][n]).abs().max().item() for n in checked)
    assert first_order_error > 1e-6


def test_reset_rows_and_save_restore_state():
    lm, c = e2e_lm(), codes()
    inputs, targets = delayed_streams(lm, c)
    with inference_context(lm), lm.streaming(2):
        widen_kv_caches(lm, 24)
        chunk_logits(lm, inputs[..., :8], targets[..., :8])
        saved = TTTModel.of(lm).stream_state()
        lm.reset_streaming(torch.tensor([True, False]))
        after_reset = TTTModel.of(lm).stream_state()
        TTTModel.of(lm).load_stream_state(saved)
        restored = TTTModel.of(lm).stream_state()
        assert set(restored) == set(saved) and all(torch.equal(v, saved[k]) for k, v in restored.items())
    (name, module), = [(n, m) for n, m in lm.named_modules() if isinstance(m, MoshiE2E)]
    w0 = module.layer.W1.detach()
    assert torch.equal(after_reset[f"{name}.W1"][0], w0) and not torch.equal(saved[f"{name}.W1"][0], w0)
    assert torch.equal(after_reset[f"{name}.W1"][1], saved[f"{name}.W1"][1])


def test_fast_weights_are_float32_in_a_bf16_model():
    lm = tiny_moshi_lm(**{**KW, "dtype": torch.bfloat16})
    patch_moshi(lm, TTTConfig(layer_type="e2e_mlp", mini_batch_size=4, gate_init=0.5))
    c = codes(T=8)
    inputs, targets = delayed_streams(lm, c)
    with inference_context(lm), lm.streaming(2):
        text, _ = chunk_logits(lm, inputs, targets)
        state = TTTModel.of(lm).stream_state()
    assert text.dtype == torch.bfloat16 and {v.dtype for k, v in state.items() if not k.endswith("offset")} == {torch.float32}


def test_streaming_forward_outside_chunk_logits_and_inference_mode_are_refused():
    lm, c = e2e_lm(), codes(T=8)
    inputs, targets = delayed_streams(lm, c)
    with torch.no_grad(), lm.streaming(2), pytest.raises(RuntimeError, match="must go through"):
        lm.forward_text(inputs)
    with torch.inference_mode(), lm.streaming(2), pytest.raises(RuntimeError, match="inference mode"):
        chunk_logits(lm, inputs, targets)


def test_ttt_modules_lists_the_gated_e2e_branches():
    lm = e2e_lm(layers=[1, 3])
    assert [type(m).__name__ for m in inserted_modules(lm)] == ["GatedTTTBranch", "GatedTTTBranch"]


@pytest.mark.parametrize("weight", [1.0, 100.0])
def test_inner_loss_is_the_per_row_next_frame_cross_entropy(weight):
    """ℓ = Σ_rows [mean text CE + audio CE averaged with codebook 1 weighted `weight`], written
    here directly with F.cross_entropy over the scored targets."""
    from torch.nn import functional as F

    from ttt_speech.moshi.e2e import next_frame_loss

    lm, c = e2e_lm(), codes(T=8)
    inputs, targets = delayed_streams(lm, c)
    with torch.no_grad(), lm.streaming(2):
        text, audio = chunk_logits(lm, inputs, targets)
    loss = next_frame_loss(lm, text, audio, targets, weight)
    expected = 0.0
    for row in range(2):
        t_real = targets[row, 0] < TEXT_CARD
        expected += F.cross_entropy(text[row, 0][t_real], targets[row, 0][t_real])
        num = den = 0.0
        for k in range(audio.shape[1]):
            tgt = targets[row, lm.audio_offset + k]
            real = tgt < CARD  # the delay pattern's initial token (= card) is not a target
            w = weight if k == 0 else 1.0
            num += w * F.cross_entropy(audio[row, k][real], tgt[real], reduction="sum")
            den += w * real.sum()
        expected += num / den
    assert abs(loss.item() - float(expected)) < 1e-12


def test_native_evaluation_generation_and_llama_refuse_e2e():
    """The paths that run one frame at a time without gradients say so in one line."""
    from ttt_speech import patch_llama
    from ttt_speech.generation.session import GenerationSession
    from ttt_speech_apps.eval.config import EvalConfig, EvalSettings
    from ttt_speech_apps.eval.plan import plan_eval

    lm = e2e_lm()
    with pytest.raises(ValueError, match="eval.mode: 'both' includes native"):
        plan_eval(EvalConfig(ttt=TTTConfig(layer_type="e2e_mlp", mini_batch_size=4), eval=EvalSettings(mode="both")))
    with pytest.raises(ValueError, match="e2e_mlp models cannot run LMGen.step"):
        GenerationSession(lm, batch_size=1, silence=torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="e2e_mlp is implemented for Moshi only"):
        patch_llama(torch.nn.Module(), TTTConfig(layer_type="e2e_mlp"))


def test_generate_command_refuses_an_e2e_export_before_loading_it(tmp_path, monkeypatch, capsys):
    import ttt_speech.export
    from ttt_speech.cli import main
    from ttt_speech.export import save_export
    from ttt_speech.models import ModelConfig

    tiny = {k: v for k, v in KW.items() if k not in ("dtype",)}
    save_export(e2e_lm(), ModelConfig(tiny=tiny, device="cpu"), tmp_path / "e2e", trainable="ttt")
    prompt = tmp_path / "prompt.safetensors"
    prompt.write_bytes(b"")
    monkeypatch.setattr(ttt_speech.export.Export, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    assert main(["generate", str(prompt), "--out", str(tmp_path / "out"), "--export", str(tmp_path / "e2e")]) == 2
    assert "e2e_mlp models cannot run LMGen.step" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
