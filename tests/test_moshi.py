"""TTT inside a tiny random-init Moshi-architecture LMModel (dim 128, 4 layers, depformer 2)."""
import pytest
import torch
from moshi.models.lm import LMGen

from conftest import inserted_modules, max_diff
from ttt_speech import TTTConfig, TTTModel, load_ttt, patch_moshi, save_ttt, tiny_moshi_lm
from ttt_speech.moshi import teacher_forced_logits
from ttt_speech.moshi.streaming import MoshiTTT
from ttt_speech.moshi.teacher_forcing import chunk_logits, delayed_streams

CARD, TEXT_CARD, T = 64, 100, 48


def tiny_lm(seed=0):
    return tiny_moshi_lm(seed=seed, card=CARD, text_card=TEXT_CARD)


def random_codes(B=2, T=T, seed=0):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, CARD, (B, 17, T), generator=g)
    codes[:, 0] = torch.randint(0, TEXT_CARD, (B, T), generator=g)
    return codes



def assert_close(a, b, tol):
    for x, y in zip((a.text_logits, a.logits), (b.text_logits, b.logits)):
        assert torch.equal(x.isnan(), y.isnan())
        assert max_diff(x.nan_to_num(), y.nan_to_num()) <= tol


def activate_gates(lm, value=0.5):
    with torch.no_grad():
        for m in inserted_modules(lm):
            if hasattr(m, "gate_alpha"):
                m.gate_alpha.fill_(value)


CONFIGS = [(mode, lt) for mode in ("replace", "hybrid") for lt in ("linear", "mlp")]


@pytest.mark.parametrize("layer_type", ["linear", "mlp"])
def test_hybrid_with_zero_gate_reproduces_the_model_exactly(layer_type):
    lm, codes = tiny_lm(), random_codes()
    with torch.no_grad():
        before = lm(codes)
        patch_moshi(lm, TTTConfig(layer_type=layer_type, mode="hybrid", gate_init=0.0, mini_batch_size=4))
        after = lm(codes)
        streamed = teacher_forced_logits(lm, codes, chunk_size=7)
        before_streamed = teacher_forced_logits(tiny_lm(), codes, chunk_size=7)
    assert_close(after, before, tol=0.0)
    assert_close(streamed, before_streamed, tol=0.0)


@pytest.mark.parametrize("mode,layer_type", CONFIGS)
def test_chunked_streaming_equals_full_forward(mode, layer_type):
    lm = tiny_lm()
    patch_moshi(lm, TTTConfig(layer_type=layer_type, mode=mode, mini_batch_size=4, layers="every:2"))
    activate_gates(lm)
    codes = random_codes()
    with torch.no_grad():
        full = lm(codes)
        for chunk in (1, 5, 16, 37):
            assert_close(teacher_forced_logits(lm, codes, chunk), full, tol=1e-4)


def test_chunked_comparison_can_fail():
    """Calling LMModel.forward per chunk re-applies the delays: the comparison must catch it."""
    lm = tiny_lm()
    patch_moshi(lm, TTTConfig(mini_batch_size=4))
    codes = random_codes()
    with torch.no_grad():
        full = lm(codes)
        with lm.streaming(2):
            parts = [lm(codes[:, :, s:s + 16]) for s in range(0, T, 16)]
    wrong = torch.cat([p.logits for p in parts], dim=2)
    assert max_diff(wrong.nan_to_num(), full.logits.nan_to_num()) > 1e-2


@pytest.mark.parametrize("mode,layer_type", CONFIGS)
def test_patched_models_run_lmgen_step(mode, layer_type):
    lm = tiny_lm()
    patch_moshi(lm, TTTConfig(layer_type=layer_type, mode=mode, mini_batch_size=4))
    gen = LMGen(lm, temp=0.8, temp_text=0.7)
    user = random_codes()[:, 9:]
    outs = []
    with gen.streaming(2):
        for t in range(12):
            out = gen.step(user[:, :, t:t + 1])
            if out is not None:
                outs.append(out)
        states = [m.live_state() for m in lm.modules() if isinstance(m, MoshiTTT)]
    assert len(outs) == 12 - max(lm.delays) and outs[0].shape == (2, 9, 1)
    assert len(states) == 4 and all(s.offset.tolist() == [0, 0] for s in states)  # 12 steps = 3 mini-batches of 4


