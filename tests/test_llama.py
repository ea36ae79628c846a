"""TTT inside tiny random-init transformers Llama / Qwen2 models (width 64, 4 layers) and the
LLaMA-Omni-style speech front end. Needs the `omni` extra (transformers 5.x).

Caches are passed under the keyword the installed transformers uses (`cache` from 5.24 on,
`past_key_values` on 5.23), and passing the cache must never trip transformers' deprecation of
the old name: on 5.24 that keyword, if it reached transformers, would be dropped (TTT layers
without their state) or would warn.
"""
import json
import warnings

import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402
from transformers import DynamicCache  # noqa: E402

from conftest import inserted_modules, max_diff  # noqa: E402
from ttt_speech import TTTConfig, TTTModel, load_ttt, patch_llama, save_ttt  # noqa: E402
from ttt_speech.llama import (  # noqa: E402
    SPEECH_TOKEN_INDEX,
    TTTCache,
    TTTMonitor,
    load_omni_pretrained,
    modules,  # noqa: E402
    plot_monitor,
    read_monitor,
    speech_prompt_ids,
    tiny_llm,
    tiny_omni,
)
from ttt_speech.llama.compat import CACHE_FIELD, CACHE_KWARG  # noqa: E402
from ttt_speech.llama.modules import LlamaTTT  # noqa: E402

VOCAB, TOL = 128, 1e-4
ARCHS = ["llama", "qwen2"]
CONFIGS = [(arch, mode, lt) for arch in ARCHS for mode in ("replace", "hybrid") for lt in ("linear", "mlp")]
GEN = dict(do_sample=False, output_logits=True, return_dict_in_generate=True)

pytestmark = pytest.mark.filterwarnings("error:.*`past_key_values`:FutureWarning")


