"""TTT-MLP forward as one Triton kernel: the scan over a chunk's mini-batches, one program per
(batch row, head), inference only (no autograd).

The math is `ops.inner_models.mlp_step` / `mlp_outputs` with the layout of `ops.scan` and the RoPE
and inner LayerNorm of `TTTLayer` (see `linear.py` for the chunk layout). The fast weights
[W1; b1] [D+1, M] and [W2; b2] [M+1, D] (M = expansion·D, 512 at Moshi-7B's head dim) do not fit
in registers: they stay in the state's buffers and are streamed through the program in tiles of
the hidden width, twice per mini-batch:

    1. Z1 = k·W1 + b1, X2 = gelu(Z1), Z2 = X2·W2 + b2 (summed over tiles) → G2 = λ ⊙ ∇ℓ(Z2)
    2. per tile: G1 = (G2·W2ᵀ) ⊙ gelu'(Z1); the queries' first layer through its dual form,
       X̄2 = gelu(q·W1 + b1 − η·G1); their second layer summed over tiles (X̄2·W2, X̄2·X2ᵀ)
    3. per tile: the sums, and the weights stepped where the mini-batch completes.
The buffers are stepped in place: the caller passes copies unless it streams (`in_place`).
"""
import triton
import triton.language as tl

from .common import causal, dot, l2_grad, normalize, program_row, slots
from .linear import minibatch_tokens


@triton.jit
def _tanh_gelu_arg_sigmoid(x):
    """σ(2u) with u = √(2/π)·(x + 0.044715·x³), the constants of `ops.activations`: tanh(u) = 2σ(2u) − 1
    (Triton has no tanh)."""
    return tl.sigmoid(1.5957691216057308 * (x + 0.044715 * x * x * x))


@triton.jit
def gelu_tanh(x):
    """`ops.activations.gelu_tanh`: 0.5·x·(1 + tanh(u)) = x·σ(2u)."""
    return x * _tanh_gelu_arg_sigmoid(x)


@triton.jit
def gelu_tanh_grad(x):
    """`ops.activations.gelu_tanh_grad`: d gelu_tanh(x) / dx."""
    t = 2.0 * _tanh_gelu_arg_sigmoid(x) - 1.0
    return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 0.134145 * x * x)


@triton.jit
def load_hidden(w1_ptr, w2_ptr, cols, D: tl.constexpr, M: tl.constexpr):
    """Hidden columns `cols` [MT] of the fast weights: W1's [D, MT], b1's [MT], W2's rows [MT, D]."""
    rd = tl.arange(0, D)
    return (tl.load(w1_ptr + rd[:, None] * M + cols[None, :]), tl.load(w1_ptr + D * M + cols),
            tl.load(w2_ptr + cols[:, None] * D + rd[None, :]))


@triton.jit
def hidden_tile(w1_ptr, w2_ptr, cols, k, grad2, D: tl.constexpr, M: tl.constexpr):
    """`load_hidden`'s, with the keys' Z1 [BB, MT] and the first layer's gradient
    G1 = (G2·W2ᵀ) ⊙ gelu'(Z1) [BB, MT]."""
    w1, b1, w2 = load_hidden(w1_ptr, w2_ptr, cols, D, M)
    z1 = dot(k, w1) + b1[None, :]
    return w1, b1, w2, z1, dot(grad2, tl.trans(w2)) * gelu_tanh_grad(z1)