def test_reset_streaming_resets_ttt_rows():
    lm = tiny_lm()
    patch_moshi(lm, TTTConfig(mini_batch_size=4))
    codes = random_codes(B=2)
    inputs, targets = delayed_streams(lm, codes)
    with torch.no_grad(), lm.streaming(2):
        chunk_logits(lm, inputs[:, :, :10], targets[:, :, :10])
        ttt = [m for m in lm.modules() if isinstance(m, MoshiTTT)]
        before = [m.live_state() for m in ttt]
        lm.reset_streaming(torch.tensor([True, False]))
        for m, old in zip(ttt, before):
            st, init = m.live_state(), m.layer.initial_state(2)
            assert torch.equal(st.weights[0][0], init.weights[0][0]) and st.offset.tolist() == [0, 10 % 4]
            assert torch.equal(st.weights[0][1], old.weights[0][1])
            assert torch.equal(st.grads[0][1], old.grads[0][1])


def test_exec_mask_leaves_ttt_state_untouched():
    lm = tiny_lm()
    patch_moshi(lm, TTTConfig(mini_batch_size=4, mode="replace"))
    codes = random_codes(B=2)
    inputs, targets = delayed_streams(lm, codes)
    with torch.no_grad(), lm.streaming(2):
        chunk_logits(lm, inputs[:, :, :6], targets[:, :, :6])
        before = TTTModel.of(lm).stream_state()
        lm.set_exec_mask(torch.tensor([True, False]))
        chunk_logits(lm, inputs[:, :, 6:9], targets[:, :, 6:9])
        after = TTTModel.of(lm).stream_state()
    for k in before:
        assert torch.equal(after[k][1], before[k][1]), k
    assert any(not torch.equal(after[k][0], before[k][0]) for k in before if "W1" in k)


def test_stream_state_save_and_restore_continues_identically():
    lm = tiny_lm()
    patch_moshi(lm, TTTConfig(mini_batch_size=4, mode="replace", layers=[0, 1, 2, 3]))
    codes = random_codes(B=1)
    inputs, targets = delayed_streams(lm, codes)
    with torch.no_grad():
        with lm.streaming(1):  # attention-free model: the TTT state is the whole state
            chunk_logits(lm, inputs[:, :, :13], targets[:, :, :13])
            saved = {k: v.clone() for k, v in TTTModel.of(lm).stream_state().items()}
            live = chunk_logits(lm, inputs[:, :, 13:], targets[:, :, 13:])
        with lm.streaming(1):
            TTTModel.of(lm).load_stream_state(saved)
            restored = chunk_logits(lm, inputs[:, :, 13:], targets[:, :, 13:])
    assert all(torch.equal(a, b) for a, b in zip(live, restored))


def test_save_and_load_ttt_weights_onto_a_fresh_base(tmp_path):
    lm = tiny_lm()
    report = patch_moshi(lm, TTTConfig(layer_type="mlp", layers="last:0.5", mini_batch_size=4, kernel="torch"))
    activate_gates(lm, 0.3)
    save_ttt(lm, tmp_path / "export")
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == ["ttt.safetensors", "ttt_config.json"]
    fresh = tiny_lm()
    loaded = load_ttt(fresh, tmp_path / "export")
    assert loaded.layers == report.layers == [2, 3]
    assert TTTModel.of(fresh).config.kernel == "auto"  # the loading machine's choice, not the export's
    codes = random_codes()
    with torch.no_grad():
        assert_close(fresh(codes), lm(codes), tol=0.0)


def test_exports_with_separate_q_k_v_projections_still_load(tmp_path):
    """Exports written before the fused `qkv_proj` hold `q_proj` / `k_proj` / `v_proj` weights."""
    from safetensors.torch import load_file, save_file

    lm = tiny_lm()
    patch_moshi(lm, TTTConfig(layers=[1], mini_batch_size=4))
    activate_gates(lm, 0.3)
    save_ttt(lm, tmp_path)
    tensors = load_file(str(tmp_path / "ttt.safetensors"))
    (fused,) = [n for n in tensors if n.endswith(".qkv_proj.weight")]
    prefix = fused[: -len("qkv_proj.weight")]
    for part, w in zip(("q", "k", "v"), tensors.pop(fused).chunk(3)):
        tensors[f"{prefix}{part}_proj.weight"] = w.contiguous()
    save_file(tensors, str(tmp_path / "ttt.safetensors"))
    fresh = tiny_lm()
    load_ttt(fresh, tmp_path)
    codes = random_codes()
    with torch.no_grad():
        assert_close(fresh(codes), lm(codes), tol=0.0)


