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
from .ops.inner_models import INNER_MODELS, InnerNorm, prepare
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
    chunks gives the outputs of one pass (docs/architecture.md §3). The one passed in is not
    modified (unless `in_place`: streaming inference steps its buffers); the returned state may
    share memory with it where nothing changed (e.g. the weights inside an unfinished mini-batch),
    so step a returned state in place only if the one before it is no longer needed.
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
        kw = {"device": device, "dtype": dtype}
        # [Wq; Wk; Wv] in one weight [3C, C]: one matmul per call with no per-call concatenation
        # (at width 4096 a torch.cat of three weights copied 201 MB per layer per step).
        self.qkv_proj = nn.Linear(dim, 3 * dim, bias=False, **kw)
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
        for lin in (self.qkv_proj, self.o_proj, self.gate_proj):
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
    def mini_batch_size(self) -> int:
        """b, as the config says (an `inner_loop` override swaps the config, and b with it)."""
        return self.config.mini_batch_size

    @property
    def state_dtype(self) -> torch.dtype:
        """float32 for every model dtype except float64 (kept for exact tests)."""
        return torch.promote_types(self.W1.dtype, torch.float32)

    def initial_state(self, batch_size: int) -> TTTState:
        """The state at the start of a stream: fast weights from the parameters, empty sums.

        Packed (`TTTState.packed`): one [W; b] [B, H, i+1, o] per fast layer, a broadcast view
        over the batch (clone it to update it in place).
        """
        names = self.fast_names
        weights = tuple(
            torch.cat((getattr(self, w), getattr(self, b)), dim=-2).to(self.state_dtype).unsqueeze(0)
            .expand(batch_size, -1, -1, -1)
            for w, b in zip(names[::2], names[1::2])
        )
        grads = tuple(torch.zeros_like(w) for w in weights)
        offset = torch.zeros(batch_size, dtype=torch.long, device=self.W1.device)
        return TTTState(weights, grads, offset, names, packed=True)

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

    def forward(self, x: Tensor, state: TTTState | None = None, *, active: Tensor | None = None,
                in_place: bool = False, trim: bool = True) -> tuple[Tensor, TTTState]:
        """x [B, T, C] → (y [B, T, C], state after the chunk).

        Args:
            state: the state before the chunk (None: the initial state).
            active: [B] bool, rows that take this chunk (None: all); the others keep their state
                exactly (their tokens get learning rate 0 and no update; their outputs are unused).
            in_place: update `state`'s own tensors and return it, instead of a new state (inference
                only: autograd off, every state tensor contiguous and owned, e.g. a streaming buffer).
            trim: lay a chunk inside one mini-batch on its own slots (`ops.scan.slot_index`);
                False pads it to the whole mini-batch (the general layout; the same numbers).
        """
        B, T, C = x.shape
        if state is None:
            state = self.initial_state(B)
        if T == 0:
            return x, state
        if in_place and not all(t.is_contiguous() for t in state.tensors()):
            raise ValueError("TTTLayer: in_place needs a state of contiguous tensors (clone the initial state)")
        if in_place and torch.is_grad_enabled():
            raise ValueError("TTTLayer: in_place needs autograd off (torch.no_grad / inference_mode)")
        qkv = self.qkv_proj(x)  # [B, T, 3C]: [q | k | v], each [H, d] per token
        lr = self.inner_lr(x)  # [B, H, T]
        if active is not None:
            lr = lr * active[:, None, None]
        # The inner loop must stay in full precision even under autocast (fp32 fast weights).
        no_autocast = torch.autocast(x.device.type, enabled=False) if torch.is_autocast_enabled(x.device.type) \
            else nullcontext()
        with no_autocast:
            qkv = qkv.to(self.state_dtype)
            if self._use_triton(x, state):
                out, weights, grads = self._scan_triton(qkv, lr, state, active, in_place)  # out [B, T, C]
            else:
                out, weights, grads = self._scan_torch(qkv, lr, state, active, in_place, trim)
            out = F.layer_norm(out, (C,), self.post_norm.weight.to(out.dtype), self.post_norm.bias.to(out.dtype),
                               self.post_norm.eps)
        out = out.to(x.dtype)
        if self.gate_proj is not None:
            out = gelu_tanh(self.gate_proj(x)) * out
        y = self.o_proj(out)
        offset = (state.offset + T) % self.mini_batch_size
        if active is not None:
            offset = torch.where(active, offset, state.offset)
        if in_place:  # the scan updated the weights and sums where they live
            state.offset.copy_(offset)
            return y, state
        return y, TTTState(weights, grads, offset, state.names, packed=True)

    def _use_triton(self, x: Tensor, state: TTTState) -> bool:
        """Whether this call runs the fused kernels (`TTTConfig.kernel`, `ttt_speech.kernels`)."""
        from . import kernels

        def needs_grad() -> bool:
            return torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters())
                                                or any(t.requires_grad for t in state.tensors()))

        return kernels.use_triton(self.config.kernel, self.config.layer_type, self.head_dim, self.W1.shape[-1],
                                  self.mini_batch_size, self.state_dtype, x, needs_grad)

    def _scan_triton(self, qkv: Tensor, lr: Tensor, state: TTTState, active: Tensor | None,
                     in_place: bool) -> tuple[Tensor, tuple[Tensor, ...], tuple[Tensor, ...]]:
        """The inner loop in fused kernels (one launch per chunk): → (q + LN(z̄)·γ + β [B, T, C], weights, grads)."""
        from .kernels.scan import ScanParams, ScanSettings, triton_scan

        cdt, c = self.state_dtype, self.config
        params = ScanParams(*(p.to(cdt).contiguous() for p in (self.tau_offset, self.ttt_norm_weight,
                                                                 self.ttt_norm_bias)))
        settings = ScanSettings(c.layer_type, self.num_heads, self.mini_batch_size, c.rope_theta, c.ln_eps,
                                c.checkpoint_group_size)
        return triton_scan(qkv, lr, params, state.weights, state.grads, state.offset, active, settings, in_place)

    def _scan_torch(self, qkv: Tensor, lr: Tensor, state: TTTState, active: Tensor | None, in_place: bool,
                    trim: bool) -> tuple[Tensor, tuple[Tensor, ...], tuple[Tensor, ...]]:
        """The inner loop in PyTorch ops (`ttt_speech.ops`): → (q + LN(z̄)·γ + β [B, T, C], weights, grads)."""
        B, T, three_c = qkv.shape
        C, H, d, b = three_c // 3, self.num_heads, self.head_dim, self.mini_batch_size
        cdt = self.state_dtype
        layout = slot_index(state.offset, T, b, trim)
        index, grid, w = layout.index, layout.length, layout.width  # w: slots per mini-batch on the grid
        n_mb, R = layout.num_minibatches, B * H
        slots = slice(layout.first, layout.first + w)  # the mini-batch positions the grid's slots stand for

        def minibatches(t: Tensor, n: int) -> Tensor:  # [B, T, n·H·e] → [n, N, B·H, w, e]: mini-batch major
            t = to_grid(t, index, grid).view(B, n_mb, w, n, H, -1)
            return t.permute(3, 1, 0, 4, 2, 5).reshape(n, n_mb, R, w, t.shape[-1])

        qk, v = minibatches(qkv, 3).split((2, 1))
        pos = torch.arange(b, device=qkv.device)[slots]  # RoPE positions: the slot inside the mini-batch
        q, k = rope_interleaved(qk, pos, self.config.rope_theta).unbind(0)  # [N, B·H, w, d]
        complete = layout.complete(b)  # [N, B]
        if active is not None:
            complete = complete & active[None, :]
        lr = minibatches(lr.transpose(1, 2), 1)[0, ..., 0]  # [B, T, H] → [N, B·H, w], 0 on padding
        complete = complete.repeat_interleave(H, dim=1)  # [N, B·H]

        def per_row(p: Tensor) -> Tensor:  # [H, d] → [B·H, 1, d]
            return p.to(cdt)[None, :, None].expand(B, H, 1, d).reshape(R, 1, d)

        gamma, beta = per_row(self.ttt_norm_weight), per_row(self.ttt_norm_bias)
        tau = position_scale(self.tau_offset.to(cdt))[slots]
        inputs = prepare(q, k, v[0], lr, complete, tau, gamma, beta)
        rows = tuple(t.flatten(0, 1) for t in state.weights), tuple(t.flatten(0, 1) for t in state.grads)
        z_bar, weights, grads = scan_minibatches(  # weights, grads: [B·H, i+1, o] per fast layer
            INNER_MODELS[self.config.layer_type], *rows, inputs, tau,
            InnerNorm(gamma * gamma, self.config.ln_eps), self.config.checkpoint_group_size, in_place)
        out = q + layer_norm(z_bar, gamma, beta, self.config.ln_eps)  # [N, B·H, w, d]
        out = from_grid(out.view(n_mb, B, H, w, d).permute(1, 0, 3, 2, 4).reshape(B, grid, C), index)
        unflat = lambda t: t.unflatten(0, (B, H))  # noqa: E731  [B·H, i+1, o] → [B, H, i+1, o]
        return out, tuple(map(unflat, weights)), tuple(map(unflat, grads))

    def extra_repr(self) -> str:
        c = self.config
        return (f"dim={self.dim}, heads={self.num_heads}, type={c.layer_type}, "
                f"mini_batch={c.mini_batch_size}, base_lr={c.base_lr}")


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


__all__ = ["TTTLayer", "FAST_WEIGHT_NAMES", "count_parameters"]