def kv(cache):
    """The cache as a keyword argument under the installed transformers' name."""
    return {CACHE_KWARG: cache}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Models this small gain nothing from intra-op threads, and OpenMP threads spinning on a
    shared 2-core machine made these tests 10-100x slower (measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def patched(arch="llama", mode="hybrid", layer_type="linear", b=4, layers="all", seed=0, **cfg):
    """A tiny model with TTT layers whose fast weights and gates are far from init, so that TTT
    visibly changes the logits (random init barely does: W ~ N(0, 0.02), gate tanh(0.1))."""
    model = tiny_llm(arch, seed=seed)
    patch_llama(model, TTTConfig(layer_type=layer_type, mode=mode, mini_batch_size=b, layers=layers, **cfg))
    torch.manual_seed(seed + 100)
    with torch.no_grad():
        for m in inserted_modules(model):
            layer = m.layer if isinstance(m, LlamaTTT) else m.ttt.layer
            for name in layer.fast_names:
                getattr(layer, name).normal_(std=0.3)
            layer.tau_offset.normal_(std=0.1)
            layer.lr_gate_bias.fill_(2.0)
            layer.o_proj.weight.normal_(std=64 ** -0.5)
            if hasattr(m, "gate_alpha"):
                m.gate_alpha.fill_(0.5)
    return model


def tokens(B=1, T=9, seed=0):
    return torch.randint(3, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


def generate(model, ids, n=6, **kw):
    """Greedy decoding of exactly n tokens (eos suppressed) with their raw logits."""
    out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, **GEN, **kw)
    return out.sequences, torch.stack(out.logits, dim=1)


def full_logits(model, ids):
    with torch.no_grad():
        return model(ids, use_cache=False).logits


def reset_ttt_only(cache):
    """Forget the TTT state but keep the KV: the conversation then continues without its memory."""
    for slot in cache.ttt_slots.values():
        slot.state = None


# --- exactness of the patch ------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("layer_type", ["linear", "mlp"])
def test_hybrid_with_zero_gate_reproduces_the_model_exactly(arch, layer_type):
    base, ids = tiny_llm(arch), tokens(B=2, T=11)
    before_full = full_logits(base, ids)
    before_gen = generate(base, ids, attention_mask=torch.ones_like(ids))
    model = tiny_llm(arch)
    patch_llama(model, TTTConfig(layer_type=layer_type, mode="hybrid", gate_init=0.0, mini_batch_size=4))
    assert torch.equal(full_logits(model, ids), before_full)
    after_gen = generate(model, ids, **kv(TTTCache(model)), attention_mask=torch.ones_like(ids))
    assert torch.equal(after_gen[0], before_gen[0]) and torch.equal(after_gen[1], before_gen[1])
    # ... and a nonzero gate does change it
    with torch.no_grad():
        for m in inserted_modules(model):
            m.gate_alpha.fill_(0.5)
    assert max_diff(full_logits(model, ids), before_full) > 1e-3


# --- streaming: prefill + decode == one pass --------------------------------------------------


@pytest.mark.parametrize("arch,mode,layer_type", CONFIGS)
def test_prefill_then_token_by_token_equals_full_forward(arch, mode, layer_type):
    model, ids = patched(arch, mode, layer_type), tokens(B=2, T=24)
    full = full_logits(model, ids)
    cache = TTTCache(model)
    with torch.no_grad():
        parts = [model(ids[:, :13], **kv(cache)).logits]  # 13: not a multiple of b = 4
        parts += [model(ids[:, t:t + 1], **kv(cache)).logits for t in range(13, 24)]
    assert max_diff(torch.cat(parts, dim=1), full) <= TOL
    assert cache.get_seq_length() == 24


@pytest.mark.parametrize("mode", ["replace", "hybrid"])
def test_the_decode_check_catches_a_lost_ttt_state(mode):
    """Same as above but the TTT state is dropped after the prefill (KV kept): must differ."""
    model, ids = patched("llama", mode), tokens(B=2, T=24)
    full = full_logits(model, ids)
    cache = TTTCache(model)
    with torch.no_grad():
        model(ids[:, :13], **kv(cache))
        reset_ttt_only(cache)
        decoded = torch.cat([model(ids[:, t:t + 1], **kv(cache)).logits for t in range(13, 24)], dim=1)
    assert max_diff(decoded, full[:, 13:]) > 1e-2


@pytest.mark.parametrize("arch,mode", [(a, m) for a in ARCHS for m in ("replace", "hybrid")])
def test_generate_matches_a_full_forward_over_its_output(arch, mode):
    model, ids = patched(arch, mode, layers=[1, 3] if mode == "replace" else "all"), tokens(B=2, T=9)
    seq, logits = generate(model, ids, n=8, attention_mask=torch.ones_like(ids))
    assert seq.shape == (2, 17)
    assert max_diff(logits, full_logits(model, seq)[:, 8:-1]) <= TOL


def test_generate_without_a_cache_or_with_a_plain_dynamic_cache():
    model, ids = patched("llama", "replace", layers=[0, 2]), tokens(T=9)
    reference, _ = generate(model, ids)  # generate() makes its own cache: converted to a TTTCache
    user = DynamicCache()
    seq, _ = generate(model, ids, **kv(user))
    assert isinstance(user, TTTCache) and user.ttt_slots[0].state is not None  # converted in place
    assert torch.equal(seq, reference) and user.get_seq_length() == 9 + 6 - 1
    used = DynamicCache()
    tiny_llm()(ids, **kv(used))  # holds tokens seen without TTT state
    with pytest.raises(ValueError, match=f"{CACHE_KWARG}: this DynamicCache already holds tokens"):
        model(ids, **kv(used))


def test_beam_search_and_sampling_run():
    model, ids = patched("qwen2", "hybrid"), tokens(B=2, T=7)
    out = model.generate(ids, max_new_tokens=4, num_beams=3, do_sample=False, attention_mask=torch.ones_like(ids))
    assert out.shape[0] == 2
    out = model.generate(ids, max_new_tokens=4, do_sample=True, num_return_sequences=2,
                         attention_mask=torch.ones_like(ids))
    assert out.shape[0] == 4


def test_cache_rows_follow_beam_reordering():
    model, ids = patched("llama", "hybrid"), tokens(B=3, T=6)
    cache = TTTCache(model)
    with torch.no_grad():
        model(ids, **kv(cache))
    before = cache.ttt_state(0).weights[0].clone()
    cache.reorder_cache(torch.tensor([2, 0, 0]))
    assert torch.equal(cache.ttt_state(0).weights[0], before[[2, 0, 0]])
    with pytest.raises(ValueError, match="cannot be rolled back"):
        cache.crop(-1)


# --- state across turns ----------------------------------------------------------------------


@pytest.mark.parametrize("arch,mode", [(a, m) for a in ARCHS for m in ("replace", "hybrid")])
def test_two_turns_with_one_cache_equal_one_pass_over_both(arch, mode):
    model = patched(arch, mode, layer_type="mlp" if mode == "hybrid" else "linear")
    turn1, user2 = tokens(T=9, seed=1), tokens(T=5, seed=2)
    cache = TTTCache(model)
    seq1, logits1 = generate(model, turn1, **kv(cache))
    history = torch.cat([seq1, user2], dim=1)  # next turn: whole history + the same cache
    seq2, logits2 = generate(model, history, **kv(cache))
    full = full_logits(model, seq2)
    assert max_diff(logits2, full[:, history.shape[1] - 1:-1]) <= TOL
    assert max_diff(logits1, full[:, turn1.shape[1] - 1:seq1.shape[1] - 1]) <= TOL
    # forward-level turns: the second turn's logits equal the tail of one pass
    cache = TTTCache(model)
    with torch.no_grad():
        model(seq1, **kv(cache))
        second = model(user2, **kv(cache)).logits
    assert max_diff(second, full_logits(model, history)[:, seq1.shape[1]:]) <= TOL


def test_turn_two_without_the_ttt_state_differs():
    model = patched("llama", "hybrid")
    turn1, user2 = tokens(T=9, seed=1), tokens(T=5, seed=2)
    cache = TTTCache(model)
    seq1, _ = generate(model, turn1, **kv(cache))
    reset_ttt_only(cache)
    history = torch.cat([seq1, user2], dim=1)
    with torch.no_grad():
        second = model(history[:, cache.get_seq_length():], **kv(cache)).logits
    assert max_diff(second, full_logits(model, history)[:, cache.get_seq_length() - second.shape[1]:]) > 1e-2


@pytest.mark.parametrize("mode", ["replace", "hybrid"])
def test_reset_or_new_cache_gives_first_turn_behaviour_again(mode):
    model = patched("llama", mode)
    turn1, user2, other = tokens(T=9, seed=1), tokens(T=5, seed=2), tokens(T=9, seed=3)
    cache = TTTCache(model)
    seq1, logits1 = generate(model, turn1, **kv(cache))
    generate(model, torch.cat([seq1, user2], dim=1), **kv(cache))
    cache.reset()
    assert cache.get_seq_length() == 0 and all(s.state is None for s in cache.ttt_slots.values())
    again = generate(model, turn1, **kv(cache))
    fresh = generate(model, turn1, **kv(TTTCache(model)))
    for seq, logits in (again, fresh):
        assert torch.equal(seq, seq1) and max_diff(logits, logits1) <= 1e-6
    # a conversation that continues instead of resetting sees other logits for the same tokens
    with torch.no_grad():
        continued = model(other, **kv(cache)).logits
    assert max_diff(continued, full_logits(model, other)) > 1e-2


def test_inference_mode_two_turns():
    model = patched("qwen2", "replace", layer_type="mlp")
    turn1, user2 = tokens(T=9, seed=1), tokens(T=5, seed=2)
    with torch.no_grad():
        cache = TTTCache(model)
        seq1, _ = generate(model, turn1, **kv(cache))
        ref = generate(model, torch.cat([seq1, user2], dim=1), **kv(cache))
    with torch.inference_mode():
        cache = TTTCache(model)
        seq1, _ = generate(model, turn1, **kv(cache))
        got = generate(model, torch.cat([seq1, user2], dim=1), **kv(cache))
    assert torch.equal(got[0], ref[0]) and max_diff(got[1], ref[1]) <= 1e-6


def test_forward_and_generate_with_a_cache_raise_no_future_warning():
    """Every path a cache takes through a patched model (hybrid and replace layers, the model's
    own cache, the speech front end, the monitor's hook) stays clear of deprecated keywords."""
    model, ids = patched("llama", "hybrid", layers=[0]), tokens(T=6)
    replace = patched("qwen2", "replace", layers=[1])
    omni = tiny_omni()
    patch_llama(omni.llm, TTTConfig(mode="hybrid", layers=[2], mini_batch_size=4))
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        for m in (model, replace):
            cache = TTTCache(m)
            with torch.no_grad(), TTTMonitor(m):
                m(ids, **kv(cache))
                m.generate(torch.cat([ids, tokens(T=2)], dim=1), max_new_tokens=3, do_sample=False, **kv(cache))
                m.generate(ids, max_new_tokens=2, do_sample=False)
                assert isinstance(getattr(m(ids), CACHE_FIELD), TTTCache)  # the output's cache field, read
                assert getattr(m(ids, use_cache=False), CACHE_FIELD) is None    # without its deprecated alias
        feats = omni.encode_speech(torch.randn(1, 40, 16))
        for name in ("cache", "past_key_values"):
            omni.generate(speech_prompt(), speech_features=feats, max_new_tokens=2, do_sample=False,
                          **{name: TTTCache(omni.llm)})


# --- batch rows --------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["replace", "hybrid"])
def test_batch_rows_are_independent(mode):
    model, ids = patched("llama", mode), tokens(B=3, T=14)
    cache = TTTCache(model)
    with torch.no_grad():
        batch = torch.cat([model(ids[:, s:e], **kv(cache)).logits for s, e in ((0, 6), (6, 14))], dim=1)
    for r in range(3):
        assert max_diff(batch[r], full_logits(model, ids[r:r + 1])[0]) <= TOL


@pytest.mark.parametrize("mode", ["replace", "hybrid"])
def test_left_padded_batch_generates_like_each_row_alone(mode, monkeypatch):
    model = patched("llama", mode, layers=[0, 1])
    short, long = tokens(T=5, seed=4), tokens(T=11, seed=5)
    ids = torch.cat([torch.cat([torch.zeros(1, 6, dtype=torch.long), short], dim=1), long])
    mask = torch.ones_like(ids)
    mask[0, :6] = 0
    _, batch = generate(model, ids, attention_mask=mask, **kv(TTTCache(model)))
    for row, alone in enumerate((short, long)):
        _, single = generate(model, alone, **kv(TTTCache(model)))
        assert max_diff(batch[row], single[0]) <= TOL
    # TTT layers that read the padding as tokens (attention still masking it) change row 0
    monkeypatch.setattr(modules, "_chunk_token_mask", lambda attention_mask, length: None)
    _, unmasked = generate(model, ids, attention_mask=mask, **kv(TTTCache(model)))
    assert max_diff(unmasked[0], batch[0]) > 1e-2 and max_diff(unmasked[1], batch[1]) <= TOL


def test_padding_in_the_middle_is_rejected():
    model, ids = patched("llama", "replace"), tokens(B=1, T=6)
    with pytest.raises(ValueError, match="attention_mask: TTT layers need each row's tokens"):
        model(ids, attention_mask=torch.tensor([[1, 1, 0, 1, 1, 1]]))


# --- training ----------------------------------------------------------------------------------


def test_gradients_reach_the_ttt_parameters_and_state_detaches():
    model = patched("llama", "hybrid", layer_type="mlp").train()
    ids = tokens(B=2, T=12)
    cache = TTTCache(model)
    model(ids[:, :6], labels=ids[:, :6], **kv(cache)).loss.backward()
    cache.detach_ttt_()
    states = [s.state for s in cache.ttt_slots.values()]
    assert states and all(not t.requires_grad for state in states for t in state.tensors())
    names = [n for n, p in model.named_parameters() if "ttt_branch" in n]
    assert names and all(model.get_parameter(n).grad is not None for n in names)


# --- patching, report, weights -------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_patch_report_and_layer_selection(arch):
    model = tiny_llm(arch)
    base = sum(p.numel() for p in model.parameters())
    report = patch_llama(model, TTTConfig(layers="every:2", mode="replace", mini_batch_size=8))
    assert report.host == "llama" and report.layers == [1, 3] and report.depth == 4
    assert report.num_heads == 4 and report.head_dim == 16 and report.params_before == base
    assert report.params_after == base - report.params_removed + report.params_added
    assert "1, 3 (2 of 4)" in str(report) and TTTModel.of(model).report is report
    assert all(isinstance(model.model.layers[i].self_attn, LlamaTTT) for i in (1, 3))
    assert not isinstance(model.model.layers[0].self_attn, LlamaTTT)
    with pytest.raises(ValueError, match="already patched"):
        patch_llama(model, TTTConfig())


def test_patch_errors_name_the_field():
    with pytest.raises(ValueError, match="TTTConfig.layers: index 4 out of range"):
        patch_llama(tiny_llm(), TTTConfig(layers=[0, 4]))
    with pytest.raises(ValueError, match="TTTConfig.num_heads"):
        patch_llama(tiny_llm(), TTTConfig(num_heads=3))
    with pytest.raises(TypeError, match="expected a transformers Llama / Qwen2 model"):
        patch_llama(torch.nn.Linear(2, 2), TTTConfig())
    with pytest.raises(ValueError, match="TTTCache: the model has no TTT layers"):
        TTTCache(tiny_llm())


def test_init_from_attention_copies_square_projections():
    model = tiny_llm("llama", num_key_value_heads=4)
    attn = model.model.layers[0].self_attn
    q, k, v, o = (p.weight.clone() for p in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj))
    patch_llama(model, TTTConfig(mode="replace", layers=[0], init_from_attention=True))
    core = model.model.layers[0].self_attn.layer
    assert torch.equal(core.qkv_proj.weight, torch.cat((q, k, v))) and torch.equal(core.o_proj.weight, o)