def test_full_exports_with_separate_q_k_v_projections_still_load(tmp_path):
    """`trainable: full` exports hold the whole state dict, TTT projections included."""
    from safetensors.torch import load_file, save_file

    from ttt_speech.export import load_exported_lm, save_export
    from ttt_speech.models import ModelConfig

    tiny = {"card": CARD, "text_card": TEXT_CARD}
    lm = tiny_moshi_lm(**tiny)
    patch_moshi(lm, TTTConfig(layers=[1], mini_batch_size=4))
    activate_gates(lm, 0.3)
    save_export(lm, ModelConfig(tiny=tiny, device="cpu"), tmp_path, trainable="full")
    path = tmp_path / "model.safetensors"
    tensors = load_file(str(path))
    for fused in [n for n in tensors if n.endswith(".qkv_proj.weight")]:
        prefix = fused[: -len("qkv_proj.weight")]
        for part, w in zip(("q", "k", "v"), tensors.pop(fused).chunk(3)):
            tensors[f"{prefix}{part}_proj.weight"] = w.contiguous()
    save_file(tensors, str(path))
    loaded, _ = load_exported_lm(tmp_path)
    codes = random_codes()
    with torch.no_grad():
        assert_close(loaded(codes), lm(codes), tol=0.0)


def test_streams_step_in_place_only_buffers_they_own():
    """A stream made under inference_mode and stepped outside it, or given a caller's state with
    `set_live_state` while rebinding, runs out of place: no error, and the caller's state intact."""
    from conftest import make_layer

    module = MoshiTTT(make_layer("linear", b=4, dtype=torch.float32)).eval()
    x = torch.randn(2, 10, 16)
    with torch.inference_mode():
        ctx = module.streaming(2)
        ctx.__enter__()
    try:
        with torch.no_grad():
            for t in range(10):  # crosses mini-batch boundaries outside inference mode
                module(x[:, t:t + 1])
    finally:
        ctx.__exit__(None, None, None)
    lm = tiny_lm()
    patch_moshi(lm, TTTConfig(mini_batch_size=4, gate_init=1.0))
    codes = random_codes(T=12)
    handle = TTTModel.of(lm)
    with torch.no_grad(), lm.streaming(2):
        lm.train()
        lm.forward_text(codes[:, :, :1])  # training mode rebinds: a state set now is the caller's object
        mine = [s.clone() for s in handle.live_states()]
        handle.set_live_states(mine)
        kept = [s.clone() for s in mine]
        lm.eval()
        for t in range(6):
            lm.forward_text(codes[:, :, t:t + 1])
        moved = handle.live_states()
    lm.eval()
    for a, c in zip(mine, kept):
        assert all(torch.equal(x, y) for x, y in zip(a.tensors(), c.tensors()))
    assert not torch.equal(moved[0].weights[0], kept[0].weights[0])


