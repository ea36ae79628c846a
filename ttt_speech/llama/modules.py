"""TTT inside transformers' Llama / Qwen2 decoders: the modules `patch_llama` puts in place.

- `LlamaTTT`: a `TTTLayer` whose state lives in the `TTTCache` slot of its layer;
  `LlamaTTTAttention` is the same with self-attention's call signature, for "replace" mode.
- `TTTHybridDecoderMixin`: "hybrid" mode, the shared `GatedTTTBranch` (x + tanh(α)·TTT(norm(x)))
  right after the attention residual of a decoder layer.
- `TTTModelMixin`: on the decoder stack (`LlamaModel` / `Qwen2Model`); gives every forward a
  `TTTCache` and tells the TTT layers which tokens are padding.
"""
from __future__ import annotations

from contextlib import nullcontext
from functools import lru_cache

import torch
import torch.utils.checkpoint
from torch import Tensor

from . import _import  # noqa: F401
from transformers.modeling_outputs import BaseModelOutputWithPast

from ..layer import TTTLayer
from ..modules import GatedTTTBranch, TTTModule
from ..state import TTTState
from .cache import TTTCache, TTTPlan
from .compat import CACHE_FIELD, CACHE_KWARG, pick_cache


class LlamaTTT(TTTModule):
    """A TTT layer in decoder layer `layer_idx`: hidden_states [B, T, C] → [B, T, C].

    Takes transformers' attention keywords (`cache=...`, `position_embeddings=...`, ...; the cache
    as `cache` on transformers 5.24+, `past_key_values` on 5.23, either is taken). Positions and
    the attention mask are not needed: TTT positions come from its own state (RoPE modulo the
    mini-batch), padding from the cache's token mask. Without a cache (e.g. under HF gradient
    checkpointing, which drops it) every call starts from the initial fast weights.
    """

    def __init__(self, layer: TTTLayer, layer_idx: int) -> None:
        super().__init__()
        self.layer = layer
        self.layer_idx = layer_idx

    def forward(self, hidden_states: Tensor, position_embeddings: object = None, attention_mask: object = None,
                cache: object = None, past_key_values: object = None, **kwargs: object) -> Tensor:
        cache = pick_cache(cache, past_key_values)
        if cache is None:
            return self.layer(hidden_states)[0]
        if not isinstance(cache, TTTCache):
            raise ValueError(f"{CACHE_KWARG}: TTT layer {self.layer_idx} needs a TTTCache, got "
                             f"{type(cache).__name__} (call the patched model, not its layers)")
        slot = cache.ttt_slots[self.layer_idx]
        if slot.restart is not None:  # here, not at `start_ttt`: sharded initial fast weights are gathered now
            state = slot.state if slot.state is not None else self.layer.initial_state(hidden_states.shape[0])
            slot.state, slot.restart = self.layer.reset_state(state, slot.restart), None
        y, slot.state = run_valid_tokens(self.layer, hidden_states, slot.state, cache.token_mask)
        slot.seen += hidden_states.shape[1]  # padding included, like the KV cache's length
        return y


class LlamaTTTAttention(LlamaTTT):
    """`LlamaTTT` in place of a decoder layer's `self_attn` ("replace"): returns (output, None) as
    transformers' attention does."""

    def forward(self, hidden_states: Tensor, *args: object, **kwargs: object) -> tuple[Tensor, None]:
        return super().forward(hidden_states, *args, **kwargs), None


class TTTHybridDecoderMixin:
    """Decoder-layer forward with the gated TTT branch after the attention residual.

    transformers computes the attention residual inline in `forward`, so the branch can only go
    there by overriding it: patched layers get a subclass of their own class with this mixin
    first (`layer.__class__` is switched), which keeps parameter names and checkpointing. The
    body is Llama's / Qwen2's decoder forward (identical in transformers 5.x up to the cache
    keyword, see `compat`) plus one line; the gate-0 test checks it still reproduces the host
    bit for bit.
    """

    ttt_branch: GatedTTTBranch

    def forward(self, hidden_states: Tensor, attention_mask: Tensor | None = None,
                position_ids: Tensor | None = None, cache: object = None, past_key_values: object = None,
                use_cache: bool | None = False, position_embeddings: tuple[Tensor, Tensor] | None = None,
                **kwargs: object) -> Tensor:
        cache = pick_cache(cache, past_key_values)
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        hidden_states, _ = self.self_attn(
            hidden_states=hidden_states, attention_mask=attention_mask, position_ids=position_ids,
            use_cache=use_cache, position_embeddings=position_embeddings, **{CACHE_KWARG: cache}, **kwargs)
        hidden_states = residual + hidden_states
        # the cache under the installed keyword: TTTMonitor's hook reads it from the call's kwargs
        hidden_states = self.ttt_branch(hidden_states, **{CACHE_KWARG: cache})
        residual = hidden_states
        hidden_states = self.post_attention_layernorm(hidden_states)
        hidden_states = self.mlp(hidden_states)
        return residual + hidden_states