@pytest.mark.parametrize("arch,mode", [("llama", "hybrid"), ("qwen2", "replace")])
def test_save_and_load_ttt_weights_onto_a_fresh_base(tmp_path, arch, mode):
    model, ids = patched(arch, mode, layer_type="mlp", layers="last:0.5"), tokens(B=2, T=10)
    save_ttt(model, tmp_path)
    meta = json.loads((tmp_path / "ttt_config.json").read_text())
    assert meta["host"] == "llama" and meta["report"]["layers"] == [2, 3]
    fresh = tiny_llm(arch)
    assert load_ttt(fresh, tmp_path).layers == [2, 3]
    assert torch.equal(full_logits(fresh, ids), full_logits(model, ids))


def test_dtype_bf16_keeps_fp32_state():
    model = tiny_llm("llama", dtype=torch.bfloat16)
    patch_llama(model, TTTConfig(mode="replace", mini_batch_size=4))
    cache = TTTCache(model)
    with torch.no_grad():
        out = model(tokens(T=6), **kv(cache)).logits
    assert out.dtype == torch.bfloat16 and cache.ttt_state(0).weights[0].dtype == torch.float32


# --- speech front end --------------------------------------------------------------------------


def speech_prompt(n_text=(3, 4), seed=0):
    """input_ids: text, <speech>, text."""
    a, b = tokens(T=n_text[0], seed=seed), tokens(T=n_text[1], seed=seed + 1)
    return torch.cat([a, torch.full((1, 1), SPEECH_TOKEN_INDEX), b], dim=1)