@triton.jit
def mlp_forward_kernel(
    qkv_ptr, stride_qkv_b, stride_qkv_t,  # [B, T, 3C] fp32
    lr_ptr, stride_lr_b, stride_lr_h, stride_lr_t,  # λ [B, H, T]
    out_ptr, stride_out_b, stride_out_t,  # q + LN(z̄)·γ + β [B, T, C]
    tau_offset_ptr, gamma_ptr, beta_ptr,
    w1_ptr, w2_ptr, s1_ptr, s2_ptr,  # [B, H, D+1, M], [B, H, M+1, D], sums alike: contiguous, stepped in place
    offset_ptr, active_ptr,
    T, H, C, bsz, log2_theta, eps,
    D: tl.constexpr, M: tl.constexpr, MT: tl.constexpr, BB: tl.constexpr, HAS_ACTIVE: tl.constexpr,
):
    pid, row, head, offset, active, gamma, beta, tau, tau_last, tau_passes = program_row(
        offset_ptr, active_ptr, gamma_ptr, beta_ptr, tau_offset_ptr, H, bsz, BB, D, HAS_ACTIVE)
    rd, rm = tl.arange(0, D), tl.arange(0, MT)
    w1_ptr += pid * (D + 1) * M
    s1_ptr += pid * (D + 1) * M
    w2_ptr += pid * (M + 1) * D
    s2_ptr += pid * (M + 1) * D
    qkv_ptr += row * stride_qkv_b + head * D
    lr_ptr += row * stride_lr_b + head * stride_lr_h
    out_ptr += row * stride_out_b + head * D
    n_mb = (offset + T + bsz - 1) // bsz
    for m in range(0, n_mb):
        t, real = slots(m, offset, T, bsz, BB)
        q, k, v, lam = minibatch_tokens(qkv_ptr, stride_qkv_t, lr_ptr, stride_lr_t, t, real, C, log2_theta, BB, D)
        b2 = tl.load(w2_ptr + M * D + rd)
        # 1. the keys through both layers, the second layer's gradient G2
        z2 = tl.zeros((BB, D), tl.float32) + b2[None, :]
        for tile in range(0, M // MT):
            w1, b1, w2 = load_hidden(w1_ptr, w2_ptr, tile * MT + rm, D, M)
            z2 += dot(gelu_tanh(dot(k, w1) + b1[None, :]), w2)
        grad2 = l2_grad(z2, (beta[None, :] - v + k) * gamma[None, :], gamma, lam, eps, D)[0]
        # 2. per tile: G1 = (G2·W2ᵀ) ⊙ gelu'(Z1), the queries' first layer through its dual form and
        #    their second layer (summed over tiles)
        with_prior = m == 0
        carried = (m == 0) | (not active)  # the sums S0 are those carried in (else zero)
        complete = (m * bsz + bsz - 1 - offset < T) & active
        last = m == n_mb - 1
        eta1 = causal(q, k, tau, BB)
        z2_bar = tl.zeros((BB, D), tl.float32) + b2[None, :]
        x2_dots = tl.zeros((BB, BB), tl.float32)  # X̄2·X2ᵀ, summed over tiles
        for tile in range(0, M // MT):
            cols = tile * MT + rm
            w1, b1, w2, z1, grad1 = hidden_tile(w1_ptr, w2_ptr, cols, k, grad2, D, M)
            z1_bar = dot(q, w1) + b1[None, :] - dot(eta1, grad1)
            if with_prior:
                z1_bar -= tau[:, None] * (dot(q, tl.load(s1_ptr + rd[:, None] * M + cols[None, :]))
                                          + tl.load(s1_ptr + D * M + cols)[None, :])
            x2_bar = gelu_tanh(z1_bar)
            z2_bar += dot(x2_bar, w2)
            if with_prior:
                z2_bar -= tau[:, None] * dot(x2_bar, tl.load(s2_ptr + cols[:, None] * D + rd[None, :]))
            x2_dots += dot(x2_bar, tl.trans(gelu_tanh(z1)))
        # 3. per tile: the sums S' = S0 + [x 1]ᵀ·G of both layers, and the step where complete (the
        #    keys' products recomputed rather than kept: fewer values live, no spills)
        tl.debug_barrier()  # every thread has read W and S before any writes them
        for tile in range(0, M // MT):
            cols = tile * MT + rm
            w1, b1, w2, z1, grad1 = hidden_tile(w1_ptr, w2_ptr, cols, k, grad2, D, M)
            s1 = dot(tl.trans(k), grad1)
            s1_b = tl.sum(grad1, axis=0)
            s2 = dot(tl.trans(gelu_tanh(z1)), grad2)
            if carried:
                s1 += tl.load(s1_ptr + rd[:, None] * M + cols[None, :])
                s1_b += tl.load(s1_ptr + D * M + cols)
                s2 += tl.load(s2_ptr + cols[:, None] * D + rd[None, :])
            tl.debug_barrier()
            if complete:
                tl.store(w1_ptr + rd[:, None] * M + cols[None, :], w1 - tau_last * s1)
                tl.store(w1_ptr + D * M + cols, b1 - tau_last * s1_b)
                tl.store(w2_ptr + cols[:, None] * D + rd[None, :], w2 - tau_last * s2)
            if last:
                if complete:
                    s1 = tl.zeros((D, MT), tl.float32)
                    s1_b = tl.zeros((MT,), tl.float32)
                    s2 = tl.zeros((MT, D), tl.float32)
                tl.store(s1_ptr + rd[:, None] * M + cols[None, :], s1)
                tl.store(s1_ptr + D * M + cols, s1_b)
                tl.store(s2_ptr + cols[:, None] * D + rd[None, :], s2)
        # the second layer's bias row and the queries' outputs
        s2_b = tl.zeros((D,), tl.float32)
        if carried:
            s2_b = tl.load(s2_ptr + M * D + rd)
        if with_prior:
            z2_bar -= tau[:, None] * s2_b[None, :]
        rj = tl.arange(0, BB)
        eta2 = tl.where(rj[:, None] >= rj[None, :], tau[:, None] * (x2_dots + 1.0), 0.0)
        z2_bar -= dot(eta2, grad2)
        x_hat, _ = normalize(z2_bar, eps, D)
        tl.store(out_ptr + t[:, None] * stride_out_t + rd[None, :], q + x_hat * gamma[None, :] + beta[None, :],
                 mask=real[:, None])
        s2_b += tl.sum(grad2, axis=0)
        tl.debug_barrier()  # every thread has read b2 and the bias sums before any writes them
        if complete:
            tl.store(w2_ptr + M * D + rd, b2 - tau_last * s2_b)
        if last:
            if complete:
                s2_b = tl.zeros((D,), tl.float32)
            tl.store(s2_ptr + M * D + rd, s2_b)
        tl.debug_barrier()  # the next mini-batch reads the weights this one wrote
