"""Evaluation-time inner-loop overrides: run trained TTT layers with another mini-batch size b′ and
inner learning rate, e.g. online gradient descent (b′ = 1) token by token on a model trained with
b = 16 (docs/evaluation.md, "Inner-loop overrides").

In this project's parameterisation (docs/architecture.md §2) token t of a mini-batch of b has the
learning rate λ_t = base_lr·σ(θ·x_t + c)/d, and the update at the mini-batch's end is
W ← W − τ_b Σ_t λ_t ∇ℓ_t with τ_i = max(0, 1/i + a_i): τ_b ≈ 1/b, so a step moves W by λ times the
*mean* gradient (the "base_lr / b" rule of implementations that sum the gradients is built in).
When b changes, `scale` says what is kept (per layer, from its own τ):

- keep_per_token: the weight of each token's gradient in W, λ·τ_b: base_lr′ = base_lr·τ_b/τ′_b′
  (≈ base_lr·b′/b): online GD takes b small steps where the trained model took one;
- keep_per_minibatch: the weight of a step's mean gradient, b·λ·τ_b: base_lr′ = base_lr·b·τ_b/(b′·τ′_b′)
  (≈ base_lr): every online step is as large as a trained mini-batch step (b times the movement);
- none: base_lr as it is (or as `base_lr` sets it).

The learned offsets a_i (a [b] parameter) are corrections to the positions of a b-token mini-batch;
`offsets: reset` (the default when b changes) starts the new b′ positions from the plain 1/i
schedule, since position i of a b′-batch does not play position i's role (at b′ = 1 position 1 is
every step's end, while a_1 was learned for the first token's own output); `keep` keeps a_1..a_b′
(zeros past b).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace
from typing import Iterator, Literal, Sequence

import torch
from torch import Tensor

from .config import MAX_MINI_BATCH, TTTConfig
from .ops.inner_lr import position_scale
from .schema import check, doc

SCALES = ("keep_per_token", "keep_per_minibatch", "none")
OFFSET_RULES = ("reset", "keep")


@dataclass
class InnerLoopOverride:
    """Another inner loop for trained TTT layers (TTT-Linear / TTT-MLP; not e2e_mlp)."""

    mini_batch_size: int | None = doc(None, "tokens per inner gradient step b' (1 = online gradient descent); "
                                            "null: the trained b")
    base_lr: float | None = doc(None, "inner learning rate before `scale` (> 0); null: the trained base_lr")
    scale: Literal["keep_per_token", "keep_per_minibatch", "none"] | None = doc(
        None, "how base_lr follows a changed b: keep_per_token (each token's gradient weighs on W as in "
              "training: ~base_lr·b'/b), keep_per_minibatch (each step as large as a trained step: ~base_lr), "
              "none (base_lr as it is); required when b changes")
    offsets: Literal["reset", "keep"] = doc("reset", "the learned per-position offsets a_i when b changes: reset "
                                                     "(the plain 1/i schedule) or keep (a_1..a_b', zeros past b)")

    def __post_init__(self) -> None:
        b = self.mini_batch_size
        check(b is None or 1 <= b <= MAX_MINI_BATCH, "mini_batch_size", f"null or an integer in 1..{MAX_MINI_BATCH}", b)
        check(self.base_lr is None or self.base_lr > 0, "base_lr", "null or a number > 0", self.base_lr)

    def resolve(self, trained: TTTConfig, where: str = "inner_loop") -> TTTConfig:
        """The nominal config of layers trained as `trained` under this override (the plain 1/i
        schedule's factor; `apply` computes each layer's own). ValueError naming `where.<field>`."""
        if trained.is_e2e:
            raise ValueError(f"{where}: e2e_mlp layers update on the model's own loss at mini-batch boundaries; "
                             "inner-loop overrides are for TTT layers (linear, mlp)")
        b, new_b = trained.mini_batch_size, self.mini_batch_size or trained.mini_batch_size
        if new_b != b and self.scale is None:
            raise ValueError(f"{where}.scale: mini_batch_size changes {b} -> {new_b}; say how base_lr follows: "
                             f"one of {list(SCALES)}")
        base = self.base_lr if self.base_lr is not None else trained.base_lr
        nominal = lr_factor(position_scale(torch.zeros(b, dtype=torch.float64)),
                            position_scale(torch.zeros(new_b, dtype=torch.float64)), self.scale or "none")
        return replace(trained, mini_batch_size=new_b, base_lr=base * nominal)


def resized_offsets(offsets: Tensor, mini_batch_size: int, rule: str) -> Tensor:
    """The per-position offsets a [b] for a mini-batch of b′ = `mini_batch_size` → [b′].

    Unchanged when b′ = b; else `reset`: zeros; `keep`: a_1..a_b′, zeros past b."""
    b = offsets.shape[0]
    if mini_batch_size == b:
        return offsets.clone()
    out = offsets.new_zeros(mini_batch_size)
    if rule == "keep":
        n = min(b, mini_batch_size)
        out[:n] = offsets[:n]
    elif rule != "reset":
        raise ValueError(f"offsets: expected one of {list(OFFSET_RULES)}, got {rule!r}")
    return out


def lr_factor(tau: Tensor, new_tau: Tensor, scale: str) -> float:
    """base_lr′ / base_lr for the position scales τ [b] (trained) and τ′ [b′] (override).

    keep_per_token: λ′·τ′_b′ = λ·τ_b; keep_per_minibatch: b′·λ′·τ′_b′ = b·λ·τ_b; none: 1."""
    if scale == "none":
        return 1.0
    if scale not in SCALES:
        raise ValueError(f"scale: expected one of {list(SCALES)}, got {scale!r}")
    last, new_last = float(tau[-1]), float(new_tau[-1])
    if new_last <= 0:
        raise ValueError(f"scale: {scale} needs the new last position's scale tau > 0 (its offset makes it 0; "
                         "use offsets: reset or scale: none)")
    if scale == "keep_per_token":
        return last / new_last
    return tau.shape[0] * last / (new_tau.shape[0] * new_last)


@contextlib.contextmanager
def apply(layers: Sequence[torch.nn.Module], override: InnerLoopOverride, trained: TTTConfig,
          where: str = "inner_loop") -> Iterator[None]:
    """Run `layers` (`TTTLayer`s trained as `trained`) with `override` inside the block (each
    layer's `config.base_lr` becomes its compensated base_lr′). Everything is restored on exit,
    exactly (the same tensors put back)."""
    override.resolve(trained, where)  # the field errors, before anything changes
    new_b = override.mini_batch_size or trained.mini_batch_size
    saved = [(layer.config, layer.tau_offset.data) for layer in layers]
    try:
        for layer in layers:
            offsets = layer.tau_offset.detach()
            new_offsets = resized_offsets(offsets, new_b, override.offsets)
            factor = lr_factor(position_scale(offsets.double()), position_scale(new_offsets.double()),
                               override.scale or "none")
            base = override.base_lr if override.base_lr is not None else layer.config.base_lr
            layer.config = replace(layer.config, mini_batch_size=new_b, base_lr=base * factor)
            layer.tau_offset.data = new_offsets  # a [b'] parameter in place of the [b] one
        yield
    finally:
        for layer, (config, offsets) in zip(layers, saved):
            layer.config, layer.tau_offset.data = config, offsets


__all__ = ["InnerLoopOverride", "SCALES", "OFFSET_RULES", "resized_offsets", "lr_factor", "apply"]
