"""`E2EMLP`: the updatable MLP of TTT-E2E ("End-to-End Test-Time Training for Long Context").

Unlike a TTT layer (docs/architecture.md §2), whose fast weights learn a self-supervised
reconstruction task inside the layer, these fast weights are updated by the *host model's* next-token loss: after
each mini-batch of b frames, W ← W − η·∇_W ℓ(mini-batch). The layer only predicts with the
weights it is given; the update needs the whole model's loss and lives with the host adapter
(`ttt_speech.moshi.e2e`). Shapes: x [B, T, D]; fast weights per row, float32:
W1 [B, 1, D, h], b1 [B, 1, 1, h], W2 [B, 1, h, D], b2 [B, 1, 1, D] (one "head", so the state has
the layout of a TTT layer's and shares its save / load / reset code).
"""
from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import Tensor, nn

from .config import TTTConfig
from .ops.activations import gelu_tanh
from .state import TTTState

E2E_FAST_WEIGHT_NAMES = ("W1", "b1", "W2", "b2")
INIT_STD = 0.02


def fast_mlp(x: Tensor, weights: tuple[Tensor, ...]) -> Tensor:
    """gelu(x·W1 + b1)·W2 + b2 with per-row weights: x [B, T, D] → [B, T, D] (x's dtype = weights')."""
    W1, b1, W2, b2 = (w[:, 0] for w in weights)
    return torch.baddbmm(b2, gelu_tanh(torch.baddbmm(b1, x, W1)), W2)


def sgd_step(weights: tuple[Tensor, ...], grads: tuple[Tensor | None, ...], lr: Tensor) -> tuple[Tensor, ...]:
    """W − lr·g for each fast weight (a missing gradient counts as zero)."""
    return tuple(w if g is None else w - lr.to(w.dtype) * g for w, g in zip(weights, grads))


class E2EMLP(nn.Module):
    """The updatable MLP: parameters are the initial fast weights W0 and the inner learning rate.

    `y, state = layer(x, state)` predicts with `state`'s weights and returns the state unchanged;
    `layer.update(state, grads)` is the inner step. The inner learning rate is
    η = base_lr · 2σ(θ), θ a learned scalar starting at 0 (η = base_lr), so meta-training can
    tune it and base_lr = 0 freezes the weights.
    """

    def __init__(self, dim: int, config: TTTConfig, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.config = config
        self.dim, self.hidden = dim, config.mlp_expansion * dim
        self.num_heads, self.head_dim = 1, dim  # for reports: one "head" over the whole width
        kw = {"device": device, "dtype": dtype}
        shapes = {"W1": (dim, self.hidden), "b1": (1, self.hidden), "W2": (self.hidden, dim), "b2": (1, dim)}
        self.fast_names = E2E_FAST_WEIGHT_NAMES
        for name in self.fast_names:
            self.register_parameter(name, nn.Parameter(torch.empty(1, *shapes[name], **kw)))
        self.lr_logit = nn.Parameter(torch.zeros((), **kw))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for name in self.fast_names:
            p = getattr(self, name)
            nn.init.normal_(p, std=INIT_STD) if name.startswith("W") else nn.init.zeros_(p)
        nn.init.zeros_(self.lr_logit)

    @property
    def mini_batch_size(self) -> int:
        """b: the frames of one update, as the config says."""
        return self.config.mini_batch_size

    @property
    def state_dtype(self) -> torch.dtype:
        """float32 for every model dtype except float64 (kept for exact tests)."""
        return torch.promote_types(self.W1.dtype, torch.float32)

    def inner_lr(self) -> Tensor:
        """η, a 0-dim tensor in the state dtype (differentiable in θ)."""
        return self.config.base_lr * 2 * torch.sigmoid(self.lr_logit.to(self.state_dtype))

    def mean_inner_lr(self, x: Tensor | None = None, valid: Tensor | None = None) -> float:
        """η (one learned scalar per layer, the same for every token; the arguments are ignored)."""
        with torch.no_grad():
            return self.inner_lr().item()

    def initial_state(self, batch_size: int) -> TTTState:
        """Fast weights W0 for every row; `offset` counts frames into an unfinished mini-batch."""
        weights = tuple(getattr(self, n).to(self.state_dtype).unsqueeze(0).expand(batch_size, *getattr(self, n).shape)
                        for n in self.fast_names)
        offset = torch.zeros(batch_size, dtype=torch.long, device=self.W1.device)
        return TTTState(weights, (), offset, self.fast_names)

    def reset_state(self, state: TTTState, mask: Tensor) -> TTTState:
        """Rows where mask [B] is true restart from W0; others are kept."""
        return self.initial_state(state.batch_size).where(mask.to(state.offset.device), state)

    def forward(self, x: Tensor, state: TTTState | None = None) -> tuple[Tensor, TTTState]:
        """x [B, T, D] → (y [B, T, D] predicted with `state`'s weights, the same state)."""
        if state is None:
            state = self.initial_state(x.shape[0])
        # fast weights stay float32 under autocast, as a TTT layer's (docs/architecture.md §3)
        no_autocast = torch.autocast(x.device.type, enabled=False) if torch.is_autocast_enabled(x.device.type) \
            else nullcontext()
        with no_autocast:
            y = fast_mlp(x.to(self.state_dtype), state.weights)
        return y.to(x.dtype), state

    def update(self, state: TTTState, grads: tuple[Tensor | None, ...], frames: int) -> TTTState:
        """The inner step after `frames` frames: W − η·∇W; `offset` records a short mini-batch."""
        weights = sgd_step(state.weights, grads, self.inner_lr())
        return TTTState(weights, (), (state.offset + frames) % self.mini_batch_size, self.fast_names)

    def extra_repr(self) -> str:
        c = self.config
        return f"dim={self.dim}, hidden={self.hidden}, mini_batch={c.mini_batch_size}, base_lr={c.base_lr}"
