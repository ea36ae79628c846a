"""The inner loop of one `TTTLayer` call on the kernels: what `TTTLayer.forward` calls instead of
`ops.scan.scan_minibatches` (and the RoPE, chunk layout and inner LayerNorm around it)."""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from . import custom_ops


class ScanParams(NamedTuple):
    """The layer's parameters the inner loop reads, in the state dtype (float32)."""

    tau_offset: Tensor  # [b]
    gamma: Tensor  # [H, D] the inner LayerNorm's weight
    beta: Tensor  # [H, D] its bias


class ScanSettings(NamedTuple):
    layer_type: str
    num_heads: int
    mini_batch_size: int
    rope_theta: float
    eps: float
    checkpoint_group_size: int  # TTTConfig's: training saves [W; b] every this many mini-batches (0: every one)


def _packed(t: Tensor) -> Tensor:
    """A state tensor [B, H, i+1, o] whose last two dims are row-major (any strides over B and H)."""
    return t if t.stride(-1) == 1 and t.stride(-2) == t.shape[-1] else t.contiguous()


def triton_scan(qkv: Tensor, lr: Tensor, params: ScanParams, weights: tuple[Tensor, ...], grads: tuple[Tensor, ...],
                offset: Tensor, active: Tensor | None, settings: ScanSettings,
                in_place: bool) -> tuple[Tensor, tuple[Tensor, ...], tuple[Tensor, ...]]:
    """One chunk through the kernels → (q + LN(z̄)·γ + β [B, T, C] float32, weights, grads after).

    qkv [B, T, 3C] float32; lr [B, H, T] (λ, zero on inactive rows); weights / grads: the packed
    state ([W; b] per fast layer, [B, H, i+1, o]). in_place: step the state's own (contiguous)
    tensors and return them (inference)."""
    s = settings
    args = (s.num_heads, s.mini_batch_size, s.rope_theta, s.eps)
    qkv = qkv if qkv.stride(-1) == 1 else qkv.contiguous()  # the kernels read a token's channels in a run
    if s.layer_type == "linear":
        (w,), (g,) = weights, grads
        if in_place:
            out = custom_ops.linear_scan_(qkv, lr, *params, w, g, offset, active, *args)
            return out, (w,), (g,)
        # With autograd recording, save [W; b] every G mini-batches for the backward to rebuild
        # from (every one when checkpointing is off: all the backward keeps, far less than the
        # PyTorch path's graph); nothing otherwise.
        records = torch.is_grad_enabled() and any(t.requires_grad for t in (qkv, lr, *params, *weights, *grads))
        every = (s.checkpoint_group_size or 1) if records else 0
        out, w, g, _ = custom_ops.linear_scan(qkv, lr, *params, _packed(w), _packed(g), offset, active, *args, every)
        return out, (w,), (g,)
    if in_place:
        out = custom_ops.mlp_scan_(qkv, lr, *params, *weights, *grads, offset, active, *args)
        return out, weights, grads
    w1, w2, g1, g2 = (t.clone(memory_format=torch.contiguous_format) for t in (*weights, *grads))  # stepped in place
    out = custom_ops.mlp_scan_(qkv, lr, *params, w1, w2, g1, g2, offset, active, *args)
    return out, (w1, w2), (g1, g2)
