"""`TTTLayer`: a TTT sequence-modelling layer (projections, η gate, inner model, post-norm, output).

Holds parameters and calls the pure functions of `ttt_speech.ops`; knows nothing of host models.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .config import TTTConfig
from .ops.activations import gelu_tanh
from .ops.inner_lr import position_scale, token_lr
from .ops.inner_models import INNER_MODELS, InnerNorm, pack_layers, prepare, unpack_layers
from .ops.layer_norm import layer_norm
from .ops.rope import rope_interleaved
from .ops.scan import from_grid, scan_minibatches, slot_index, to_grid
from .state import TTTState

FAST_WEIGHT_NAMES = {"linear": ("W1", "b1"), "mlp": ("W1", "b1", "W2", "b2")}
INIT_STD = 0.02


class TTTLayer(nn.Module):
    """TTT layer over x [B, T, C] → y [B, T, C], with an explicit streaming state.

    `y, state = layer(x)` runs a whole sequence from the initial fast weights;
    `y, state = layer(x, state)` continues a stream: any split of a sequence into consecutive
    chunks gives the outputs of one pass (docs/architecture.md §3). The returned state is new; the
    one passed in is not modified.
    """

    def __init__(self, dim: int, config: TTTConfig, num_heads: int | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        heads = num_heads if num_heads is not None else config.num_heads
        if heads is None:
            raise ValueError("TTTConfig.num_heads: must be set when the host gives no head count")
        if dim % heads != 0:
            raise ValueError(f"TTTConfig.num_heads: {heads} heads do not divide the width {dim}")
        if (dim // heads) % 2 != 0:
            raise ValueError(f"TTTConfig.num_heads: head dim {dim // heads} must be even for RoPE")
        self.config = config
        self.dim, self.num_heads, self.head_dim = dim, heads, dim // heads
        self.mini_batch_size = config.mini_batch_size
        kw = {"device": device, "dtype": dtype}
        self.q_proj = nn.Linear(dim, dim, bias=False, **kw)
        self.k_proj = nn.Linear(dim, dim, bias=False, **kw)
        self.v_proj = nn.Linear(dim, dim, bias=False, **kw)
        self.o_proj = nn.Linear(dim, dim, bias=False, **kw)
        self.gate_proj = nn.Linear(dim, dim, bias=False, **kw) if config.output_gate else None
        self.lr_gate_weight = nn.Parameter(torch.empty(heads, dim, **kw))
        self.lr_gate_bias = nn.Parameter(torch.empty(heads, **kw))
        self.tau_offset = nn.Parameter(torch.empty(config.mini_batch_size, **kw))
        d, h = self.head_dim, config.mlp_expansion * self.head_dim
        shapes = {"W1": (d, d), "b1": (1, d)} if config.layer_type == "linear" else {
            "W1": (d, h), "b1": (1, h), "W2": (h, d), "b2": (1, d)}
        self.fast_names = FAST_WEIGHT_NAMES[config.layer_type]
        for name in self.fast_names:
            self.register_parameter(name, nn.Parameter(torch.empty(heads, *shapes[name], **kw)))
        self.ttt_norm_weight = nn.Parameter(torch.empty(heads, d, **kw))
        self.ttt_norm_bias = nn.Parameter(torch.empty(heads, d, **kw))
        self.post_norm = nn.LayerNorm(dim, eps=1e-6, **kw)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for lin in (self.q_proj, self.k_proj, self.v_proj, self.o_proj, self.gate_proj):
            if lin is not None:
                nn.init.normal_(lin.weight, std=INIT_STD)
        nn.init.normal_(self.lr_gate_weight, std=INIT_STD)
        nn.init.zeros_(self.lr_gate_bias)
        nn.init.zeros_(self.tau_offset)
        for name in self.fast_names:
            p = getattr(self, name)
            nn.init.normal_(p, std=INIT_STD) if name.startswith("W") else nn.init.zeros_(p)
        nn.init.ones_(self.ttt_norm_weight)
        nn.init.zeros_(self.ttt_norm_bias)
        self.post_norm.reset_parameters()

    @property
    def state_dtype(self) -> torch.dtype:
        """float32 for every model dtype except float64 (kept for exact tests)."""
        return torch.promote_types(self.W1.dtype, torch.float32)

    def initial_state(self, batch_size: int) -> TTTState:
        """The state at the start of a stream: fast weights from the parameters, empty sums."""
        weights = tuple(
            getattr(self, n).to(self.state_dtype).unsqueeze(0).expand(batch_size, *getattr(self, n).shape)
            for n in self.fast_names
        )
        grads = tuple(torch.zeros_like(w) for w in weights)
        offset = torch.zeros(batch_size, dtype=torch.long, device=self.W1.device)
        return TTTState(weights, grads, offset, self.fast_names)

    def reset_state(self, state: TTTState, mask: Tensor) -> TTTState:
        """Rows where mask [B] is true restart from the initial fast weights; others are kept."""
        return self.initial_state(state.batch_size).where(mask.to(state.offset.device), state)

    def inner_lr(self, x: Tensor) -> Tensor:
        """λ = base_lr·σ(θ·x + c)/d per token and head: x [B, T, C] → [B, H, T], in the state dtype."""
        cdt = self.state_dtype
        return token_lr(x.to(cdt), self.lr_gate_weight.to(cdt), self.lr_gate_bias.to(cdt), self.config.base_lr,
                        self.head_dim)

    def mean_inner_lr(self, x: Tensor, valid: Tensor | None = None) -> float:
        """Mean λ over the tokens of x [B, T, C] (only where valid [B, T] is true), heads and rows."""
        with torch.no_grad():
            lr = self.inner_lr(x)  # [B, H, T]
            if valid is None:
                return lr.mean().item()
            weights = valid[:, None, :].to(lr.dtype).expand_as(lr)
            return ((lr * weights).sum() / weights.sum().clamp(min=1)).item()

    def qkv_proj(self, x: Tensor) -> Tensor:
        """[Q K V] = x·[Wq; Wk; Wv]ᵀ [B, T, 3C], one matmul (per projection if they are wrapped)."""
        projs = (self.q_proj, self.k_proj, self.v_proj)
        if all(type(p) is nn.Linear for p in projs):
            return F.linear(x, torch.cat([p.weight for p in projs]))
        return torch.cat([p(x) for p in projs], dim=-1)

    def forward(self, x: Tensor, state: TTTState | None = None) -> tuple[Tensor, TTTState]:
        """x [B, T, C] → (y [B, T, C], state after the chunk)."""
        B, T, C = x.shape
        if state is None:
            state = self.initial_state(B)
        if T == 0:
            return x, state
        H, d, b = self.num_heads, self.head_dim, self.mini_batch_size
        cdt = self.state_dtype
        index, grid = slot_index(state.offset, T, b)
        n_mb, R = grid // b, B * H

        def minibatches(t: Tensor, n: int) -> Tensor:  # [B, T, n·H·e] → [n, N, B·H, b, e]: mini-batch major
            t = to_grid(t.to(cdt), index, grid).view(B, n_mb, b, n, H, -1)
            return t.permute(3, 1, 0, 4, 2, 5).reshape(n, n_mb, R, b, t.shape[-1])

        qk, v = minibatches(self.qkv_proj(x), 3).split((2, 1))
        pos = torch.arange(b, device=x.device)  # RoPE positions: the slot inside the mini-batch
        q, k = rope_interleaved(qk, pos, self.config.rope_theta).unbind(0)  # [N, B·H, b, d]
        lr = minibatches(self.inner_lr(x).transpose(1, 2), 1)[0, ..., 0]  # [B, T, H] → [N, B·H, b], 0 on padding
        last_real = index[:, -1]  # slot of each row's last token
        slot_ends = torch.arange(b - 1, grid, b, device=x.device)  # last slot of each mini-batch
        complete = (slot_ends[:, None] <= last_real[None, :]).repeat_interleave(H, dim=1)  # [N, B·H]

        def per_row(p: Tensor) -> Tensor:  # [H, d] → [B·H, 1, d]
            return p.to(cdt)[None, :, None].expand(B, H, 1, d).reshape(R, 1, d)

        gamma, beta = per_row(self.ttt_norm_weight), per_row(self.ttt_norm_bias)
        tau = position_scale(self.tau_offset.to(cdt))
        # The inner loop must stay in full precision even under autocast (fp32 fast weights).
        no_autocast = torch.autocast(x.device.type, enabled=False) if torch.is_autocast_enabled(x.device.type) \
            else nullcontext()
        with no_autocast:
            inputs = prepare(q, k, v[0], lr, complete, tau, gamma, beta)
            z_bar, weights, grads = scan_minibatches(
                INNER_MODELS[self.config.layer_type], pack_layers(state.weights), pack_layers(state.grads),
                inputs, tau, InnerNorm(gamma * gamma, self.config.ln_eps), self.config.checkpoint_group_size)
            out = q + layer_norm(z_bar, gamma, beta, self.config.ln_eps)  # [N, B·H, b, d]
            out = from_grid(out.view(n_mb, B, H, b, d).permute(1, 0, 3, 2, 4).reshape(B, grid, C), index)
            out = F.layer_norm(out, (C,), self.post_norm.weight.to(cdt), self.post_norm.bias.to(cdt),
                               self.post_norm.eps)
        weights, grads = unpack_layers(weights, B), unpack_layers(grads, B)
        out = out.to(x.dtype)
        if self.gate_proj is not None:
            out = gelu_tanh(self.gate_proj(x)) * out
        y = self.o_proj(out)
        new_state = TTTState(weights, grads, (state.offset + T) % b, self.fast_names)
        return y, new_state

    def extra_repr(self) -> str:
        c = self.config
        return (f"dim={self.dim}, heads={self.num_heads}, type={c.layer_type}, "
                f"mini_batch={c.mini_batch_size}, base_lr={c.base_lr}")


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


__all__ = ["TTTLayer", "FAST_WEIGHT_NAMES", "count_parameters"]
