"""The Triton kernels as PyTorch operators (`torch.library.custom_op`), with their autograd.

One operator is one kernel launch: a `TorchDispatchMode` (`launches.LaunchCounter`) sees it as one
op, `torch.compile` treats it as opaque, and moshi's CUDA graphs capture it (nothing here reads a
device value on the host). Every torch op around a launch (a cast, a sum over programs) runs in
the caller or in the autograd formula, where the counter sees it too.

    ttt_speech::linear_scan           TTT-Linear over a chunk, the state returned (training, autograd)
    ttt_speech::linear_scan_          the same, the state stepped in its own buffers (inference)
    ttt_speech::linear_scan_backward  its gradients
    ttt_speech::mlp_scan_             TTT-MLP over a chunk, the state stepped in place (inference)
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from . import linear, mlp

# Triton's launcher for CPU tensors is its interpreter (TRITON_INTERPRET=1), which runs each
# program's Python; on a GPU these pick the compiled kernel's warps (docs/ttt_layer.md, kernels).
NUM_STAGES = 1  # no software pipelining: the loops carry the fast weights, not a stream of tiles
FP_FUSION = True  # a·b + c as one rounding (FMA), Triton's default through 3.9, asked for explicitly


def block_slots(mini_batch_size: int) -> int:
    """The slots of a mini-batch in a kernel: b rounded up to a power of two, at least 16 (`tl.dot`)."""
    return max(16, 1 << (mini_batch_size - 1).bit_length())


def num_warps(head_dim: int) -> int:
    return 8 if head_dim >= 128 else 4


def row_tile(head_dim: int) -> int:
    """Rows of a [D+1, D] matrix per tile (TTT-Linear): 32 rows of 128 are 16 fp32 values a thread."""
    return min(head_dim, 32)


def mini_batches_bound(length: int, mini_batch_size: int) -> int:
    """The most mini-batches a chunk of `length` tokens can span (a row at offset b − 1): sized
    without reading the offsets, which would sync the host with the device."""
    return -(-(length + mini_batch_size - 1) // mini_batch_size)


def _checkpoints(length: int, mini_batch_size: int, ckpt_every: int) -> int:
    """How many [W; b] a forward saves (none when ckpt_every is 0: no backward will run)."""
    return -(-mini_batches_bound(length, mini_batch_size) // ckpt_every) if ckpt_every else 0


def _common(qkv: Tensor, num_heads: int, mini_batch_size: int, rope_theta: float, eps: float) -> dict:
    """The size and setting arguments every kernel takes, and its launch options."""
    B, T, three_c = qkv.shape
    C = three_c // 3
    D = C // num_heads
    return dict(T=T, H=num_heads, C=C, bsz=mini_batch_size, log2_theta=math.log2(rope_theta), eps=eps, D=D,
                BB=block_slots(mini_batch_size), num_warps=num_warps(D), num_stages=NUM_STAGES,
                enable_fp_fusion=FP_FUSION)


def _linear_common(*args) -> dict:
    """`_common`'s, and the rows per tile of [W; b]."""
    common = _common(*args)
    return dict(common, KT=row_tile(common["D"]))


