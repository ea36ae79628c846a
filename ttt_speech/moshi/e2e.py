"""TTT-E2E in moshi: extra MLPs whose fast weights learn from the model's own next-frame loss.

`patch_moshi(lm, TTTConfig(layer_type="e2e_mlp"))` gives the selected layers (default: the last
quarter) an `E2EMLP` beside their feed-forward block: y = x + FFN(norm2(x)) + tanh(α)·MLP_W(norm(x)).
The update is model-level, so it is done here, by `e2e_chunk_logits` (which `chunk_logits`
calls for such models), one mini-batch of b frames at a time:

    logits_i = lm(frames of mini-batch i; fast weights W_{i-1})       # predict, then learn
    W_i      = W_{i-1} − η ∇_W ℓ_i,   ℓ_i = Σ_rows (text CE + audio CE of the row's mini-batch i)

Contract (the E2E form of the streaming contract, docs/architecture.md §3). A call splits its
chunk into mini-batches of b frames from its first frame, and the last one may be shorter; it is predicted and then learned from
like the others. So any split of a stream into chunks whose lengths are multiples of b (the
last chunk excepted) gives exactly the one-pass logits and final state. A call that would start
inside an unfinished mini-batch (the previous chunk was not a multiple of b) is refused.

Two ways to run, as for TTT layers: inside `lm.streaming(B)` (evaluation: moshi's KV cache
holds the past, each mini-batch is computed once), or in *window mode* under `TTTCarry`
(training: no KV cache, attention limited to the window; mini-batch i recomputes the window's
frames before it with the weights each of them was predicted with, W_0 … W_{i-1}, so a window
of n mini-batches costs n(n+1)/2 mini-batch forwards; docs/e2e.md).

`meta=True` keeps the inner gradients in the graph (second order: the outer loss after
adaptation is differentiated through the updates, TTT-E2E's meta-learning); otherwise the
updates are first order (∂W_i/∂W_{i-1} = I, ∂ℓ/∂W_0 = ∂ℓ/∂W_i: cheap, FOMAML-like).

The update differentiates the model's loss, so it cannot run under `torch.inference_mode()`
(use `ttt_speech.handle.inference_context(lm)`) nor one frame at a time in `LMGen.step`.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from . import _import  # noqa: F401
from moshi.models.lm import LMModel
from moshi.utils.compile import no_compile

from ..handle import TTTModel
from ..state import TTTState
from .internals import detach_kv_caches
from .loss import masked_ce, real_targets
from .streaming import MoshiTTT, TTTStreamState


@dataclass
class E2EStreamState(TTTStreamState):
    """A TTT stream state plus the plan of the running `e2e_chunk_logits` call: (frames, state)
    segments, each predicted with its own fast weights (window mode recomputes earlier ones)."""

    plan: list[tuple[int, TTTState]] | None = None

    saved_apart: ClassVar[tuple[str, ...]] = (*TTTStreamState.saved_apart, "plan")


class MoshiE2E(MoshiTTT):
    """An `E2EMLP` as a moshi streaming module (its state is saved, reset and carried like a TTT
    layer's). x [B, T, D] → [B, T, D]; outside a stream it predicts with W0 and never updates."""

    def new_streaming_state(self, batch_size: int) -> E2EStreamState:
        base = super().new_streaming_state(batch_size)
        return E2EStreamState(batch_size, base.device, ttt=base.ttt, reset_fn=base.reset_fn,
                              keep_graph=base.keep_graph)

    def forward(self, x: Tensor, key: Tensor | None = None, value: Tensor | None = None) -> Tensor:
        state = self.streaming_state
        if state is None:
            return self.layer(x)[0]
        if state.plan is None:
            raise RuntimeError(
                "E2E layers learn from the model's loss, so a streaming forward must go through "
                "ttt_speech.moshi.teacher_forcing.chunk_logits (LMGen.step / forward_text alone cannot update them)")
        if sum(frames for frames, _ in state.plan) != x.shape[1]:
            raise RuntimeError(f"E2E plan covers {sum(f for f, _ in state.plan)} frames, the input has {x.shape[1]}")
        outs, start = [], 0
        for frames, weights in state.plan:
            outs.append(self.layer(x[:, start:start + frames], weights)[0])
            start += frames
        return torch.cat(outs, dim=1)


def next_frame_loss(lm: LMModel, text_logits: Tensor, audio_logits: Tensor, targets: Tensor,
                    first_codebook_weight: float = 1.0) -> Tensor:
    """The inner objective ℓ: Σ over rows of (mean text CE + weighted mean audio CE) of the row's
    real targets, the first audio codebook weighted `first_codebook_weight` (each row's gradient
    then only reaches its own fast weights). Shapes as `chunk_logits`."""
    dep_q = audio_logits.shape[1]
    audio_targets = targets[:, lm.audio_offset:lm.audio_offset + dep_q]
    dtype = torch.promote_types(text_logits.dtype, torch.float32)
    audio_weights = torch.ones(dep_q, device=audio_logits.device, dtype=dtype)
    audio_weights[0] = first_codebook_weight
    total = text_logits.new_zeros((), dtype=dtype)
    for logits, tgt, card, stream_weights in (
            (text_logits, targets[:, :1], lm.text_card, torch.ones_like(audio_weights[:1])),
            (audio_logits, audio_targets, lm.card, audio_weights)):
        real = real_targets(tgt, card)
        w = real * stream_weights[None, :, None]  # [B, streams, S]
        per_row = (masked_ce(logits, tgt, real) * w).sum(dim=(1, 2)) / w.sum(dim=(1, 2)).clamp_min(1e-8)
        total = total + per_row.sum()
    return total


def e2e_chunk_logits(lm: LMModel, inputs: Tensor, targets: Tensor, meta: bool = False) -> tuple[Tensor, Tensor]:
    """`chunk_logits` for a model with E2E layers: predict and update mini-batch by mini-batch.

    inputs, targets [B, K, S] (the delayed stream) → (text logits [B, 1, S, text_card], audio
    logits [B, dep_q, S, card]), each frame predicted before the update on its mini-batch.
    """
    handle = TTTModel.of(lm)
    if not handle.has_e2e:
        raise ValueError(f"e2e_chunk_logits: the model has {handle.config.layer_type} TTT layers, not e2e_mlp "
                         "(use chunk_logits)")
    modules: list[MoshiE2E] = [site.ttt for site in handle.sites]
    states: list[E2EStreamState] = [m.streaming_state for m in modules]
    if any(s is None for s in states):
        raise ValueError("E2E: the model must be streaming (`with lm.streaming(B):`) or in window mode (TTTCarry)")
    if torch.is_inference_mode_enabled():
        raise RuntimeError("E2E layers update by autograd, which inference mode forbids: run the model under "
                           "ttt_speech.handle.inference_context(lm) (torch.no_grad) instead")
    windowed = states[0].window_start is not None
    if windowed and getattr(lm.transformer, "checkpointing", False):
        raise ValueError("E2E layers do not support gradient checkpointing (the recompute would see the last plan)")
    b = handle.config.mini_batch_size
    current = [_start(m, s, windowed) for m, s in zip(modules, states)]
    if bool((current[0].offset != 0).any()):
        raise ValueError(f"E2E: this chunk starts inside an unfinished {b}-frame mini-batch; chunk lengths must be "
                         f"multiples of the mini-batch size ({b}) except the last chunk of a stream")
    outer_grad = torch.is_grad_enabled()
    history: list[list[TTTState]] = []
    texts, audios = [], []
    S = inputs.shape[2]
    # moshi's compiled kernels (gating, RoPE) donate their buffers to a backward that may run only
    # once: keeping the graph for a second backward (training) or a second order (meta) needs eager
    eager = no_compile() if (meta or outer_grad) else contextlib.nullcontext()
    # fused attention kernels have no double backward: second order needs the math kernel
    attention = sdpa_kernel([SDPBackend.MATH]) if meta else contextlib.nullcontext()
    try:
        with torch.enable_grad(), eager, attention:
            for s0 in range(0, S, b):
                s1 = min(s0 + b, S)
                current = [_differentiable(st) for st in current]
                for i, state in enumerate(states):
                    earlier = [(b, h[i]) for h in history] if windowed else []
                    state.plan = earlier + [(s1 - s0, current[i])]
                hidden, text = lm.forward_text(inputs[:, :, :s1] if windowed else inputs[:, :, s0:s1])
                if windowed:
                    hidden, text = hidden[:, s0:], text[:, :, s0:]
                audio = lm.forward_depformer_training(targets[:, :, s0:s1], hidden)
                loss = next_frame_loss(lm, text, audio, targets[:, :, s0:s1], handle.config.e2e_first_codebook_weight)
                fast = [w for st in current for w in st.weights]
                grads = iter(torch.autograd.grad(loss, fast, create_graph=meta, retain_graph=meta or outer_grad,
                                                 allow_unused=True))
                new = []
                for module, state, st in zip(modules, states, current):
                    updated = module.layer.update(st, tuple(next(grads) for _ in st.weights), s1 - s0)
                    updated = updated.where(state.exec_mask, st)  # rows not executing keep their state
                    new.append(updated if outer_grad else updated.detach())
                if not windowed:
                    detach_kv_caches(lm)  # the cache was written with graph; the next write must not chain it
                if windowed:  # streaming keeps the past in the KV cache, not as earlier weights
                    history.append(current)
                current = new
                texts.append(text if outer_grad else text.detach())
                audios.append(audio if outer_grad else audio.detach())
    finally:
        for state in states:
            state.plan = None
    for module, state, st in zip(modules, states, current):
        if windowed:
            state.ttt = st  # rebind: `window_start` stays the window's start (see carry.py)
        else:
            state.keep_graph = module.training
            state.assign(st)
    return torch.cat(texts, dim=2), torch.cat(audios, dim=2)


def _start(module: MoshiE2E, state: E2EStreamState, windowed: bool) -> TTTState:
    start = state.window_start if windowed else state.ttt
    if state.window_reset is not None:
        start = module.layer.reset_state(start, state.window_reset)
    return start


def _differentiable(state: TTTState) -> TTTState:
    """`state` with weights autograd can differentiate: detached leaves when they carry no graph."""
    if all(w.requires_grad for w in state.weights):
        return state
    weights = tuple(w if w.requires_grad else w.detach().clone().requires_grad_(True) for w in state.weights)
    return TTTState(weights, (), state.offset, state.names)