def test_load_ttt_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="ttt_config.json"):
        load_ttt(tiny_lm(), tmp_path)
    lm = tiny_lm()
    patch_moshi(lm, TTTConfig(layers=[0]))
    save_ttt(lm, tmp_path)
    (tmp_path / "ttt_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_ttt(tiny_lm(), tmp_path)


def test_patch_report_and_layer_selection():
    lm = tiny_lm()
    base = sum(p.numel() for p in lm.parameters())
    report = patch_moshi(lm, TTTConfig(layers="every:2", mode="replace", mini_batch_size=8))
    assert report.layers == [1, 3] and report.depth == 4 and report.mode == "replace"
    assert report.params_before == base
    assert report.params_after == base - report.params_removed + report.params_added
    text = str(report)
    assert "1, 3 (2 of 4)" in text and "replace" in text
    assert all(isinstance(lm.transformer.layers[i].self_attn, MoshiTTT) for i in (1, 3))
    assert not any(isinstance(m, MoshiTTT) for m in lm.depformer.modules())
    with pytest.raises(ValueError, match="already patched"):
        patch_moshi(lm, TTTConfig())


def test_out_of_range_layer_index_is_rejected():
    with pytest.raises(ValueError, match="TTTConfig.layers: index 4 out of range"):
        patch_moshi(tiny_lm(), TTTConfig(layers=[0, 4]))


def test_heads_must_divide_width():
    with pytest.raises(ValueError, match="TTTConfig.num_heads"):
        patch_moshi(tiny_lm(), TTTConfig(num_heads=5))


def test_init_from_attention_copies_projections():
    lm = tiny_lm()
    attn = lm.transformer.layers[0].self_attn
    qkv, out = attn.in_projs[0].weight.clone(), attn.out_projs[0].weight.clone()  # [Wq; Wk; Wv], Wo
    patch_moshi(lm, TTTConfig(mode="replace", layers=[0], init_from_attention=True))
    core = lm.transformer.layers[0].self_attn.layer
    assert torch.equal(core.qkv_proj.weight, qkv) and torch.equal(core.o_proj.weight, out)


def test_bf16_model_keeps_float32_ttt_state():
    lm = tiny_moshi_lm(card=CARD, text_card=TEXT_CARD, dtype=torch.bfloat16)
    patch_moshi(lm, TTTConfig(mini_batch_size=4))
    gen = LMGen(lm)
    with gen.streaming(1):
        for t in range(5):
            gen.step(random_codes(B=1)[:, 9:, t:t + 1])
        states = TTTModel.of(lm).stream_state()
    weights = [v for k, v in states.items() if not k.endswith("offset")]
    assert len(weights) == 4 * 4 and all(v.dtype == torch.float32 for v in weights)  # W1, b1, grads x 4 layers


def test_stream_state_is_updated_in_place_without_autograd():
    """CUDA-graph safety: LMGen replays captured kernels, which only see the buffers they were
    captured with, so the TTT state must keep its memory from step to step (moshi's KV cache too)."""
    lm = tiny_lm()
    patch_moshi(lm, TTTConfig(mini_batch_size=4))
    gen = LMGen(lm)
    ttt = [m for m in lm.modules() if isinstance(m, MoshiTTT)]
    with gen.streaming(2):
        buffers = [[t.data_ptr() for t in m.live_state().tensors()] for m in ttt]
        for t in range(6):
            gen.step(random_codes()[:, 9:, t:t + 1])
        gen.reset_streaming(torch.tensor([True, False]))
        gen.step(random_codes()[:, 9:, :1])
        assert buffers == [[t.data_ptr() for t in m.live_state().tensors()] for m in ttt]
        assert ttt[0].live_state().offset.tolist() == [1, 3]


def test_patched_modules_follow_the_host_mode():
    lm = tiny_lm()  # eval mode
    patch_moshi(lm, TTTConfig(layers=[0, 1]))
    assert not any(m.training for m in lm.modules())
    train_lm = tiny_lm().train()
    patch_moshi(train_lm, TTTConfig(layers=[0], mode="replace"))
    assert all(m.training for m in train_lm.modules())


def test_training_stream_keeps_the_graph_to_initial_fast_weights():
    lm = tiny_lm().train()
    # Every layer replaced: moshi's ring KV cache is written in place, so autograd cannot run
    # through streamed attention (a moshi limitation); the TTT state itself keeps its graph.
    patch_moshi(lm, TTTConfig(mini_batch_size=4, mode="replace"))
    inputs, targets = delayed_streams(lm, random_codes())
    with lm.streaming(2):
        for s in (0, 5):  # two windows; the second sees the first one's state
            text, _ = chunk_logits(lm, inputs[:, :, s:s + 5], targets[:, :, s:s + 5])
        text.float().logsumexp(-1).mean().backward()  # (W1 reaches window 2 only via the state)
    assert lm.transformer.layers[0].self_attn.layer.W1.grad.abs().sum() > 0


def test_the_handle_answers_for_the_model_and_for_a_wrapper_around_it():
    from ttt_speech.moshi.teacher_forcing import ChunkModel

    lm = tiny_lm()
    assert TTTModel.find(lm) is None
    with pytest.raises(ValueError, match="has no TTT layers"):
        TTTModel.of(lm)
    report = patch_moshi(lm, TTTConfig(mini_batch_size=4, layers=[1, 3]))
    handle = TTTModel.of(lm)
    assert handle.report is report and handle.host == "moshi" and not handle.has_e2e
    assert [s.layer_index for s in handle.sites] == [1, 3]
    assert [s.name for s in handle.sites] == [f"transformer.layers.{i}.ttt_branch.ttt" for i in (1, 3)]
    assert TTTModel.find(ChunkModel(lm)).model is lm  # a wrapper finds the patched module inside it
    assert sum(p.numel() for p in handle.named_parameters().values()) == report.params_added
    codes = random_codes()
    inputs, targets = delayed_streams(lm, codes)
    with torch.no_grad(), lm.streaming(2):
        start = handle.fast_weight_stats(handle.live_states())
        chunk_logits(lm, inputs[:, :, :9], targets[:, :, :9])  # two mini-batches of 4 complete
        moved = handle.fast_weight_stats(handle.live_states(), eta={1: 0.5})
    assert all(s.w_delta == 0 and s.w_norm > 0 for s in start.values()) and set(start) == {1, 3}
    assert all(s.w_delta > 0 for s in moved.values()) and moved[1].eta_mean == 0.5 and moved[3].eta_mean is None
