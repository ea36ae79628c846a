"""Teacher-forced logits of a moshi LMModel computed chunk by chunk in streaming mode (docs/architecture.md §8).

Calling `LMModel.forward` on each chunk is *not* a streaming path: it prepends the initial token
and re-applies the delay pattern to every chunk. The right way: build the delayed stream once,
run `forward_text` then `forward_depformer_training` per chunk inside `lm.streaming(B)`, and
undelay the collected logits at the end. This equals one full `LMModel.forward`.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import _import  # noqa: F401
from moshi.models.lm import LMModel, LMOutput

from ..config import resolve_chunk_size
from ..handle import TTTModel
from .e2e import e2e_chunk_logits
from .internals import delay_sequence, initial_token, undelay_sequence, widen_kv_caches


def delayed_streams(lm: LMModel, codes: Tensor) -> tuple[Tensor, Tensor]:
    """codes [B, K, T] → (inputs, targets), each [B, K, T]: the delayed stream with the initial
    token prepended, as `LMModel.forward` builds it (inputs are positions 0..T-1, targets 1..T)."""
    B, K, T = codes.shape
    if K != lm.num_codebooks:
        raise ValueError(f"codes: expected {lm.num_codebooks} streams (text + audio), got {K}")
    initial = initial_token(lm).expand(B, -1, -1)
    delayed = torch.cat([initial, delay_sequence(lm, codes, initial)], dim=2)
    return delayed[:, :, :-1], delayed[:, :, 1:]


def chunk_logits(lm: LMModel, inputs: Tensor, targets: Tensor, meta: bool = False) -> tuple[Tensor, Tensor]:
    """One chunk of the delayed stream through a streaming `lm`.

    inputs, targets [B, K, S] → (text logits [B, 1, S, text_card], audio logits [B, dep_q, S, card]),
    both still delayed. `lm` must be inside `lm.streaming(B)` for chunks to continue each other.
    Models with E2E layers learn from the chunk as they go (`e2e.e2e_chunk_logits`; `meta`: keep
    the inner gradients in the graph).
    """
    handle = TTTModel.find(lm, inside=False)  # patch_moshi records the patch on the LMModel itself
    if handle is not None and handle.has_e2e:
        return e2e_chunk_logits(lm, inputs, targets, meta=meta)
    transformer_out, text_logits = lm.forward_text(inputs)
    audio_logits = lm.forward_depformer_training(targets, transformer_out)
    return text_logits, audio_logits


def undelay_logits(lm: LMModel, codes: Tensor, text_logits: Tensor, audio_logits: Tensor) -> LMOutput:
    """Delayed logits → an `LMOutput` aligned with `codes` [B, K, T], masks as `LMModel.forward`."""
    audio, audio_mask = undelay_sequence(
        lm.delays[lm.audio_offset:lm.audio_offset + lm.dep_q], audio_logits, fill_value=float("nan"))
    audio_mask &= codes[:, lm.audio_offset:lm.audio_offset + lm.dep_q] != lm.zero_token_id
    text, text_mask = undelay_sequence(lm.delays[:1], text_logits, fill_value=float("nan"))
    text_mask &= codes[:, :1] != lm.zero_token_id
    return LMOutput(audio, audio_mask, text, text_mask)


def teacher_forced_logits(lm: LMModel, codes: Tensor, chunk_size: int | None = None) -> LMOutput:
    """Logits of every position of codes [B, K, T], computed in streaming chunks of `chunk_size`
    (None: the default of `resolve_chunk_size`, which also checks what E2E layers can take).

    Opens its own `lm.streaming(B)` (a fresh stream: TTT and KV-cache states start empty).
    """
    handle = TTTModel.find(lm)
    chunk_size = resolve_chunk_size(chunk_size, handle.config if handle else None, frames=codes.shape[2])
    inputs, targets = delayed_streams(lm, codes)
    texts, audios = [], []
    with lm.streaming(codes.shape[0]):
        widen_kv_caches(lm, chunk_size)
        for start in range(0, codes.shape[2], chunk_size):
            t, a = chunk_logits(lm, inputs[:, :, start:start + chunk_size], targets[:, :, start:start + chunk_size])
            texts.append(t)
            audios.append(a)
    return undelay_logits(lm, codes, torch.cat(texts, dim=2), torch.cat(audios, dim=2))


class ChunkModel(torch.nn.Module):
    """`chunk_logits` as a module's forward, so DDP / FSDP wrappers see (and sync) the call.

    forward(inputs, targets [B, K, S]) → (text logits [B, 1, S, text_card], audio logits
    [B, dep_q, S, card]), delayed like the inputs.
    """

    def __init__(self, lm: LMModel, meta: bool = False) -> None:
        super().__init__()
        self.lm = lm
        self.meta = meta  # E2E layers: second-order inner updates (trainable: e2e-meta)

    def forward(self, inputs: Tensor, targets: Tensor, meta: bool | None = None) -> tuple[Tensor, Tensor]:
        """meta: override `self.meta` for this call (an evaluation is never meta-trained)."""
        return chunk_logits(self.lm, inputs, targets, meta=self.meta if meta is None else meta)