class TTTCheckpointMixin:
    """Gradient checkpointing of a decoder layer that keeps the TTT state (`checkpoint_layers`).

    transformers' own checkpointing drops the cache argument, and with it the TTT state. Here the layer's
    forward is recomputed in backward with its cache, set back to what the first pass read: the TTT
    slot's state and restart rows, and the call's token mask (padding), which the decoder stack sets only
    while its forward runs. The cache must keep no KV (`TTTCache(keep_kv=False)`, as training windows
    and the stack's own cache of a call that returns none use), else the recomputation would append the
    keys and values a second time; a cache that keeps them is refused. Without a `TTTCache` (a model
    without TTT) the layer runs without a cache, as under transformers' checkpointing."""

    class_prefix = "Checkpointed"  # `with_mixin`'s class name
    ttt_layer_index: int  # the decoder layer's index: its slot in a TTTCache, when it has a TTT layer

    def forward(self, hidden_states: Tensor, *args: object, **kwargs: object):
        if not (self.training and torch.is_grad_enabled()):
            return super().forward(hidden_states, *args, **kwargs)
        if getattr(self, "gradient_checkpointing", False):  # transformers' wrapper ran first and dropped the cache
            raise ValueError("checkpoint_layers: transformers' gradient checkpointing is on too "
                             "(gradient_checkpointing_enable): it drops the TTTCache and with it the TTT state")
        cache = pick_cache(kwargs.get("cache"), kwargs.get("past_key_values"))
        if not isinstance(cache, TTTCache):
            kwargs.update({CACHE_KWARG: None, "use_cache": False})
            return torch.utils.checkpoint.checkpoint(super().forward, hidden_states, *args, use_reentrant=False,
                                                     **kwargs)
        if cache.keep_kv:
            raise ValueError("checkpoint_layers: this TTTCache keeps keys and values, which the recomputation in "
                             "backward would append twice; train with TTTCache(model, keep_kv=False) or use_cache=False")
        slot = cache.ttt_slots.get(self.ttt_layer_index)
        read = (slot.state, slot.restart) if slot is not None else None
        token_mask = cache.token_mask

        def run(x: Tensor):
            if slot is not None:
                slot.state, slot.restart = read
            outer, cache.token_mask = cache.token_mask, token_mask
            try:
                return super(TTTCheckpointMixin, self).forward(x, *args, **kwargs)
            finally:
                cache.token_mask = outer

        return torch.utils.checkpoint.checkpoint(run, hidden_states, use_reentrant=False)


def checkpoint_layers(model: torch.nn.Module) -> None:
    """Recompute every decoder layer of `model` in backward (`TTTCheckpointMixin`): the activations kept are
    each layer's input. Call it after `patch_llama` (which refuses checkpointed layers). Idempotent.
    Hooks on the TTT modules run again in the recomputation (the inner-lr probe, `TTTMonitor`)."""
    from .patch import decoder_stack

    for index, layer in enumerate(decoder_stack(model).layers):
        if not isinstance(layer, TTTCheckpointMixin):
            layer.__class__ = with_mixin(TTTCheckpointMixin, type(layer))
        layer.ttt_layer_index = index
        layer.gradient_checkpointing = False  # transformers' own: it would drop the cache before ours runs


