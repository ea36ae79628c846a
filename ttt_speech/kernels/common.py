"""Triton building blocks shared by the TTT kernels: the slots of a mini-batch, RoPE, LayerNorm,
the LN-fused L2 gradient and their backwards. Each mirrors a function of `ttt_speech.ops` (named
in its docstring), on one program's tiles: BB slots (the mini-batch b padded to a power of two
≥ 16, for `tl.dot`) by D channels (the head dim).

All matmuls are full fp32 (`input_precision="ieee"`): on a GPU, fp32 `tl.dot` would otherwise
round its inputs to TF32 (10-bit mantissa), about 1e-3 relative, which the fast weights would
accumulate over thousands of mini-batches.
"""
import triton
import triton.language as tl


@triton.jit
def dot(a, b):
    """a @ b in full fp32 (see the module docstring)."""
    return tl.dot(a, b, input_precision="ieee")


@triton.jit
def program_row(offset_ptr, active_ptr, gamma_ptr, beta_ptr, tau_offset_ptr, H, bsz, BB: tl.constexpr,
                D: tl.constexpr, HAS_ACTIVE: tl.constexpr):
    """What one program (a batch row's head) reads first: (pid, row, head, the row's offset, whether
    it is active, the inner LayerNorm's γ, β [D], τ [BB], τ_b, where τ's relu passes [BB])."""
    pid = tl.program_id(0).to(tl.int64)  # offsets of B·H programs' state reach past 2^31 at Moshi-7B's width
    row, head = pid // H, pid % H
    active = True
    if HAS_ACTIVE:
        active = tl.load(active_ptr + row) != 0
    rd = tl.arange(0, D)
    tau, tau_passes = tau_scale(tau_offset_ptr, bsz, BB)
    tau_last = tl.sum(tl.where(tl.arange(0, BB) == bsz - 1, tau, 0.0), axis=0)
    return (pid, row, head, tl.load(offset_ptr + row).to(tl.int32), active, tl.load(gamma_ptr + head * D + rd),
            tl.load(beta_ptr + head * D + rd), tau, tau_last, tau_passes)


@triton.jit
def slots(m, offset, T, bsz, BB: tl.constexpr):
    """Mini-batch m of a row whose chunk starts at in-mini-batch offset `offset` (`ops.scan`'s grid):
    the token index t [BB] of each slot j and whether it is a real token of this chunk.
    Slots before the offset stand for tokens of earlier calls (their sums are carried), slots past
    the chunk or past b are padding."""
    j = tl.arange(0, BB)
    t = m * bsz + j - offset
    return t, (j < bsz) & (t >= 0) & (t < T)


@triton.jit
def tau_scale(tau_offset_ptr, bsz, BB: tl.constexpr):
    """τ_j = max(0, 1/j + a_j) for slots j = 1..b, 0 on padding (`ops.inner_lr.position_scale`).
    Also returns whether the relu passes (for the backward)."""
    j = tl.arange(0, BB)
    pre = 1.0 / (j + 1).to(tl.float32) + tl.load(tau_offset_ptr + j, mask=j < bsz, other=0.0)
    return tl.where((j < bsz) & (pre > 0), pre, 0.0), (j < bsz) & (pre > 0)


@triton.jit
def rope_angles(log2_theta, first_pair, BB: tl.constexpr, P: tl.constexpr, D: tl.constexpr):
    """cos, sin [BB, P] of slot j's rotation of channel pairs first_pair..first_pair+P−1 of a head of D
    channels (`ops.rope.rope_interleaved`: positions are the slot inside the mini-batch, pair i turns
    by j·θ^(−2i/D))."""
    pair = (first_pair + tl.arange(0, P)).to(tl.float32)
    inv_freq = tl.exp2(-(2.0 * pair / D) * log2_theta)
    angle = tl.arange(0, BB).to(tl.float32)[:, None] * inv_freq[None, :]
    return tl.cos(angle), tl.sin(angle)