def _launch_linear_forward(qkv, lr, tau_offset, gamma, beta, w, s, offset, active, w_out, s_out, ckpt,
                           ckpt_every, num_heads, mini_batch_size, rope_theta, eps) -> Tensor:
    B, T, _ = qkv.shape
    out = qkv.new_empty(B, T, qkv.shape[-1] // 3)
    save = ckpt is not None and ckpt.shape[1] > 0
    linear.linear_forward_kernel[(B * num_heads,)](
        qkv, qkv.stride(0), qkv.stride(1), lr, lr.stride(0), lr.stride(1), lr.stride(2),
        out, out.stride(0), out.stride(1), tau_offset, gamma, beta,
        w, w.stride(0), w.stride(1), s, s.stride(0), s.stride(1), w_out, s_out,
        ckpt if save else w_out, max(ckpt_every, 1), ckpt.shape[1] if save else 1,
        offset, active if active is not None else offset,
        HAS_ACTIVE=active is not None, SAVE=save,
        **_linear_common(qkv, num_heads, mini_batch_size, rope_theta, eps))
    return out


@torch.library.custom_op("ttt_speech::linear_scan", mutates_args=())
def linear_scan(qkv: Tensor, lr: Tensor, tau_offset: Tensor, gamma: Tensor, beta: Tensor, w: Tensor, s: Tensor,
                offset: Tensor, active: Optional[Tensor], num_heads: int, mini_batch_size: int, rope_theta: float,
                eps: float, ckpt_every: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """TTT-Linear over a chunk → (out [B, T, C], [W; b] after [B, H, D+1, D], sums after, checkpoints).

    qkv [B, T, 3C] fp32 (the projection, before RoPE); lr [B, H, T] (λ, 0 on inactive rows);
    tau_offset [b]; gamma, beta [H, D]; w, s [B, H, D+1, D] (any strides over B and H: the initial
    state is a broadcast); offset [B] int64; active [B] bool or None. The checkpoints
    [B·H, n, D+1, D] ([W; b] every `ckpt_every` mini-batches) are for the backward."""
    B = qkv.shape[0]
    D = qkv.shape[-1] // 3 // num_heads
    w_out = w.new_empty(B, num_heads, D + 1, D)
    s_out = torch.empty_like(w_out)
    ckpt = w.new_empty(B * num_heads, _checkpoints(qkv.shape[1], mini_batch_size, ckpt_every), D + 1, D)
    out = _launch_linear_forward(qkv, lr, tau_offset, gamma, beta, w, s, offset, active, w_out, s_out, ckpt,
                                 ckpt_every, num_heads, mini_batch_size, rope_theta, eps)
    return out, w_out, s_out, ckpt


@linear_scan.register_fake
def _(qkv, lr, tau_offset, gamma, beta, w, s, offset, active, num_heads, mini_batch_size, rope_theta, eps,
      ckpt_every):
    B, T, three_c = qkv.shape
    D = three_c // 3 // num_heads
    state = w.new_empty(B, num_heads, D + 1, D)
    ckpt = w.new_empty(B * num_heads, _checkpoints(T, mini_batch_size, ckpt_every), D + 1, D)
    return qkv.new_empty(B, T, three_c // 3), state, torch.empty_like(state), ckpt


@torch.library.custom_op("ttt_speech::linear_scan_", mutates_args=("w", "s"))
def linear_scan_(qkv: Tensor, lr: Tensor, tau_offset: Tensor, gamma: Tensor, beta: Tensor, w: Tensor, s: Tensor,
                 offset: Tensor, active: Optional[Tensor], num_heads: int, mini_batch_size: int, rope_theta: float,
                 eps: float) -> Tensor:
    """`linear_scan` stepping w and s (contiguous [B, H, D+1, D]) where they live: no copy of the
    state per call, and a CUDA graph replays into the buffers it captured. Returns out."""
    return _launch_linear_forward(qkv, lr, tau_offset, gamma, beta, w, s, offset, active, w, s, None, 1,
                                  num_heads, mini_batch_size, rope_theta, eps)


@linear_scan_.register_fake
def _(qkv, lr, tau_offset, gamma, beta, w, s, offset, active, num_heads, mini_batch_size, rope_theta, eps):
    return qkv.new_empty(*qkv.shape[:2], qkv.shape[-1] // 3)


@torch.library.custom_op("ttt_speech::linear_scan_backward", mutates_args=())
def linear_scan_backward(dout: Tensor, dw_out: Optional[Tensor], ds_out: Optional[Tensor], qkv: Tensor, lr: Tensor,
                         tau_offset: Tensor, gamma: Tensor, beta: Tensor, s: Tensor, ckpt: Tensor, offset: Tensor,
                         active: Optional[Tensor], num_heads: int, mini_batch_size: int, rope_theta: float,
                         eps: float, ckpt_every: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The gradients of `linear_scan` → (dqkv, dlr, dw, ds, and per program: dtau_offset [B·H, BB],
    dgamma, dbeta [B·H, D]; the caller sums those over programs). dw_out, ds_out: contiguous, both
    or neither."""
    B, T, three_c = qkv.shape
    D = three_c // 3 // num_heads
    R, BB = B * num_heads, block_slots(mini_batch_size)
    dqkv = qkv.new_empty(B, T, three_c)
    dlr = lr.new_empty(B, num_heads, T)
    dw, ds = qkv.new_empty(R, D + 1, D), qkv.new_empty(R, D + 1, D)
    dtau, dgamma, dbeta = qkv.new_empty(R, BB), qkv.new_empty(R, D), qkv.new_empty(R, D)
    scratch = qkv.new_empty(R, ckpt_every, D + 1, D)  # a group's weights, rebuilt from its checkpoint
    acc = qkv.new_empty(R, 2, BB, D)  # a mini-batch's ∂q, ∂k, assembled from column tiles
    has_dstate = dw_out is not None
    linear.linear_backward_kernel[(R,)](
        qkv, qkv.stride(0), qkv.stride(1), lr, lr.stride(0), lr.stride(1), lr.stride(2),
        dout, dout.stride(0), dout.stride(1), tau_offset, gamma, beta,
        s, s.stride(0), s.stride(1), dw_out if has_dstate else dw, ds_out if has_dstate else ds,
        ckpt, ckpt_every, ckpt.shape[1], scratch, acc, offset, active if active is not None else offset,
        dqkv, dlr, dw, ds, dtau, dgamma, dbeta,
        HAS_ACTIVE=active is not None, HAS_DSTATE=has_dstate,
        **_linear_common(qkv, num_heads, mini_batch_size, rope_theta, eps))
    return dqkv, dlr, dw.view(B, num_heads, D + 1, D), ds.view(B, num_heads, D + 1, D), dtau, dgamma, dbeta


@linear_scan_backward.register_fake
def _(dout, dw_out, ds_out, qkv, lr, tau_offset, gamma, beta, s, ckpt, offset, active, num_heads, mini_batch_size,
      rope_theta, eps, ckpt_every):
    B, T, three_c = qkv.shape
    D = three_c // 3 // num_heads
    R, BB = B * num_heads, block_slots(mini_batch_size)
    state = qkv.new_empty(B, num_heads, D + 1, D)
    return (torch.empty_like(qkv), lr.new_empty(B, num_heads, T), state, torch.empty_like(state),
            qkv.new_empty(R, BB), qkv.new_empty(R, D), qkv.new_empty(R, D))


def _setup_linear(ctx, inputs, output) -> None:
    qkv, lr, tau_offset, gamma, beta, w, s, offset, active, num_heads, mini_batch_size, rope_theta, eps, \
        ckpt_every = inputs
    if ckpt_every < 1:
        raise ValueError("ttt_speech::linear_scan: ckpt_every must be >= 1 when autograd records it "
                         "(the backward rebuilds the weights from those checkpoints)")
    ctx.mark_non_differentiable(output[3])
    # Gradients that never arrive stay None: no zero tensors the size of the checkpoints, and a
    # final state outside the loss runs the kernel without ∂/∂state.
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(qkv, lr, tau_offset, gamma, beta, s, output[3], offset, active)
    ctx.args = (num_heads, mini_batch_size, rope_theta, eps, ckpt_every)
    ctx.w_shape = w.shape


def _linear_backward(ctx, dout, dw_out, ds_out, _dckpt):
    qkv, lr, tau_offset, gamma, beta, s, ckpt, offset, active = ctx.saved_tensors
    num_heads, mini_batch_size = ctx.args[:2]
    # the kernel reads a token's channels in a run (autograd may hand over an expanded gradient)
    dout = torch.zeros(*qkv.shape[:2], qkv.shape[-1] // 3, dtype=qkv.dtype, device=qkv.device) if dout is None \
        else dout if dout.stride(-1) == 1 else dout.contiguous()
    if dw_out is None and ds_out is None:
        dstate = (None, None)
    else:  # the state after the chunk reached the loss (a window carried with its graph)
        dstate = tuple((g if g is not None else torch.zeros(ctx.w_shape, dtype=s.dtype, device=s.device))
                       .contiguous() for g in (dw_out, ds_out))
    dqkv, dlr, dw, ds, dtau, dgamma, dbeta = linear_scan_backward(
        dout, *dstate, qkv, lr, tau_offset, gamma, beta, s, ckpt, offset, active, *ctx.args)
    D = dgamma.shape[-1]
    dtau = dtau.sum(0)[:mini_batch_size]
    dgamma = dgamma.view(-1, num_heads, D).sum(0)
    dbeta = dbeta.view(-1, num_heads, D).sum(0)
    return dqkv, dlr, dtau, dgamma, dbeta, dw, ds, None, None, None, None, None, None, None


torch.library.register_autograd("ttt_speech::linear_scan", _linear_backward, setup_context=_setup_linear)


def hidden_columns(head_dim: int, hidden: int) -> int:
    """TTT-MLP: hidden columns per tile, ~2k values per tile of W1 or W2 (16 at D = 128: with 32,
    ptxas spilled 3 KB per thread on sm_80)."""
    return min(hidden, max(16, 2048 // head_dim))


@torch.library.custom_op("ttt_speech::mlp_scan_", mutates_args=("w1", "w2", "s1", "s2"))
def mlp_scan_(qkv: Tensor, lr: Tensor, tau_offset: Tensor, gamma: Tensor, beta: Tensor, w1: Tensor, w2: Tensor,
              s1: Tensor, s2: Tensor, offset: Tensor, active: Optional[Tensor], num_heads: int, mini_batch_size: int,
              rope_theta: float, eps: float) -> Tensor:
    """TTT-MLP over a chunk, stepping [W1; b1] [B, H, D+1, M], [W2; b2] [B, H, M+1, D] and their sums
    (all contiguous) where they live → out [B, T, C]. Inputs as `linear_scan`'s; no autograd."""
    B, T, three_c = qkv.shape
    out = qkv.new_empty(B, T, three_c // 3)
    common = _common(qkv, num_heads, mini_batch_size, rope_theta, eps)
    hidden = w1.shape[-1]
    mlp.mlp_forward_kernel[(B * num_heads,)](
        qkv, qkv.stride(0), qkv.stride(1), lr, lr.stride(0), lr.stride(1), lr.stride(2),
        out, out.stride(0), out.stride(1), tau_offset, gamma, beta, w1, w2, s1, s2,
        offset, active if active is not None else offset, HAS_ACTIVE=active is not None,
        M=hidden, MT=hidden_columns(common["D"], hidden), **common)
    return out


@mlp_scan_.register_fake
def _(qkv, lr, tau_offset, gamma, beta, w1, w2, s1, s2, offset, active, num_heads, mini_batch_size, rope_theta, eps):
    return qkv.new_empty(*qkv.shape[:2], qkv.shape[-1] // 3)
