"""‖W_t − W_0‖ per TTT layer along a stream: how far the fast weights travel from their start.

The TTT state holds the fast weights at the start of the current mini-batch, so a record at
frame t shows the weights after the last completed mini-batch (⌊t/b⌋·b frames learned from).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ttt_speech.moshi.streaming import MoshiTTT


@dataclass
class FastWeightTrace:
    """Distances of a streaming model's fast weights from their initial values.

    layers: host-layer index of each traced TTT module; positions: frames seen at each record;
    distances[i][j]: Frobenius norm of (W − W_0) over every fast-weight tensor (all heads) of
    layer i at positions[j]; initial_norms[i]: ‖W_0‖ of layer i (for relative change).
    """

    layers: list[int]
    initial_norms: list[float]
    positions: list[int] = field(default_factory=list)
    distances: list[list[float]] = field(default_factory=list)
    _modules: list[MoshiTTT] = field(default_factory=list, repr=False)
    _initial: list[tuple[Tensor, ...]] = field(default_factory=list, repr=False)

    @classmethod
    def attach(cls, lm: nn.Module) -> "FastWeightTrace | None":
        """A trace of every TTT module of a *streaming* `lm` (batch 1); None when it has no TTT layers."""
        found: list[tuple[int, MoshiTTT]] = []
        for index, layer in enumerate(lm.transformer.layers):
            found.extend((index, m) for m in layer.modules() if isinstance(m, MoshiTTT))
        if not found:
            return None
        initial = []
        for _, module in found:
            state = module.layer.initial_state(1)
            initial.append(tuple(w.detach().clone() for w in state.weights))
        norms = [float(torch.sqrt(sum((w.double() ** 2).sum() for w in ws))) for ws in initial]
        trace = cls([i for i, _ in found], norms, _modules=[m for _, m in found], _initial=initial)
        trace.distances = [[] for _ in found]
        return trace

    def record(self, position: int) -> None:
        """Append the current distances (the modules must be streaming)."""
        self.positions.append(int(position))
        for i, (module, w0) in enumerate(zip(self._modules, self._initial)):
            state = module._streaming_state
            if state is None or state.ttt is None:
                raise RuntimeError("FastWeightTrace.record: the model is not streaming")
            squared = sum(((w.double() - w_0.double()) ** 2).sum() for w, w_0 in zip(state.ttt.weights, w0))
            self.distances[i].append(float(torch.sqrt(squared)))

    def to_dict(self) -> dict:
        return {"positions": self.positions,
                "layers": [{"layer": layer, "initial_norm": norm, "distance": dist}
                           for layer, norm, dist in zip(self.layers, self.initial_norms, self.distances)]}
