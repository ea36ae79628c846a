"""TTT as moshi streaming modules: the TTT state lives in moshi's streaming state.

Inside `with lm.streaming(B):`, `LMModel.forward_text` and `LMGen.step` carry the TTT state
from call to call; `lm.reset_streaming(mask)` and `lm.set_exec_mask(mask)` act on it per row.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from . import _import  # noqa: F401
from moshi.modules.streaming import State, StreamingModule
from moshi.modules.transformer import StreamingTransformerLayer

from ..layer import TTTLayer
from ..state import TTTState


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

    def reset(self, reset_mask: Tensor) -> None:
        super().reset(reset_mask)
        assert self.ttt is not None and self.reset_fn is not None
        self.assign(self.reset_fn(self.ttt, reset_mask))

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
            self.ttt = new
        else:
            with torch.no_grad():
                self.ttt.copy_(new)


class MoshiTTT(StreamingModule[TTTStreamState]):
    """A `TTTLayer` as a moshi `StreamingModule`. x [B, T, C] → [B, T, C].

    Also usable in place of `StreamingTransformerLayer.self_attn`, which moshi calls as
    `self_attn(x, x, x)`: key and value are ignored.
    """

    def __init__(self, layer: TTTLayer) -> None:
        super().__init__()
        self.layer = layer

    def _init_streaming_state(self, batch_size: int) -> TTTStreamState:
        # clone: the initial state is a broadcast view of the parameters, and in eval mode the
        # state is updated in place (see `TTTStreamState.assign`).
        initial = self.layer.initial_state(batch_size)
        initial = initial.clone() if self.training else initial.detach().clone()
        return TTTStreamState(batch_size, self.layer.W1.device, ttt=initial,
                              reset_fn=self.layer.reset_state, keep_graph=self.training)

    def forward(self, x: Tensor, key: Tensor | None = None, value: Tensor | None = None) -> Tensor:
        state = self._streaming_state
        if state is None:
            return self.layer(x)[0]
        start = state.ttt if state.window_start is None else state.window_start
        if state.window_reset is not None:
            # inside forward (not when the window is set up): sharded (FSDP) parameters are only
            # materialised here, and a checkpointed recompute repeats the same reset.
            start = self.layer.reset_state(start, state.window_reset)
        y, new = self.layer(x, start)
        new = new.where(state.exec_mask, start)  # rows not executing keep their state
        if state.window_start is not None:
            state.ttt = new  # window mode: rebind, `window_start` must stay intact for a recompute
        else:
            state.keep_graph = self.training
            state.assign(new)
        return y


class GatedTTTBranch(nn.Module):
    """x → x + tanh(α) ⊙ TTT(norm(x)), α per channel (the hybrid residual branch)."""

    def __init__(self, norm: nn.Module, ttt: MoshiTTT, dim: int, gate_init: float,
                 device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.norm = norm
        self.ttt = ttt
        self.gate_alpha = nn.Parameter(torch.full((dim,), float(gate_init), device=device, dtype=dtype))

    def residual(self, x: Tensor) -> Tensor:
        """tanh(α) ⊙ TTT(norm(x)): what the branch adds to x."""
        update = self.ttt(self.norm(x))
        return torch.tanh(self.gate_alpha).to(update.dtype) * update

    def forward(self, x: Tensor) -> Tensor:
        return x + self.residual(x)


class TTTHybridTransformerLayer(StreamingTransformerLayer):
    """moshi's transformer layer with a gated TTT branch right after the attention residual.

    moshi computes the attention residual inside `_sa_block`, so the branch can only go after it
    by overriding that method: patched layers get this class (`layer.__class__` is switched),
    which keeps moshi's own forward, state and parameter names untouched.
    """

    ttt_branch: GatedTTTBranch

    def _sa_block(self, x: Tensor) -> Tensor:
        return self.ttt_branch(super()._sa_block(x))


def ttt_stream_state(lm: nn.Module) -> dict[str, Tensor]:
    """The live TTT state of every streaming TTT module of `lm`, flat (for safetensors).

    Keys are `<module name>.<tensor>`; `lm` must be inside `lm.streaming(B)` (or `LMGen.streaming`).
    """
    out: dict[str, Tensor] = {}
    for name, module in _streaming_ttt(lm):
        out.update({f"{name}.{k}": v for k, v in module._streaming_state.ttt.to_tensors().items()})
    return out


def load_ttt_stream_state(lm: nn.Module, tensors: dict[str, Tensor], where: str = "stream state") -> None:
    """Restore what `ttt_stream_state` returned into a streaming `lm` of the same batch size."""
    modules = _streaming_ttt(lm)
    known = {f"{name}." for name, _ in modules}
    stray = sorted(k for k in tensors if not any(k.startswith(p) for p in known))
    if stray:
        raise ValueError(f"{where}: tensors for no TTT module of this model: {stray[:5]}")
    for name, module in modules:
        state = module._streaming_state
        own = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")}
        state.assign(state.ttt.load_tensors(own, where=f"{where} ({name})"))


def _streaming_ttt(lm: nn.Module) -> list[tuple[str, MoshiTTT]]:
    modules = [(n, m) for n, m in lm.named_modules() if isinstance(m, MoshiTTT)]
    if not modules:
        raise ValueError("the model has no TTT layers")
    if any(m._streaming_state is None for _, m in modules):
        raise ValueError("the model is not streaming: use it inside `with lm.streaming(batch_size):`")
    return modules
