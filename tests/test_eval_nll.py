"""The evaluator's two modes give the same per-position NLL: the proof that the evaluator is right.

Tiny random-init Moshi-architecture models (dim 128, 4 layers), random codes, float32. The
attention context (16) is shorter than the stream (45), so moshi's ring KV cache wraps in both
modes, and TTT's mini-batch (4) is crossed by aligned and unaligned chunks.
"""
import pytest
import torch

import ttt_speech_apps.eval.nll as nll_module
from conftest import inserted_modules, max_diff
from ttt_speech import TTTConfig, patch_moshi, tiny_moshi_lm
from ttt_speech.moshi import teacher_forced_logits
from ttt_speech.moshi.teacher_forcing import chunk_logits, delayed_streams
from ttt_speech_apps.eval.nll import NonFiniteError, chunked_nll, native_nll, token_nll

CARD, TEXT_CARD, T, CONTEXT, B = 64, 100, 45, 16, 4
TOL = 1e-4


def random_codes(T=T, seed=0):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, CARD, (17, T), generator=g)
    codes[0] = torch.randint(0, TEXT_CARD, (T,), generator=g)
    return codes


def make_lm(ttt: str | None):
    lm = tiny_moshi_lm(card=CARD, text_card=TEXT_CARD, context=CONTEXT)
    if ttt is not None:
        patch_moshi(lm, TTTConfig(mini_batch_size=B, mode=ttt, layers="every:2"))
        with torch.no_grad():  # open the hybrid gates so that TTT visibly acts
            for m in inserted_modules(lm):
                if hasattr(m, "gate_alpha"):
                    m.gate_alpha.fill_(0.5)
    return lm


def nll_diff(a, b) -> float:
    assert torch.equal(a.mask, b.mask)
    return max_diff(a.nll[a.mask], b.nll[b.mask])


@pytest.fixture(scope="module", params=[None, "hybrid", "replace"], ids=["baseline", "ttt-hybrid", "ttt-replace"])
def model_and_native(request):
    lm, codes = make_lm(request.param), random_codes()
    return lm, codes, native_nll(lm, codes, trace_every=B)


@pytest.mark.parametrize("chunk", [B, 2 * B, 5, 7, T])  # aligned with the mini-batch, unaligned, one chunk
def test_chunked_and_native_modes_agree(model_and_native, chunk):
    lm, codes, native = model_and_native
    chunked = chunked_nll(lm, codes, chunk)
    assert chunked.mask.sum() == native.mask.sum() == 9 * T - 7  # 7 delayed codebooks lose their last frame
    assert nll_diff(chunked, native) <= TOL
    if native.weights is not None:  # ‖W_t − W_0‖ is recorded at the same positions in both modes
        if chunk == B:
            assert chunked.weights.positions == native.weights.positions
            for a, b in zip(chunked.weights.distances, native.weights.distances):
                assert max(abs(x - y) for x, y in zip(a, b)) <= 1e-4
        assert native.weights.distances[0][-1] > 0


def test_mode_agreement_catches_a_one_frame_shift(model_and_native, monkeypatch):
    """The agreement check must be able to fail: feed the user's frame t at step t (the training
    layout, which LMGen reads one step later), or force Moshi's audio one frame late."""
    lm, codes, native = model_and_native
    right = nll_module.native_step_inputs

    def user_not_lagged(lm, codes, targets, t):
        _, audio, text = right(lm, codes, targets, t)
        return codes[:, lm.audio_offset + lm.dep_q:, t:t + 1], audio, text

    def audio_late(lm, codes, targets, t):
        user, _, text = right(lm, codes, targets, t)
        return user, targets[:, 1:1 + lm.dep_q, max(t - 1, 0):max(t - 1, 0) + 1], text

    for wrong in (user_not_lagged, audio_late):
        monkeypatch.setattr(nll_module, "native_step_inputs", wrong)
        shifted = native_nll(lm, codes)
        assert nll_diff(shifted, native) > 100 * TOL, wrong.__name__