@triton.jit
def rope(x, cos, sin, BB: tl.constexpr, W: tl.constexpr):
    """Rotate the interleaved pairs (2i, 2i+1) of x [BB, W] (W channels) by the angles of `rope_angles`."""
    even, odd = tl.split(tl.reshape(x, (BB, W // 2, 2)))
    return tl.reshape(tl.join(even * cos - odd * sin, even * sin + odd * cos), (BB, W))


@triton.jit
def rope_backward(dy, cos, sin, BB: tl.constexpr, W: tl.constexpr):
    """The gradient through `rope`: the inverse rotation of dy [BB, W]."""
    even, odd = tl.split(tl.reshape(dy, (BB, W // 2, 2)))
    return tl.reshape(tl.join(even * cos + odd * sin, odd * cos - even * sin), (BB, W))


@triton.jit
def normalize(z, eps, D: tl.constexpr):
    """LayerNorm statistics over the last dim of z [BB, D] (biased variance): x̂, σ⁻¹ [BB, 1]."""
    centered = z - tl.sum(z, axis=1)[:, None] / D
    rstd = 1.0 / tl.sqrt(tl.sum(centered * centered, axis=1)[:, None] / D + eps)
    return centered * rstd, rstd


@triton.jit
def normalize_backward(dx_hat, x_hat, rstd, D: tl.constexpr):
    """∂/∂z of LayerNorm's x̂ given ∂/∂x̂ (no affine): σ⁻¹·(ḡ − mean(ḡ) − x̂·mean(ḡ·x̂))."""
    mean = tl.sum(dx_hat, axis=1)[:, None] / D
    mean_x = tl.sum(dx_hat * x_hat, axis=1)[:, None] / D
    return (dx_hat - mean - x_hat * mean_x) * rstd


@triton.jit
def l2_grad(z, target, gamma, lam, eps, D: tl.constexpr):
    """λ·∇_z ½‖LN(z)·γ + β − target‖², with target = (β − (v − k))·γ already shifted
    (`ops.layer_norm.scaled_l2_grad`). z, target [BB, D]; gamma [D]; lam [BB].
    Returns it with what its backward needs: (grad, x̂, σ⁻¹, g, h, mean(g·x̂))."""
    x_hat, rstd = normalize(z, eps, D)
    g = x_hat * (gamma * gamma)[None, :] + target
    m = tl.sum(g * x_hat, axis=1)[:, None] / D
    h = g - tl.sum(g, axis=1)[:, None] / D - x_hat * m
    return h * (rstd * lam[:, None]), x_hat, rstd, g, h, m


@triton.jit
def l2_grad_backward(dgrad, x_hat, rstd, g, h, m, gamma, lam, D: tl.constexpr):
    """The backward of `l2_grad` (as `_ScaledL2Grad.backward`): given ∂/∂grad [BB, D], returns
    (∂/∂z [BB, D], ∂/∂target [BB, D], ∂/∂(γ²) summed over slots [D], ∂/∂λ [BB])."""
    a = rstd * lam[:, None]  # [BB, 1]
    grad_a = tl.sum(dgrad * h, axis=1)[:, None]
    grad_h = dgrad * a
    mean_hx = tl.sum(grad_h * x_hat, axis=1)[:, None] / D
    grad_g = grad_h - tl.sum(grad_h, axis=1)[:, None] / D - x_hat * mean_hx  # L(a·ȳ)
    grad_x_hat = grad_g * (gamma * gamma)[None, :] - grad_h * m - g * mean_hx
    coef = (tl.sum(grad_x_hat * x_hat, axis=1)[:, None] + grad_a * a) / D
    dz = (grad_x_hat - tl.sum(grad_x_hat, axis=1)[:, None] / D - x_hat * coef) * rstd
    return dz, grad_g, tl.sum(grad_g * x_hat, axis=0), tl.sum(grad_a * rstd, axis=1)


@triton.jit
def causal(a, b, tau, BB: tl.constexpr):
    """η ⊙ ([a_i 1]·[b_j 1]) for j ≤ i, 0 above: τ_i(a_i·b_j + 1) [BB, BB] (`inner_models.prepare`)."""
    j = tl.arange(0, BB)
    return tl.where(j[:, None] >= j[None, :], tau[:, None] * (dot(a, tl.trans(b)) + 1.0), 0.0)
