"""TTT state carried across consecutive training windows, attention limited to each window.

Training on long recordings (docs/architecture.md §9) runs `LMModel.forward` on one window at a
time, outside moshi's streaming mode (its KV cache is written in place, so it cannot be
backpropagated through), while the TTT layers continue from the state the previous window of the
same row left: `TTTCarry` gives only the TTT modules a streaming state in *window mode*.

    carry = TTTCarry(lm, batch_size)
    for codes, new_recording in windows:        # new_recording [B] bool
        carry.next_window(new_recording)        # detach (truncated BPTT) + reset those rows
        loss = loss_fn(lm(codes)); loss.backward()
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from ..handle import TTTModel
from ..state import TTTState

if TYPE_CHECKING:
    from .streaming import TTTStreamState


class TTTCarry:
    """Per-row TTT state of `lm`'s TTT modules across windows (truncated BPTT between windows)."""

    def __init__(self, lm: nn.Module, batch_size: int) -> None:
        self.handle = TTTModel.of(lm, "TTTCarry: the model")
        self.modules = [site.ttt for site in self.handle.sites]
        self.batch_size = batch_size
        for module in self.modules:
            if module.streaming_state is not None:
                raise ValueError("TTTCarry: the model is already streaming")
            state = module.new_streaming_state(batch_size)
            state.window_start = _detached(state.ttt)
            state.window_reset = torch.ones(batch_size, dtype=torch.bool, device=state.ttt.offset.device)
            state.ttt = state.window_start
            module.streaming_state = state

    # In window mode a forward always rebinds `state.ttt`, so `state.ttt is state.window_start`
    # means no forward ran since the window was set up.

    def next_window(self, reset: Tensor | None = None) -> None:
        """Start a new window: the state the last window ended with, detached; rows where
        reset [B] is true start over from the initial fast weights (a new recording).

        The reset mask is applied in every window, all false when no row restarts: the initial fast
        weights then take part in every step with a zero gradient (not none), so that every
        data-parallel rank reduces the same parameters (FSDP requires it). A training step that
        restarts no row on any rank drops that gradient (`initial_weights`), so that AdamW does not
        move them by momentum. The values are those of no reset exactly."""
        device = self.modules[0].streaming_state.ttt.offset.device
        requested = torch.zeros(self.batch_size, dtype=torch.bool, device=device)
        if reset is not None:
            requested = requested | reset.to(device)
        for module in self.modules:
            state = module.streaming_state
            rows = requested
            if state.ttt is state.window_start:  # no forward since the last call: keep its resets
                if state.window_reset is not None:
                    rows = rows | state.window_reset
            else:
                state.window_start = _detached(state.ttt)
            state.window_reset = rows
            state.ttt = state.window_start

    def initial_weights(self) -> list[nn.Parameter]:
        """W₀: the parameters a restarting row's fast weights are copied from (every site's)."""
        return [getattr(site.core, name) for site in self.handle.sites for name in site.core.fast_names]

    @property
    def resets_pending(self) -> bool:
        """Whether `current()` has rows to restart before a forward ran: it then reads the initial
        fast weights (the parameters; gather them first when they are sharded)."""
        return any(self._pending(module.streaming_state) for module in self.modules)

    @staticmethod
    def _pending(state: "TTTStreamState") -> bool:
        return state.ttt is state.window_start and state.window_reset is not None and bool(state.window_reset.any())

    def current(self) -> list[TTTState]:
        """Per TTT module, the state the next window starts from (pending resets applied)."""
        out = []
        with torch.no_grad():
            for module in self.modules:
                state = module.streaming_state
                if self._pending(state):
                    out.append(module.layer.reset_state(state.window_start, state.window_reset).detach())
                else:
                    out.append(state.ttt.detach())
        return out

    def window_start_state_dict(self) -> dict[str, Tensor]:
        """`state_dict` as it was before the current window's forward: the state the window started
        from, its resets applied (a training step that failed is checkpointed from it; reads the
        initial fast weights where rows restart)."""
        states = []
        with torch.no_grad():
            for module in self.modules:
                state = module.streaming_state
                start = state.window_start
                if state.window_reset is not None:
                    start = module.layer.reset_state(start, state.window_reset)
                states.append(start.detach())
        return self.handle.states_to_tensors(states)

    def state_dict(self) -> dict[str, Tensor]:
        """Tensors of the state the next window starts from, flat `<module>.<tensor>` [B, ...]
        (`TTTModel.states_to_tensors`, the format of every saved TTT state)."""
        return self.handle.states_to_tensors(self.current())

    def load_state_dict(self, tensors: dict[str, Tensor], where: str = "carried TTT state") -> None:
        states = self.handle.tensors_to_states(tensors, self.current(), where)
        for module, loaded in zip(self.modules, states):
            state = module.streaming_state
            state.window_start = _detached(loaded)
            state.window_reset = None
            state.ttt = state.window_start

    @contextmanager
    def paused(self):
        """Hand the TTT modules back (e.g. for an evaluation stream) and restore the carry after."""
        saved = [module.streaming_state for module in self.modules]
        for module in self.modules:
            module.streaming_state = None
        try:
            yield
        finally:
            for module, state in zip(self.modules, saved):
                module.streaming_state = state

    def close(self) -> None:
        for module in self.modules:
            module.streaming_state = None

    def __enter__(self) -> "TTTCarry":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _detached(state: TTTState) -> TTTState:
    return state.detach().clone()
