"""TTT state carried across consecutive training windows of a patched Llama / Qwen2, through `TTTCache`.

The Llama counterpart of `ttt_speech.moshi.carry.TTTCarry` (the same interface, so the training
recipe drives either): each window runs the model with a fresh `TTTCache` (attention limited to the
window, positions from 0) whose TTT slots continue from the states the previous window of the same
row ended with, detached (truncated BPTT).

    carry = CacheCarry(model, batch_size)
    for ids, new_stream in windows:             # new_stream [B] bool
        carry.next_window(new_stream)           # detach + restart those rows
        cache = carry.window_cache()
        loss = loss_fn(model(ids, cache=cache).logits); loss.backward()
        carry.window_ended(cache)
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import Tensor, nn

from ..handle import TTTModel
from ..state import TTTState
from .cache import TTTCache


class CacheCarry:
    """Per-row TTT state of a patched causal LM across windows (truncated BPTT between windows)."""

    def __init__(self, model: nn.Module, batch_size: int) -> None:
        self.model = model
        self.handle = TTTModel.of(model, "CacheCarry: the model")
        self.sites = self.handle.sites
        self.batch_size = batch_size
        self.start = [_detached(site.core.initial_state(batch_size)) for site in self.sites]
        self.restart: Tensor | None = torch.ones(batch_size, dtype=torch.bool, device=self.start[0].offset.device)
        self.ended: list[TTTState] | None = None  # the states the last window's forward left

    def next_window(self, reset: Tensor | None = None) -> None:
        """Start a new window from the states the last one ended with, detached; rows where reset [B]
        is true start over from the initial fast weights (a new stream).

        The restart mask is applied in every window, all false when no row restarts, so that the initial
        fast weights take part in every step (with a zero gradient then): every data-parallel rank
        reduces the same parameters (see `TTTCarry.next_window`)."""
        device = self.start[0].offset.device
        rows = torch.zeros(self.batch_size, dtype=torch.bool, device=device)
        if reset is not None:
            rows = rows | reset.to(device)
        if self.ended is None:  # no forward since the last call: keep its restarts
            if self.restart is not None:
                rows = rows | self.restart
        else:
            self.start, self.ended = [_detached(s) for s in self.ended], None
        self.restart = rows

    def window_cache(self) -> TTTCache:
        """A fresh cache for the window's forward, its TTT slots continuing from the carried states (no KV:
        attention sees the window)."""
        cache = TTTCache(self.model, keep_kv=False)
        for site, state in zip(self.sites, self.start):
            cache.start_ttt(site.ttt.layer_idx, state, self.restart)
        return cache

    def window_ended(self, cache: TTTCache) -> None:
        """Take the states the window's forward left in `cache` (the next window starts from them)."""
        self.ended = [cache.ttt_state(site.ttt.layer_idx) for site in self.sites]

    def initial_weights(self) -> list[nn.Parameter]:
        """W₀: the parameters a restarting row's fast weights are copied from (every site's)."""
        return [getattr(site.core, name) for site in self.sites for name in site.core.fast_names]

    @property
    def resets_pending(self) -> bool:
        """Whether `current()` has rows to restart before a forward ran (it then reads the initial fast
        weights: gather them first when they are sharded)."""
        return self.ended is None and self.restart is not None and bool(self.restart.any())

    def current(self) -> list[TTTState]:
        """Per TTT layer, the state the next window starts from (pending restarts applied)."""
        with torch.no_grad():
            if self.ended is not None:
                return [s.detach() for s in self.ended]
            return self._restarted(self.start)

    def _restarted(self, states: list[TTTState]) -> list[TTTState]:
        if self.restart is None or not bool(self.restart.any()):
            return [s.detach() for s in states]
        return [site.core.reset_state(s, self.restart).detach() for site, s in zip(self.sites, states)]

    def window_start_state_dict(self) -> dict[str, Tensor]:
        """`state_dict` as it was before the current window's forward (restarts applied): what a training
        step that failed is checkpointed from."""
        with torch.no_grad():
            return self.handle.states_to_tensors(self._restarted(self.start))

    def state_dict(self) -> dict[str, Tensor]:
        """Tensors of the state the next window starts from, flat `<module>.<tensor>` [B, ...]
        (`TTTModel.states_to_tensors`, the format of every saved TTT state)."""
        return self.handle.states_to_tensors(self.current())

    def load_state_dict(self, tensors: dict[str, Tensor], where: str = "carried TTT state") -> None:
        states = self.handle.tensors_to_states(tensors, self.current(), where)
        self.start, self.ended, self.restart = [_detached(s) for s in states], None, None

    @contextmanager
    def paused(self):
        """Nothing to hand back: the carried states live here, not in the model's modules."""
        yield

    def close(self) -> None:
        self.ended = None


def _detached(state: TTTState) -> TTTState:
    return state.detach().clone()