@pytest.mark.parametrize("arch", ARCHS)
def test_speech_front_end_runs_end_to_end_with_ttt(arch):
    omni = tiny_omni(arch)  # Whisper encoder (16 mels, 40 frames) → k=2 stacking → LLM
    patch_llama(omni.llm, TTTConfig(mode="hybrid", mini_batch_size=4))
    g = torch.Generator().manual_seed(0)
    mel = torch.randn(1, 40, 16, generator=g)  # [utterances, frames, mels], as LLaMA-Omni's loader
    ids = speech_prompt()
    features = omni.encode_speech(mel, torch.tensor([40]))
    assert [f.shape for f in features] == [(10, 64)]  # 40 frames → 20 encoder frames → 10 positions
    embeds, mask = omni.embed(ids, features)
    assert embeds.shape == (1, 3 + 10 + 4, 64) and mask.all()
    assert torch.equal(embeds[0, 3:13], features[0]) and torch.equal(
        embeds[0, :3], omni.llm.get_input_embeddings()(ids[0, :3]))
    cache = TTTCache(omni.llm)
    with torch.inference_mode():
        # the front end takes either name on any 5.x (this test `cache=`, the next `past_key_values=`)
        new = omni.generate(ids, speech=mel, speech_lengths=torch.tensor([40]), cache=cache,
                            max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert new.shape == (1, 5) and cache.get_seq_length() == 17 + 5 - 1
    # speech_lengths trims an utterance: 30 valid mel frames → 15 encoder frames → 7 positions
    out = omni(ids, speech=mel, speech_lengths=torch.tensor([30]))
    assert out.logits.shape[1] == 3 + 7 + 4


def test_speech_turns_carry_state_and_match_one_pass():
    omni = tiny_omni("llama")
    patch_llama(omni.llm, TTTConfig(mode="replace", mini_batch_size=4, layers=[0, 2]))
    mels = torch.randn(2, 40, 16, generator=torch.Generator().manual_seed(1))
    feats = omni.encode_speech(mels)
    ids1 = speech_prompt(seed=3)
    cache = TTTCache(omni.llm)
    with torch.no_grad():
        new1 = omni.generate(ids1, speech_features=feats[:1], past_key_values=cache, max_new_tokens=4,
                             min_new_tokens=4, do_sample=False)
        history = torch.cat([ids1, new1, speech_prompt(seed=5)], dim=1)  # turn 2: another utterance
        out2 = omni.llm.generate(inputs_embeds=omni.embed(history, feats)[0], **kv(cache),
                                 max_new_tokens=3, min_new_tokens=3, **GEN)
        embeds = omni.embed(torch.cat([history, out2.sequences], dim=1), feats)[0]
        full = omni.llm(inputs_embeds=embeds, use_cache=False).logits
    n = embeds.shape[1]
    assert max_diff(torch.stack(out2.logits, dim=1), full[:, n - 4:n - 1]) <= TOL
    with pytest.raises(ValueError, match="speech: 1 speech segment"):
        omni.embed(history, feats[:1])


def test_speech_batch_is_left_padded_and_rows_independent():
    omni = tiny_omni("qwen2")
    patch_llama(omni.llm, TTTConfig(mode="hybrid", mini_batch_size=4))
    mels = torch.randn(2, 40, 16, generator=torch.Generator().manual_seed(2))
    lengths = torch.tensor([40, 24])  # second utterance shorter: 6 positions instead of 10
    ids = torch.cat([speech_prompt(seed=7), speech_prompt(seed=9)])
    embeds, mask = omni.prepare_inputs(ids, mels, lengths)
    assert mask.sum(1).tolist() == [17, 13] and mask[1, :4].sum() == 0
    with torch.no_grad():
        batch = omni.llm(inputs_embeds=embeds, attention_mask=mask, **kv(TTTCache(omni.llm))).logits
        alone = omni(ids[1:], mels[1:], lengths[1:]).logits
    assert max_diff(batch[1, 4:], alone[0]) <= TOL


def test_speech_prompt_ids_marks_the_placeholders():
    def tokenizer(text, add_special_tokens=True):  # one id per character, BOS = 1
        return {"input_ids": ([1] if add_special_tokens else []) + [ord(c) for c in text]}

    assert speech_prompt_ids(tokenizer, "ab<speech>c") == [1, 97, 98, SPEECH_TOKEN_INDEX, 99]
    assert speech_prompt_ids(tokenizer, "<speech><speech>", add_special_tokens=False) == [SPEECH_TOKEN_INDEX] * 2


def test_load_omni_checkpoint_layout(tmp_path):
    """A directory laid out like a LLaMA-Omni checkpoint (Omni config, projector in the weights)."""
    omni = tiny_omni("llama")
    omni.llm.save_pretrained(tmp_path)
    from safetensors.torch import load_file, save_file
    weights = load_file(tmp_path / "model.safetensors")
    weights.update({f"model.speech_projector.{k}": v.contiguous() for k, v in omni.projector.state_dict().items()})
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((tmp_path / "config.json").read_text())
    config.update(model_type="omni_speech_llama", architectures=["OmniSpeechLlamaForCausalLM"],
                  speech_encoder="models/speech_encoder/large-v3.pt", speech_encoder_type="whisper",
                  speech_projector_type="linear", speech_encoder_ds_rate=2, speech_encoder_hidden_size=32)
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = load_omni_pretrained(tmp_path, speech_encoder=omni.speech_encoder, dtype=torch.float32)
    ids, mel = speech_prompt(), torch.randn(1, 40, 16)
    with torch.no_grad():
        assert torch.equal(loaded(ids, mel).logits, omni(ids, mel).logits)
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_omni_pretrained(tmp_path / "missing")


# --- monitor -------------------------------------------------------------------------------------


def test_monitor_writes_a_csv_and_a_plot(tmp_path):
    model = patched("llama", "hybrid", layers=[1, 3])
    turn1 = tokens(T=9, seed=1)
    cache = TTTCache(model)
    with TTTMonitor(model, tmp_path / "state.csv") as monitor:
        seq1, _ = generate(model, turn1, n=4, **kv(cache))
        cache.reset()
        generate(model, turn1, n=4, **kv(cache))
    data = read_monitor(tmp_path / "state.csv")
    assert sorted(data) == [1, 3] and len(monitor.rows) == 2 * 2 * 4  # 2 layers x 2 turns x (prefill + 3)
    first = data[1]
    assert first["tokens"] == [9, 10, 11, 12, 9, 10, 11, 12]  # the reset starts a new conversation
    assert first["w_delta"][0] > 0 and first["w_norm"][0] > 0 and 0 < first["eta_mean"][0] < 1
    assert first["w_delta"][:4] == first["w_delta"][4:]  # same conversation, same state
    png = plot_monitor(tmp_path / "state.csv", tmp_path / "state.png")
    assert png.stat().st_size > 1000
    with pytest.raises(ValueError, match="not a TTT monitor CSV"):
        (tmp_path / "bad.csv").write_text("a,b\n1,2\n")
        read_monitor(tmp_path / "bad.csv")


def test_monitor_and_handle_find_the_patched_llm_inside_the_speech_front_end():
    from ttt_speech import TTTModel

    omni = tiny_omni()
    patch_llama(omni.llm, TTTConfig(mode="hybrid", layers=[2], mini_batch_size=4))
    assert TTTModel.find(omni).model is omni.llm
    with TTTMonitor(omni) as monitor:
        omni.generate(speech_prompt(), speech_features=omni.encode_speech(torch.randn(1, 40, 16)), max_new_tokens=2,
                      do_sample=False, **kv(TTTCache(omni.llm)))
    assert monitor.rows and {r["layer"] for r in monitor.rows} == {2}