def test_chunked_streaming_beyond_the_attention_context_needs_wider_kv_caches():
    """moshi's ring KV cache holds `context` steps: a chunk overwrites keys its first queries still
    need once the stream is longer than the context. `teacher_forced_logits` widens the caches."""
    lm, codes = make_lm(None), random_codes()[None]
    with torch.no_grad():
        full = lm(codes)
        assert max_diff(teacher_forced_logits(lm, codes, 8).logits.nan_to_num(), full.logits.nan_to_num()) <= TOL
        inputs, targets = delayed_streams(lm, codes)
        with lm.streaming(1):  # moshi's own caches, not widened
            parts = [chunk_logits(lm, inputs[:, :, s:s + 8], targets[:, :, s:s + 8])[0] for s in range(0, T, 8)]
    assert max_diff(torch.cat(parts, dim=2), lm(codes).text_logits) > 1e-2


def test_token_nll_marks_targets_without_prediction():
    logits = torch.randn(1, 2, 3, 5)
    targets = torch.tensor([[[0, 4, 5], [-1, 2, 1]]])
    out = token_nll(logits, targets)
    assert out[0, 0, 2].isnan() and out[0, 1, 0].isnan()
    assert torch.allclose(out[0, 0, 1], -torch.log_softmax(logits[0, 0, 1], -1)[4])


def test_non_finite_logits_fail_loudly():
    lm = make_lm(None)
    with torch.no_grad():
        lm.linears[0].weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="non-finite NLL .* audio codebook 1"):
        chunked_nll(lm, random_codes(T=8), 4, where="book x")


def test_bad_arguments_are_clear():
    lm = make_lm(None)
    with pytest.raises(ValueError, match="expected codes \\[17, T\\]"):
        chunked_nll(lm, random_codes()[:9], 4)
    with pytest.raises(ValueError, match="eval.chunk_size"):
        chunked_nll(lm, random_codes(), 0)


@pytest.mark.gpu
def test_modes_agree_on_cuda_with_cuda_graphs():
    """On CUDA, LMGen replays CUDA graphs of forward_text: forcing and the logits hook must survive it."""
    lm = make_lm("hybrid").cuda()
    codes = random_codes()
    native = native_nll(lm, codes)
    for chunk in (B, 7):
        assert nll_diff(chunked_nll(lm, codes, chunk), native) <= TOL


@pytest.mark.parametrize("ttt", [None, "hybrid", "e2e_mlp"])
def test_batched_streams_score_as_one_at_a_time(ttt):
    """`batched_nll` (several fresh streams of different lengths side by side, padded at the end)
    equals `chunked_nll` per stream: masks exactly, NLL to float tolerance (E2E layers too)."""
    from ttt_speech_apps.eval.nll import batched_nll

    if ttt == "e2e_mlp":
        lm = tiny_moshi_lm(card=CARD, text_card=TEXT_CARD, context=CONTEXT)
        patch_moshi(lm, TTTConfig(layer_type="e2e_mlp", mini_batch_size=B, layers="every:2"))
    else:
        lm = make_lm(ttt)
    streams = [random_codes(T, seed) for T, seed in ((7, 1), (30, 2), (1, 3), (19, 4))]
    batched = batched_nll(lm, streams, chunk_size=2 * B)
    for codes, (nll, mask) in zip(streams, batched):
        alone = chunked_nll(lm, codes, 2 * B)
        assert torch.equal(mask, alone.mask) and mask.shape == codes[:lm.dep_q + 1].shape
        assert max_diff(nll[mask], alone.nll[alone.mask]) < 1e-5
    first, second = batched[1][0][:, :7], batched[0][0]  # rows differ: a mix-up of rows would show
    assert max_diff(first[batched[0][1]], second[batched[0][1]]) > 1e-2
