"""TTT as moshi streaming modules: the TTT state lives in moshi's streaming state (docs/architecture.md §4).

Inside `with lm.streaming(B):`, `LMModel.forward_text` and `LMGen.step` carry the TTT state
from call to call; `lm.reset_streaming(mask)` and `lm.set_exec_mask(mask)` act on it per row.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar

import torch
from torch import Tensor

from . import _import  # noqa: F401
from moshi.modules.streaming import State, StreamingModule

from ..layer import TTTLayer
from ..modules import TTTModule
from ..state import TTTState
from .internals import StreamingHooks


@dataclass
class TTTStreamState(State):
    """moshi `State` holding one TTT layer's `TTTState` for a batch of streams."""

    ttt: TTTState | None = None
    reset_fn: Callable[[TTTState, Tensor], TTTState] | None = None
    keep_graph: bool = False  # training: rebind the state and keep its autograd graph
    # Window mode (training on consecutive windows, see `carry.py`): every call of the window
    # starts from `window_start`, so activation checkpointing can recompute the forward.
    window_start: TTTState | None = None
    window_reset: Tensor | None = None  # rows [B] restarted at this window, applied in forward
    # `ttt`'s tensors are this stream's own buffers (made by `new_streaming_state`, then only
    # copied into), so a call may step them in place; false once a state is rebound (it may be a
    # caller's object, or share memory with one)
    owns_buffers: bool = False

    # not moshi state: saved through `TTTModel.stream_state` (`internals.moshi_states_to_tensors` skips them)
    saved_apart: ClassVar[tuple[str, ...]] = ("ttt", "reset_fn", "keep_graph", "window_start", "window_reset",
                                              "owns_buffers")

    def check_saveable(self, name: str) -> None:
        if self.window_start is not None or self.window_reset is not None:
            raise ValueError(f"{name}: a TTT state in training window mode cannot be saved as a live stream")

    def reset(self, reset_mask: Tensor) -> None:
        super().reset(reset_mask)
        assert self.ttt is not None and self.reset_fn is not None
        self.assign(self.reset_fn(self.ttt, reset_mask))

    def updates_in_place(self, training: bool) -> bool:
        """Whether a call may update the state's buffers in place: streaming inference (autograd
        off), with buffers this mode can write (inference tensors only inside inference mode)."""
        if training or torch.is_grad_enabled() or self.window_start is not None or not self.owns_buffers:
            return False
        return torch.is_inference_mode_enabled() or not self.ttt.offset.is_inference()

    def assign(self, new: TTTState) -> None:
        """Make `new` the current state.

        In eval mode (`keep_graph` false; `LMGen` requires eval) the values are copied, detached,
        into the existing buffers: `LMGen` CUDA-graphs `forward_text`, and a replayed graph only
        reads and writes the buffers it was captured with (moshi's KV cache is updated in place
        for the same reason). In training mode the state is rebound instead, keeping its autograd
        graph to the parameters (cut it between windows with `TTTState.detach`).
        """
        assert self.ttt is not None
        frozen_inference = not torch.is_inference_mode_enabled() and self.ttt.offset.is_inference()
        if self.keep_graph or frozen_inference:
            self.ttt, self.owns_buffers = new, False
        elif self.owns_buffers:
            with torch.no_grad():
                self.ttt.copy_(new)
        else:  # the current tensors may be a caller's (rebound earlier): take copies as this stream's own
            self.ttt, self.owns_buffers = new.detach().clone(), True


class MoshiTTT(StreamingHooks, StreamingModule[TTTStreamState], TTTModule):
    """A `TTTLayer` as a moshi `StreamingModule`. x [B, T, C] → [B, T, C].

    Also usable in place of `StreamingTransformerLayer.self_attn`, which moshi calls as
    `self_attn(x, x, x)`: key and value are ignored.
    """

    def __init__(self, layer: TTTLayer) -> None:
        super().__init__()
        self.layer = layer

    def new_streaming_state(self, batch_size: int) -> TTTStreamState:
        # clone: the initial state is a broadcast view of the parameters, and in eval mode the
        # state is updated in place (see `TTTStreamState.assign`).
        initial = self.layer.initial_state(batch_size)
        initial = initial.clone() if self.training else initial.detach().clone()
        return TTTStreamState(batch_size, self.layer.W1.device, ttt=initial, reset_fn=self.layer.reset_state,
                              keep_graph=self.training, owns_buffers=not self.training)

    def live_state(self) -> TTTState:
        if self.streaming_state is None:
            raise ValueError("the model is not streaming: use it inside `with lm.streaming(batch_size):`")
        return self.streaming_state.ttt

    def set_live_state(self, state: TTTState) -> None:
        self.live_state()  # the same check
        self.streaming_state.assign(state)

    def forward(self, x: Tensor, key: Tensor | None = None, value: Tensor | None = None) -> Tensor:
        state = self.streaming_state
        if state is None:
            return self.layer(x)[0]
        if state.updates_in_place(self.training):
            # the fast weights and sums are stepped where they live: no copy of the state per call,
            # and the buffers a CUDA graph was captured with are the ones updated (see `assign`)
            return self.layer(x, state.ttt, active=state.exec_mask, in_place=True)[0]
        start = state.ttt if state.window_start is None else state.window_start
        if state.window_reset is not None:
            # inside forward (not when the window is set up): sharded (FSDP) parameters are only
            # materialised here, and a checkpointed recompute repeats the same reset.
            start = self.layer.reset_state(start, state.window_reset)
        y, new = self.layer(x, start, active=state.exec_mask)  # rows not executing keep their state
        if state.window_start is not None:
            state.ttt = new  # window mode: rebind, `window_start` must stay intact for a recompute
        else:
            state.keep_graph = self.training
            state.assign(new)
        return y
