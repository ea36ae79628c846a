"""‖W_t − W_0‖ per TTT layer along a stream: how far the fast weights travel from their start.

The norm is `ttt_speech.stats`' (every fast-weight tensor of the layer, all heads). The TTT state
holds the fast weights at the start of the current mini-batch, so a record at frame t shows the
weights after the last completed mini-batch (⌊t/b⌋·b frames learned from).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from ttt_speech.handle import TTTModel
from ttt_speech.stats import fast_weight_norms, initial_norm, largest, runaway


@dataclass
class FastWeightTrace:
    """Distances of a streaming model's fast weights from their initial values (batch 1).

    layers: host-layer index of each traced TTT layer; positions: frames seen at each record;
    distances[i][j]: ‖W − W_0‖ of layer i at positions[j]; initial_norms[i]: ‖W_0‖ of layer i
    (for relative change).
    """

    layers: list[int]
    initial_norms: list[float]
    positions: list[int] = field(default_factory=list)
    distances: list[list[float]] = field(default_factory=list)
    _handle: TTTModel | None = field(default=None, repr=False)

    @classmethod
    def attach(cls, lm: nn.Module) -> "FastWeightTrace | None":
        """A trace of every TTT layer of a *streaming* `lm`; None when it has no TTT layers."""
        handle = TTTModel.find(lm)
        if handle is None:
            return None
        sites = handle.sites
        return cls([s.layer_index for s in sites], [initial_norm(s.core) for s in sites],
                   distances=[[] for _ in sites], _handle=handle)

    def record(self, position: int) -> None:
        """Append the current distances (the model must be streaming)."""
        self.positions.append(int(position))
        for i, (site, state) in enumerate(zip(self._handle.sites, self._handle.live_states())):
            self.distances[i].append(float(fast_weight_norms(site.core, state)[1][0]))

    def runaway(self) -> dict[int, float]:
        """{layer: largest ‖W − W_0‖ / ‖W_0‖} of the layers whose fast weights ran away (`stats.runaway`)."""
        return runaway({layer: largest(d) for layer, d in zip(self.layers, self.distances)},
                       dict(zip(self.layers, self.initial_norms)))

    def to_dict(self) -> dict:
        return {"positions": self.positions,
                "layers": [{"layer": layer, "initial_norm": norm, "distance": dist}
                           for layer, norm, dist in zip(self.layers, self.initial_norms, self.distances)]}
