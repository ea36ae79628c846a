"""The modules a patch inserts into a host model (docs/architecture.md §5).

- `TTTModule`: the host-side wrapper of a host-independent TTT core (`TTTLayer` or `E2EMLP`, in
  `.layer`). Each host adapter subclasses it once: moshi's `MoshiTTT` keeps the TTT state in moshi's
  streaming state, Llama's `LlamaTTT` in the generation cache. `TTTModel` finds a patch's modules
  by this class.
- `GatedTTTBranch`: the hybrid residual branch x + tanh(α) ⊙ ttt(norm(x)), the same for every host.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .state import TTTState


class TTTModule(nn.Module):
    """A TTT core as one host expects to call it. `layer`: the core (`TTTLayer` / `E2EMLP`).

    Hosts whose modules hold the live TTT state (moshi, inside `lm.streaming(B)`) implement
    `live_state` / `set_live_state`; the others keep it elsewhere (Llama: in its `TTTCache`).
    """

    layer: nn.Module

    def live_state(self) -> TTTState:
        """The TTT state of the running stream (batch rows as the stream's)."""
        raise ValueError(f"{type(self).__name__} keeps its TTT state outside the model (e.g. in a cache)")

    def set_live_state(self, state: TTTState) -> None:
        """Make `state` the running stream's TTT state."""
        raise ValueError(f"{type(self).__name__} keeps its TTT state outside the model (e.g. in a cache)")


class GatedTTTBranch(nn.Module):
    """x [B, T, C] → x + tanh(α) ⊙ ttt(norm(x)), α [C] per channel: the hybrid residual branch.

    Keyword arguments (`context`, e.g. Llama's cache) are passed on to `ttt`, which returns [B, T, C].
    gate_init = 0 makes the branch the identity: a patched model starts as its host.
    """

    def __init__(self, norm: nn.Module, ttt: TTTModule, dim: int, gate_init: float,
                 device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.norm = norm
        self.ttt = ttt
        self.gate_alpha = nn.Parameter(torch.full((dim,), float(gate_init), device=device, dtype=dtype))

    def residual(self, x: Tensor, **context: object) -> Tensor:
        """tanh(α) ⊙ ttt(norm(x)): what the branch adds to x."""
        update = self.ttt(self.norm(x), **context)
        return torch.tanh(self.gate_alpha).to(update.dtype) * update

    def forward(self, x: Tensor, **context: object) -> Tensor:
        return x + self.residual(x, **context)