class TTTModelMixin:
    """Decoder-stack forward that runs the TTT layers against a `TTTCache`.

    - no cache given: a fresh `TTTCache` (dropped from the output when `use_cache` is off, and
      only made then if there is padding to tell the TTT layers about);
    - a plain empty `DynamicCache` (also `generate()`'s own): converted in place (`TTTCache.adopt`);
    - a 2-D `attention_mask`: its columns for this call's tokens mark padding, which the TTT
      layers skip (each row's real tokens must be contiguous: left or right padding).

    The cache comes as `cache` (transformers 5.24+) or `past_key_values` (5.23) and goes on to
    the host's forward under the installed name.
    """

    ttt_plan: TTTPlan

    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                position_ids: Tensor | None = None, cache: object = None, past_key_values: object = None,
                inputs_embeds: Tensor | None = None, use_cache: bool | None = None,
                **kwargs: object) -> BaseModelOutputWithPast:
        cache = pick_cache(cache, past_key_values)
        source = inputs_embeds if inputs_embeds is not None else input_ids
        token_mask = _chunk_token_mask(attention_mask, source.shape[1]) if source is not None else None
        keep_cache = use_cache if use_cache is not None else self.config.use_cache
        created = cache is None and (keep_cache or token_mask is not None)
        if created:  # one only for the TTT layers (padding) keeps no KV: nobody reads it after the call
            cache = TTTCache(self, keep_kv=bool(keep_cache))
        elif cache is not None:
            cache = TTTCache.adopt(cache, self.ttt_plan)
        with cache.chunk(token_mask) if cache is not None else nullcontext():
            out = super().forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                  inputs_embeds=inputs_embeds, use_cache=use_cache, **{CACHE_KWARG: cache},
                                  **kwargs)
        if created and not keep_cache:
            setattr(out, CACHE_FIELD, None)
        return out


def _chunk_token_mask(attention_mask: Tensor | None, length: int) -> Tensor | None:
    """Real (non-padding) tokens of this call, [B, T] bool, from a 2-D mask over past + current
    tokens; None when every token is real (the common, fast case) or the mask is not 2-D."""
    if attention_mask is None or attention_mask.dim() != 2:
        return None
    mask = attention_mask[:, -length:].bool()
    return None if bool(mask.all()) else mask


def run_valid_tokens(layer: TTTLayer, x: Tensor, state: TTTState | None,
                     valid: Tensor | None) -> tuple[Tensor, TTTState]:
    """`layer(x, state)` where only the tokens with valid [B, T] true exist for TTT.

    Each row's real tokens must be one contiguous span (left or right padding). Rows are grouped
    by span and each group runs on its span alone, so padding neither updates the fast weights
    nor takes mini-batch positions; outputs at padding are 0.
    """
    if valid is None:
        return layer(x, state)
    B, T, _ = x.shape
    if state is None:
        state = layer.initial_state(B)
    counts = valid.sum(dim=1)
    starts = torch.where(counts > 0, valid.int().argmax(dim=1), 0)
    pos = torch.arange(T, device=valid.device)
    span = (pos >= starts[:, None]) & (pos < (starts + counts)[:, None])
    if not torch.equal(span, valid):
        raise ValueError("attention_mask: TTT layers need each row's tokens of a call to be contiguous "
                         "(left or right padding only)")
    y = torch.zeros_like(x)
    pairs = torch.stack([starts, counts], dim=1)
    for s, n in torch.unique(pairs, dim=0).tolist():
        if n == 0:
            continue  # an all-padding row: state unchanged, output 0
        rows = ((starts == s) & (counts == n)).nonzero().squeeze(1)
        part, new = layer(x[rows, s:s + n], _rows(state, rows))
        y = y.index_put((rows[:, None], torch.arange(s, s + n, device=x.device)[None]), part)
        state = _put_rows(state, rows, new)
    return y, state


def _rows(state: TTTState, rows: Tensor) -> TTTState:
    pick = lambda t: t.index_select(0, rows.to(t.device))  # noqa: E731
    return state.map(pick)


def _put_rows(state: TTTState, rows: Tensor, part: TTTState) -> TTTState:
    """`state` with `rows` replaced by `part`'s rows (out of place: autograd-safe)."""
    put = lambda t, p: t.index_copy(0, rows.to(t.device), p.to(t.dtype))  # noqa: E731
    return state.map(put, part)


@lru_cache(maxsize=None)
def with_mixin(mixin: type, cls: type) -> type:
    """`cls` with `mixin`'s overrides first in the MRO, made once per pair (a subclass of the
    host's own class keeps whatever that class adds, e.g. a LLaMA-Omni subclass of LlamaModel).
    transformers' `GradientCheckpointingLayer` wraps the new `forward` for checkpointing as it
    does for its own subclasses. Patched models are saved with `save_ttt`, not pickled."""
    return type(f"{getattr(mixin, 'class_prefix', 'TTT')}{cls.__name__}", (mixin, cls), {"__module__": __name__})
