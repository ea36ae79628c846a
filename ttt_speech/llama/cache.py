"""`TTTCache`: a transformers `DynamicCache` that also holds the TTT state of every patched layer.

The TTT state of a conversation lives in the cache passed to `generate(cache=...)` or
`model(..., cache=...)` (`past_key_values=` on transformers 5.23, see `compat`), next to the
attention KV: one cache per conversation, reused
from turn to turn, carries the fast weights across turns; a new cache, or `cache.reset()`, starts
from the initial fast weights (the parameters). Rows of a batch are independent streams.

A plain `DynamicCache` handed to a patched model (also the one `generate()` makes by itself) is
turned into a `TTTCache` in place on its first use, so the caller's object keeps the state.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import Tensor, nn

from . import _import  # noqa: F401
from transformers.cache_utils import CacheLayerMixin, DynamicCache, DynamicLayer

from ..state import TTTState
from .compat import CACHE_KWARG


@dataclass(frozen=True)
class TTTPlan:
    """Where a patched model has TTT layers. depth: decoder layers; ttt_layers: indices with a TTT
    layer; replaced: the subset whose attention was removed ("replace" mode)."""

    depth: int
    ttt_layers: tuple[int, ...]
    replaced: tuple[int, ...]


class TTTSlot(CacheLayerMixin):
    """One TTT layer's streaming state in a cache (`state` is None until the layer first runs).

    It is a cache *layer* so that, in the slot of a layer whose attention was replaced, it stands
    in for the missing KV: its sequence length is the number of tokens it has seen, which keeps
    `cache.get_seq_length()` (positions, masks, `generate`'s prefix slicing) right even when the
    first or every layer is TTT.
    """

    is_sliding = False
    is_compileable = False
    is_croppable = False  # a TTT update cannot be undone
    supports_early_init = False

    def __init__(self) -> None:
        super().__init__()
        self.state: TTTState | None = None
        self.seen = 0  # tokens seen since the cache was created or reset
        # rows [B] bool that restart from the initial fast weights at the layer's next forward: applied
        # inside it, where sharded (FSDP) parameters are gathered (`TTTCache.start_ttt`)
        self.restart: Tensor | None = None

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        pass

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        raise RuntimeError("TTTSlot: this layer's attention was replaced by TTT, it has no key/value cache")

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0  # as a DynamicLayer holding `seen` tokens would say

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.state, self.seen, self.restart = None, 0, None

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove != 0:
            raise ValueError("TTTCache: a TTT state cannot be rolled back (crop), so assisted decoding "
                             "and other cache-cropping generation modes are not supported")

    def _map_rows(self, fn: Callable[[Tensor], Tensor]) -> None:
        if self.state is not None:
            self.state = self.state.map(fn)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_rows(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_rows(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: Tensor) -> None:
        self._map_rows(lambda t: t[indices.to(t.device)])


class WindowKV(CacheLayerMixin):
    """An attention layer's place in a training window's cache: keys and values pass through, nothing is
    kept (attention sees the call's own tokens, as in a call without a cache). A layer recomputed by
    gradient checkpointing then finds the cache as the first pass did."""

    is_sliding = False
    is_compileable = False
    is_croppable = False
    supports_early_init = False

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        pass

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        return key_states, value_states

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return query_length, 0

    def get_seq_length(self) -> int:
        return 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        pass

    def crop(self, tokens_to_remove: int) -> None:
        pass

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        pass

    def batch_repeat_interleave(self, repeats: int) -> None:
        pass

    def batch_select_indices(self, indices: Tensor) -> None:
        pass


class TTTCache(DynamicCache):
    """KV cache + TTT state of a patched Llama / Qwen2 model (one per conversation).

        cache = TTTCache(model)                      # model: a model patched by `patch_llama`
        out = model.generate(ids_turn1, cache=cache, ...)
        out = model.generate(history_and_turn2, cache=cache, ...)   # state carried
        cache.reset()                                # next conversation: initial fast weights

    (transformers 5.23: `past_key_values=cache`.)

    `ttt_slots[i]` holds layer i's `TTTSlot`; for a replaced layer it is also `layers[i]`.
    Extra keyword arguments go to `DynamicCache` (e.g. `offloading=True`).
    """

    ttt_plan: TTTPlan
    ttt_slots: dict[int, TTTSlot]
    token_mask: Tensor | None
    keep_kv: bool  # False: attention layers are `WindowKV` (a training window's cache)

    def __init__(self, model: nn.Module, keep_kv: bool = True, **kwargs) -> None:
        """keep_kv=False: a training window's cache, TTT state only (`WindowKV` in the attention layers)."""
        inner = find_patched_model(model, "TTTCache")
        super().__init__(config=inner.config, **kwargs)
        self._install(inner.ttt_plan)
        self.keep_kv = keep_kv
        if not keep_kv:
            self.layers = [layer if isinstance(layer, TTTSlot) else WindowKV() for layer in self.layers]

    @classmethod
    def adopt(cls, cache: object, plan: TTTPlan) -> "TTTCache":
        """`cache` as a `TTTCache` for a model with this plan: a `TTTCache` is checked, an empty
        plain `DynamicCache` is converted in place (so its owner keeps the TTT state)."""
        if isinstance(cache, TTTCache):
            if cache.ttt_plan != plan:
                raise ValueError(f"{CACHE_KWARG}: this TTTCache was made for a model with other TTT layers "
                                 f"({cache.ttt_plan.ttt_layers} vs {plan.ttt_layers})")
            return cache
        if type(cache) is not DynamicCache:
            raise ValueError(f"{CACHE_KWARG}: a TTT-patched model needs a TTTCache or a DynamicCache, "
                             f"got {type(cache).__name__}")
        if cache.get_seq_length() > 0:
            raise ValueError(f"{CACHE_KWARG}: this DynamicCache already holds tokens seen without TTT "
                             "state; start the conversation with TTTCache(model)")
        cache.__class__ = cls
        cache._install(plan)
        cache.keep_kv = True
        return cache

    def _install(self, plan: TTTPlan) -> None:
        if self.layer_class_to_replicate is not None:  # lazily grown cache: lay out every layer now
            self.layers.extend(DynamicLayer() for _ in range(plan.depth - len(self.layers)))
        if len(self.layers) != plan.depth:
            raise ValueError(f"{CACHE_KWARG}: cache has {len(self.layers)} layers, the model {plan.depth}")
        self.ttt_plan = plan
        self.ttt_slots = {}
        for i in plan.ttt_layers:
            slot = TTTSlot()
            if i in plan.replaced:
                self.layers[i] = slot
            self.ttt_slots[i] = slot
        self.token_mask = None

    @contextmanager
    def chunk(self, token_mask: Tensor | None) -> Iterator[None]:
        """While a forward runs: which of its tokens are real, [B, T] bool (None: all of them)."""
        self.token_mask = token_mask
        try:
            yield
        finally:
            self.token_mask = None

    def _side_slots(self) -> list[TTTSlot]:
        """Slots of hybrid layers: not in `layers`, so `Cache`'s per-layer loops miss them."""
        return [s for i, s in self.ttt_slots.items() if self.layers[i] is not s]

    def reset(self) -> None:
        """Forget the conversation: empty KV, TTT back to the initial fast weights."""
        super().reset()
        for slot in self._side_slots():
            slot.reset()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        for slot in self._side_slots():
            slot.reorder_cache(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        for slot in self._side_slots():
            slot.batch_repeat_interleave(repeats)

    def batch_select_indices(self, indices: Tensor) -> None:
        super().batch_select_indices(indices)
        for slot in self._side_slots():
            slot.batch_select_indices(indices)

    def crop(self, tokens_to_remove: int) -> None:
        for slot in self._side_slots():
            slot.crop(tokens_to_remove)
        super().crop(tokens_to_remove)

    @property
    def is_croppable(self) -> bool:
        return False

    def ttt_state(self, layer_idx: int) -> TTTState | None:
        """The TTT state of decoder layer `layer_idx` (None before it first ran)."""
        if layer_idx not in self.ttt_slots:
            raise ValueError(f"layer_idx: layer {layer_idx} has no TTT layer (TTT layers: {self.ttt_plan.ttt_layers})")
        return self.ttt_slots[layer_idx].state

    def start_ttt(self, layer_idx: int, state: TTTState, restart: Tensor | None = None) -> None:
        """Continue decoder layer `layer_idx`'s TTT from `state` (e.g. the state a training window of the
        same stream ended with); rows where restart [B] is true start from the initial fast weights at
        the layer's next forward instead (read there, with gradients to them)."""
        slot = self.ttt_slots[layer_idx]
        slot.state, slot.restart = state, restart

    def detach_ttt_(self) -> None:
        """Cut the TTT states from the autograd graph, values kept (truncated BPTT between windows)."""
        for slot in self.ttt_slots.values():
            if slot.state is not None:
                slot.state = slot.state.detach()


def find_patched_model(model: nn.Module, where: str) -> nn.Module:
    """The decoder stack (e.g. `LlamaModel`) inside `model` that `patch_llama` patched."""
    for module in model.modules():
        if isinstance(getattr(module, "ttt_plan", None), TTTPlan):
            return module
    raise ValueError(f"{where}: the model has no TTT layers (patch it with patch_llama first)")
