"""Fast-weight statistics: how far a TTT layer's fast weights travelled, one definition for every
report (training's ttt_stats.csv, the evaluator's ‖W_t − W_0‖ curves, the Llama monitor).

The fast weights of a state are those at the start of its current mini-batch, so a statistic at
frame t shows the weights after ⌊t/b⌋ mini-batches.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .state import TTTState

# ‖W − W₀‖ past this multiple of ‖W₀‖ is reported as runaway growth: the inner loop is diverging
# (an inner learning rate far too high), not learning. Healthy layers move a few ‖W₀‖ at most
# (1.4x-2.6x in the demo, trained or fresh; docs/training.md §4).
RUNAWAY_FACTOR = 10.0
_TINY = 1e-12  # ‖W₀‖ floor: a layer initialised at zero still has a ratio


@dataclass(frozen=True)
class FastWeightStats:
    """One layer's statistics, means over the batch rows.

    w_norm: ‖W‖, the Frobenius norm over every fast-weight tensor of the layer (all heads, weights
        and biases); w_delta: ‖W − W₀‖ in the same norm, W₀ the initial fast weights (the layer's
        parameters); eta_mean: the mean inner learning rate (see `TTTLayer.mean_inner_lr`), when known.
    """

    w_norm: float
    w_delta: float
    eta_mean: float | None = None

    def to_dict(self) -> dict[str, float]:
        out = {"w_norm": self.w_norm, "w_delta": self.w_delta}
        if self.eta_mean is not None:
            out["eta_mean"] = self.eta_mean
        return out


def fast_weight_norms(core: nn.Module, state: TTTState) -> tuple[Tensor, Tensor]:
    """(‖W‖, ‖W − W₀‖) per batch row, each [B] float64, of a TTT core's (`TTTLayer`, `E2EMLP`) state.

    The norm is taken over all the layer's fast-weight tensors (`state.named_weights()`, [B, H, ...]) at once;
    W₀ is the core's parameters of the same names ([H, ...]).
    """
    squares = deltas = None
    for name, w in state.named_weights():
        w = w.detach().double()
        w0 = getattr(core, name).detach().double()[None]  # [1, H, ...]
        s, d = w.pow(2).flatten(1).sum(1), (w - w0).pow(2).flatten(1).sum(1)
        squares, deltas = (s, d) if squares is None else (squares + s, deltas + d)
    return squares.sqrt(), deltas.sqrt()


def fast_weight_stats(core: nn.Module, state: TTTState, eta_mean: float | None = None) -> FastWeightStats:
    """`FastWeightStats` of one layer's state (means over its rows)."""
    norm, delta = fast_weight_norms(core, state)
    return FastWeightStats(norm.mean().item(), delta.mean().item(), eta_mean)


def initial_norm(core: nn.Module) -> float:
    """‖W₀‖ of a TTT core, the norm of `fast_weight_norms` (for relative change ‖W − W₀‖ / ‖W₀‖)."""
    return float(torch.sqrt(sum(getattr(core, n).detach().double().pow(2).sum() for n in core.fast_names)))


def runaway(distances: dict[int, float], initial: dict[int, float],
            factor: float = RUNAWAY_FACTOR) -> dict[int, float]:
    """{layer: ‖W − W₀‖ / ‖W₀‖} of the layers whose fast weights moved more than `factor` x ‖W₀‖ from
    W₀ (NaN counts). distances: {layer: ‖W − W₀‖}; initial: {layer: ‖W₀‖} (`initial_norm`)."""
    ratios = {layer: d / max(initial[layer], _TINY) for layer, d in distances.items()}
    return {layer: r for layer, r in ratios.items() if not r <= factor}


def largest(values) -> float:
    """The largest of `values`, NaN above everything (a NaN distance is the worst runaway); 0 if empty."""
    return max(values, key=lambda v: v if v == v else float("inf"), default=0.0)


def runaway_warning(grown: dict[int, float], where: str, base_lr: float | None) -> str:
    """The one warning line of `runaway`'s result, for training and evaluation alike."""
    return (f"{where}: fast weights of TTT layer(s) {', '.join(map(str, sorted(grown)))} moved {largest(grown.values()):.3g} "
            f"x their initial norm from it (more than {RUNAWAY_FACTOR:g}x: the inner loop is diverging; "
            f"ttt.base_lr = {base_lr:g} may be too high)")
