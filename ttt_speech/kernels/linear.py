"""TTT-Linear as two Triton kernels: the scan over a chunk's mini-batches (forward) and its reverse
(backward), one program per (batch row, head).

The math is `ops.inner_models.linear_step` / `linear_outputs` with the chunk layout of `ops.scan`
(every row from its own offset, read on the device: no host sync, so CUDA graphs can capture it),
plus what `TTTLayer.forward` does around the scan: RoPE on q, k and the inner residual + LayerNorm
of the output, q + LN(z̄)·γ + β. Per mini-batch, with [k 1], [q 1] the keys / queries and S the
λ-weighted gradient sums carried in from an earlier call (only the first mini-batch of a chunk can
have them, and a row whose updates are masked off keeps them):

    Z = k·W + b;  G = λ ⊙ ∇_Z ½‖LN(Z)γ + β − (v − k)‖²           (l2_grad)
    z̄ = q·W + b − τ ⊙ ([q 1]·S) − tril(τ_i([q_i 1]·[k_j 1]))·G     (the causal dual form)
    S ← S + [k 1]ᵀ·G;  if the mini-batch's last slot is a real token: [W; b] ← [W; b] − τ_b·S, S ← 0

Everything of size [slots, D] lives in registers; the [D+1, D] matrices (the fast weights, the
sums, their gradients) stay in memory (the state's buffers, L2-resident) and pass through the
program in tiles of KT rows, read for the products and written back when they change. Held in
registers instead, a stepped [128, 128] fp32 matrix made ptxas spill 9–11 KB per thread.

Training saves [W; b] every `ckpt_every` mini-batches; the backward rebuilds each group's weights
from its checkpoint (scratch memory of one group per program), then runs the group in reverse.
Gradients that sum over rows (τ, γ, β) are written per program and summed by the caller, so the
result does not depend on the order programs run in (no atomics: training resumes bit for bit).
"""
import triton
import triton.language as tl

from .common import causal, dot, l2_grad, l2_grad_backward, normalize, normalize_backward, program_row, rope, \
    rope_angles, rope_backward, slots


@triton.jit
def load_rows(ptr, c, KT: tl.constexpr, D: tl.constexpr):
    """Rows c·KT … c·KT + KT − 1 of a row-major [·, D] matrix at ptr → [KT, D]."""
    r = c * KT + tl.arange(0, KT)
    return tl.load(ptr + r[:, None] * D + tl.arange(0, D)[None, :])


@triton.jit
def store_rows(ptr, c, x, KT: tl.constexpr, D: tl.constexpr):
    r = c * KT + tl.arange(0, KT)
    tl.store(ptr + r[:, None] * D + tl.arange(0, D)[None, :], x)


@triton.jit
def token_cols(ptr, stride_t, t, real, col, log2_theta, BB: tl.constexpr, W: tl.constexpr, D: tl.constexpr):
    """Channels col … col + W − 1 of a head's q or k (ptr: its channel 0 of token 0) at one
    mini-batch's slots, RoPE applied → [BB, W], zero on slots without a token."""
    x = tl.load(ptr + t[:, None] * stride_t + col + tl.arange(0, W)[None, :], mask=real[:, None], other=0.0)
    cos, sin = rope_angles(log2_theta, col // 2, BB, W // 2, D)
    return rope(x, cos, sin, BB, W)


@triton.jit
def minibatch_tokens(q_ptr, stride_t, lr_ptr, stride_lr_t, t, real, C, log2_theta, BB: tl.constexpr,
                     D: tl.constexpr):
    """q, k (RoPE applied), v [BB, D] and λ [BB] of one mini-batch's slots, zero where no token
    (q_ptr: the head's channel 0 of q at token 0 in the projection [T, 3C])."""
    v = tl.load(q_ptr + 2 * C + t[:, None] * stride_t + tl.arange(0, D)[None, :], mask=real[:, None], other=0.0)
    return (token_cols(q_ptr, stride_t, t, real, 0, log2_theta, BB, D, D),
            token_cols(q_ptr + C, stride_t, t, real, 0, log2_theta, BB, D, D), v,
            tl.load(lr_ptr + t * stride_lr_t, mask=real, other=0.0))


@triton.jit
def through_weights(w_ptr, s_ptr, q_ptr, stride_t, t, real, C, log2_theta, with_prior, BB: tl.constexpr,
                    KT: tl.constexpr, D: tl.constexpr):
    """A mini-batch's keys and queries through [W; b] at w_ptr, tile by tile of W's rows → (Z = [k 1]·[W; b],
    P = [q 1]·[W; b], and [q 1]·S0 with the sums S0 at s_ptr where with_prior, else zero) [BB, D] each,
    and the bias row b [D] read on the way."""
    z = tl.zeros((BB, D), tl.float32)
    p = tl.zeros((BB, D), tl.float32)
    q_s0 = tl.zeros((BB, D), tl.float32)
    for c in range(0, D // KT):
        w = load_rows(w_ptr, c, KT, D)
        q_c = token_cols(q_ptr, stride_t, t, real, c * KT, log2_theta, BB, KT, D)
        z += dot(token_cols(q_ptr + C, stride_t, t, real, c * KT, log2_theta, BB, KT, D), w)
        p += dot(q_c, w)
        if with_prior:
            q_s0 += dot(q_c, load_rows(s_ptr, c, KT, D))
    b = tl.load(w_ptr + D * D + tl.arange(0, D))
    if with_prior:
        q_s0 += tl.load(s_ptr + D * D + tl.arange(0, D))[None, :]
    return z + b[None, :], p + b[None, :], q_s0, b


@triton.jit
def linear_forward_kernel(
    qkv_ptr, stride_qkv_b, stride_qkv_t,  # [B, T, 3C] fp32: [q | k | v], each [H, D] per token
    lr_ptr, stride_lr_b, stride_lr_h, stride_lr_t,  # λ [B, H, T] (0 where a row is inactive)
    out_ptr, stride_out_b, stride_out_t,  # q + LN(z̄)·γ + β [B, T, C]
    tau_offset_ptr, gamma_ptr, beta_ptr,  # [b], [H, D], [H, D]
    w_in_ptr, stride_w_b, stride_w_h,  # [W; b] [B, H, D+1, D] at the chunk start (stride_w_b may be 0)
    s_in_ptr, stride_s_b, stride_s_h,  # the carried sums, alike
    w_out_ptr, s_out_ptr,  # the state after the chunk [B, H, D+1, D], contiguous (may be the inputs)
    ckpt_ptr, ckpt_every, n_ckpt,  # SAVE: [B·H, n_ckpt, D+1, D], [W; b] at mini-batches 0, G, 2G, …
    offset_ptr, active_ptr,  # [B] int64, [B] bool (HAS_ACTIVE)
    T, H, C, bsz, log2_theta, eps,
    D: tl.constexpr, BB: tl.constexpr, KT: tl.constexpr, HAS_ACTIVE: tl.constexpr, SAVE: tl.constexpr,
):
    pid, row, head, offset, active, gamma, beta, tau, tau_last, tau_passes = program_row(
        offset_ptr, active_ptr, gamma_ptr, beta_ptr, tau_offset_ptr, H, bsz, BB, D, HAS_ACTIVE)
    rd = tl.arange(0, D)
    w_in_ptr += row * stride_w_b + head * stride_w_h
    s_in_ptr += row * stride_s_b + head * stride_s_h
    w_out_ptr += pid * (D + 1) * D
    s_out_ptr += pid * (D + 1) * D
    q_ptr = qkv_ptr + row * stride_qkv_b + head * D
    lr_ptr += row * stride_lr_b + head * stride_lr_h
    out_ptr += row * stride_out_b + head * D
    n_mb = (offset + T + bsz - 1) // bsz
    for m in range(0, n_mb):
        w_ptr = w_out_ptr  # [W; b] at this mini-batch's start: the input's for the first
        if m == 0:
            w_ptr = w_in_ptr
        save = False
        if SAVE:
            save = m % ckpt_every == 0
        ckpt = ckpt_ptr + (pid * n_ckpt + m // ckpt_every) * (D + 1) * D
        carried = (m == 0) | (not active)  # starts from the sums carried in (else from zero)
        t, real = slots(m, offset, T, bsz, BB)
        q, k, v, lam = minibatch_tokens(q_ptr, stride_qkv_t, lr_ptr, stride_lr_t, t, real, C, log2_theta, BB, D)
        # 1. keys and queries through [W; b] (the first mini-batch's queries through the carried sums too)
        z, p, q_s0, b = through_weights(w_ptr, s_in_ptr, q_ptr, stride_qkv_t, t, real, C, log2_theta, m == 0,
                                        BB, KT, D)
        if save:
            for c in range(0, D // KT):
                store_rows(ckpt, c, load_rows(w_ptr, c, KT, D), KT, D)
            tl.store(ckpt + D * D + rd, b)
        s0_b = tl.zeros((D,), tl.float32)
        if carried:
            s0_b = tl.load(s_in_ptr + D * D + rd)
        grad = l2_grad(z, (beta[None, :] - v + k) * gamma[None, :], gamma, lam, eps, D)[0]
        z_bar = p - tau[:, None] * q_s0 - dot(causal(q, k, tau, BB), grad)
        x_hat = normalize(z_bar, eps, D)[0]
        tl.store(out_ptr + t[:, None] * stride_out_t + rd[None, :], q + x_hat * gamma[None, :] + beta[None, :],
                 mask=real[:, None])
        # 2. the sums S' = S0 + [k 1]ᵀG and the step, tile by tile
        complete = (m * bsz + bsz - 1 - offset < T) & active
        last = m == n_mb - 1
        tl.debug_barrier()  # 1.'s reads of W and S are done before any thread writes them (in place)
        for c in range(0, D // KT):
            s = dot(tl.trans(token_cols(q_ptr + C, stride_qkv_t, t, real, c * KT, log2_theta, BB, KT, D)), grad)
            if carried:
                s += load_rows(s_in_ptr, c, KT, D)
            w = load_rows(w_ptr, c, KT, D)
            if complete:
                w -= tau_last * s
            tl.debug_barrier()
            store_rows(w_out_ptr, c, w, KT, D)
            if last:
                if complete:
                    s = tl.zeros((KT, D), tl.float32)
                store_rows(s_out_ptr, c, s, KT, D)
        s_b = s0_b + tl.sum(grad, axis=0)
        if complete:
            b -= tau_last * s_b
            s_b = tl.zeros((D,), tl.float32)
        tl.store(w_out_ptr + D * D + rd, b)
        if last:
            tl.store(s_out_ptr + D * D + rd, s_b)
        tl.debug_barrier()  # the next mini-batch reads what this one wrote


@triton.jit
def linear_backward_kernel(
    qkv_ptr, stride_qkv_b, stride_qkv_t,
    lr_ptr, stride_lr_b, stride_lr_h, stride_lr_t,
    dout_ptr, stride_dout_b, stride_dout_t,  # ∂/∂out [B, T, C]
    tau_offset_ptr, gamma_ptr, beta_ptr,
    s_in_ptr, stride_s_b, stride_s_h,
    dw_out_ptr, ds_out_ptr,  # ∂/∂ the state after the chunk [B, H, D+1, D] contiguous (HAS_DSTATE)
    ckpt_ptr, ckpt_every, n_ckpt,  # the forward's checkpoints
    scratch_ptr, acc_ptr,  # per program: [G, D+1, D] (a group's weights), [2, BB, D] (dq, dk columns)
    offset_ptr, active_ptr,
    dqkv_ptr, dlr_ptr,  # ∂/∂qkv [B, T, 3C], ∂/∂λ [B, H, T], contiguous
    dw_ptr, ds_in_ptr,  # ∂/∂ the state before the chunk [B·H, D+1, D]; dw_ptr accumulates dW on the way
    dtau_ptr, dgamma_ptr, dbeta_ptr,  # per program: ∂/∂tau_offset [B·H, BB], ∂/∂γ, ∂/∂β [B·H, D]
    T, H, C, bsz, log2_theta, eps,
    D: tl.constexpr, BB: tl.constexpr, KT: tl.constexpr, HAS_ACTIVE: tl.constexpr, HAS_DSTATE: tl.constexpr,
):
    pid, row, head, offset, active, gamma, beta, tau, tau_last, tau_passes = program_row(
        offset_ptr, active_ptr, gamma_ptr, beta_ptr, tau_offset_ptr, H, bsz, BB, D, HAS_ACTIVE)
    rd, rj, rt = tl.arange(0, D), tl.arange(0, BB), tl.arange(0, KT)
    s_in_ptr += row * stride_s_b + head * stride_s_h
    q_ptr = qkv_ptr + row * stride_qkv_b + head * D
    dq_ptr = dqkv_ptr + row * T * 3 * C + head * D
    lr_ptr += row * stride_lr_b + head * stride_lr_h
    dlr_ptr += (row * H + head) * T
    dout_ptr += row * stride_dout_b + head * D
    dw_ptr += pid * (D + 1) * D
    dw_out_ptr += pid * (D + 1) * D
    ds_out_ptr += pid * (D + 1) * D
    ds_in_ptr += pid * (D + 1) * D
    scratch_ptr += pid * ckpt_every * (D + 1) * D
    acc_ptr += pid * 2 * BB * D
    # dw_ptr holds ∂/∂[W] at the end of the mini-batch being reversed (db: its bias row), from
    # ∂/∂ the final weights (or zero) back to the chunk's start.
    db = tl.zeros((D,), tl.float32)
    for c in range(0, D // KT):
        dw = tl.zeros((KT, D), tl.float32)
        if HAS_DSTATE:
            dw = load_rows(dw_out_ptr, c, KT, D)
        store_rows(dw_ptr, c, dw, KT, D)
    if HAS_DSTATE:
        db = tl.load(dw_out_ptr + D * D + rd)
    tl.debug_barrier()  # the first mini-batch reversed reads dw_ptr, maybe in other threads
    dtau = tl.zeros((BB,), tl.float32)
    dgamma = tl.zeros((D,), tl.float32)
    dbeta = tl.zeros((D,), tl.float32)
    n_mb = (offset + T + bsz - 1) // bsz
    n_groups = (n_mb + ckpt_every - 1) // ckpt_every
    for group_back in range(0, n_groups):
        group = n_groups - 1 - group_back
        first = group * ckpt_every
        last = tl.minimum(first + ckpt_every, n_mb) - 1
        ckpt = ckpt_ptr + (pid * n_ckpt + group) * (D + 1) * D
        # 1. the weights at the start of each mini-batch of the group, rebuilt from its checkpoint:
        #    scratch slot i holds mini-batch first + i's (slot 0 unused: the checkpoint itself)
        for m in range(first, last):
            src = scratch_ptr + (m - first) * (D + 1) * D
            if m == first:
                src = ckpt
            dst = scratch_ptr + (m + 1 - first) * (D + 1) * D
            t, real = slots(m, offset, T, bsz, BB)
            k = token_cols(q_ptr + C, stride_qkv_t, t, real, 0, log2_theta, BB, D, D)
            v = tl.load(q_ptr + 2 * C + t[:, None] * stride_qkv_t + rd[None, :], mask=real[:, None], other=0.0)
            lam = tl.load(lr_ptr + t * stride_lr_t, mask=real, other=0.0)
            z = tl.zeros((BB, D), tl.float32)
            for c in range(0, D // KT):
                z += dot(token_cols(q_ptr + C, stride_qkv_t, t, real, c * KT, log2_theta, BB, KT, D),
                         load_rows(src, c, KT, D))
            b = tl.load(src + D * D + rd)
            grad = l2_grad(z + b[None, :], (beta[None, :] - v + k) * gamma[None, :], gamma, lam, eps, D)[0]
            # every mini-batch before a chunk's last completes; a masked-off row never steps
            for c in range(0, D // KT):
                w = load_rows(src, c, KT, D)
                if active:
                    s = dot(tl.trans(token_cols(q_ptr + C, stride_qkv_t, t, real, c * KT, log2_theta, BB, KT, D)),
                            grad)
                    if m == 0:
                        s += load_rows(s_in_ptr, c, KT, D)
                    w -= tau_last * s
                store_rows(dst, c, w, KT, D)
            if active:
                s_b = tl.sum(grad, axis=0)
                if m == 0:
                    s_b += tl.load(s_in_ptr + D * D + rd)
                b -= tau_last * s_b
            tl.store(dst + D * D + rd, b)
            tl.debug_barrier()  # the next mini-batch reads what this one wrote
        # 2. the group's mini-batches in reverse
        for m_back in range(0, last + 1 - first):
            m = last - m_back
            w_ptr = scratch_ptr + (m - first) * (D + 1) * D
            if m == first:
                w_ptr = ckpt
            t, real = slots(m, offset, T, bsz, BB)
            q, k, v, lam = minibatch_tokens(q_ptr, stride_qkv_t, lr_ptr, stride_lr_t, t, real, C, log2_theta, BB, D)
            complete = (m * bsz + bsz - 1 - offset < T) & active
            # the forward of this mini-batch again
            z, p, q_s0, _b = through_weights(w_ptr, s_in_ptr, q_ptr, stride_qkv_t, t, real, C, log2_theta,
                                             m == 0, BB, KT, D)
            s0_b = tl.zeros((D,), tl.float32)
            if m == 0:
                s0_b = tl.load(s_in_ptr + D * D + rd)
            target = (beta[None, :] - v + k) * gamma[None, :]
            grad, x_hat, rstd, g, h, mg = l2_grad(z, target, gamma, lam, eps, D)
            qk = dot(q, tl.trans(k)) + 1.0
            eta = tl.where(rj[:, None] >= rj[None, :], tau[:, None] * qk, 0.0)
            z_bar = p - tau[:, None] * q_s0 - dot(eta, grad)
            x_hat2, rstd2 = normalize(z_bar, eps, D)
            # out = q + x̂2·γ + β
            dout = tl.load(dout_ptr + t[:, None] * stride_dout_t + rd[None, :], mask=real[:, None], other=0.0)
            dbeta += tl.sum(dout, axis=0)
            dgamma += tl.sum(dout * x_hat2, axis=0)
            dz_bar = normalize_backward(dout * gamma[None, :], x_hat2, rstd2, D)
            # z̄ = q·W + b − τ ⊙ ([q 1]·S0) − η·G, η = tril(τ_i([q_i 1]·[k_j 1]))
            deta = -tl.where(rj[:, None] >= rj[None, :], dot(dz_bar, tl.trans(grad)), 0.0)
            dtau += tl.sum(deta * qk, axis=1) - tl.sum(dz_bar * q_s0, axis=1)
            dq = dout + dot(deta * tau[:, None], k)
            dk = dot(tl.trans(deta * tau[:, None]), q)
            dprior = -tau[:, None] * dz_bar  # ∂/∂([q 1]·S0), first mini-batch only
            # B. X: ∂/∂[W; b] after this mini-batch (complete: the step −τ_b·S' makes ∂/∂S' = −τ_b·X)
            #    or ∂/∂ the sums after the chunk (which this one's are, plus nothing)
            k_x = tl.zeros((BB, D), tl.float32)
            x_b = tl.zeros((D,), tl.float32)
            dtau_last = 0.0
            if complete:
                x_b = db
            elif HAS_DSTATE:
                x_b = tl.load(ds_out_ptr + D * D + rd)
            for c in range(0, D // KT):
                x = tl.zeros((KT, D), tl.float32)
                if complete:
                    x = load_rows(dw_ptr, c, KT, D)
                    if m == 0:
                        dtau_last -= tl.sum(tl.sum(x * load_rows(s_in_ptr, c, KT, D), axis=1), axis=0)
                elif HAS_DSTATE:
                    x = load_rows(ds_out_ptr, c, KT, D)
                k_x += dot(token_cols(q_ptr + C, stride_qkv_t, t, real, c * KT, log2_theta, BB, KT, D), x)
                if m == 0:  # ∂/∂ the sums carried into the chunk
                    ds = dot(tl.trans(token_cols(q_ptr, stride_qkv_t, t, real, c * KT, log2_theta, BB, KT, D)),
                             dprior)
                    if complete:
                        ds -= tau_last * x
                    else:
                        ds += x
                    store_rows(ds_in_ptr, c, ds, KT, D)
            if complete:
                dtau_last -= (tl.sum(tl.sum(k_x * grad, axis=1), axis=0) + tl.sum(x_b * tl.sum(grad, axis=0), axis=0)
                              + tl.sum(x_b * s0_b, axis=0))
                dtau += tl.where(rj == bsz - 1, dtau_last, 0.0)
                k_x = -tau_last * (k_x + x_b[None, :])  # ∂/∂G through S' = S0 + [k 1]ᵀG
            else:
                k_x += x_b[None, :]
            if m == 0:
                ds_b = tl.sum(dprior, axis=0)
                if complete:
                    ds_b -= tau_last * x_b
                else:
                    ds_b += x_b
                tl.store(ds_in_ptr + D * D + rd, ds_b)
            # G = l2_grad(Z = k·W + b, target = (β − v + k)·γ, γ, λ)
            dgrad = k_x - dot(tl.trans(eta), dz_bar)
            dz, dtarget, dgamma_sq, dlam = l2_grad_backward(dgrad, x_hat, rstd, g, h, mg, gamma, lam, D)
            dgamma += 2.0 * gamma * dgamma_sq + tl.sum(dtarget * (beta[None, :] - v + k), axis=0)
            dbeta += tl.sum(dtarget, axis=0) * gamma
            dk += dtarget * gamma[None, :]
            # C. the products with Wᵀ (and S0ᵀ, Xᵀ), column tiles of dq and dk, and
            #    ∂/∂[W; b] at this mini-batch's start: X + [q 1]ᵀ·∂z̄ + [k 1]ᵀ·∂Z
            tl.debug_barrier()  # B.'s reads of dw_ptr are done before C. writes it
            for c in range(0, D // KT):
                w = load_rows(w_ptr, c, KT, D)
                q_c = token_cols(q_ptr, stride_qkv_t, t, real, c * KT, log2_theta, BB, KT, D)
                k_c = token_cols(q_ptr + C, stride_qkv_t, t, real, c * KT, log2_theta, BB, KT, D)
                dq_c = dot(dz_bar, tl.trans(w))
                dk_c = dot(dz, tl.trans(w))
                dw = load_rows(dw_ptr, c, KT, D)
                if complete:
                    dk_c -= tau_last * dot(grad, tl.trans(dw))
                elif HAS_DSTATE:
                    dk_c += dot(grad, tl.trans(load_rows(ds_out_ptr, c, KT, D)))
                if m == 0:
                    dq_c += dot(dprior, tl.trans(load_rows(s_in_ptr, c, KT, D)))
                dw += dot(tl.trans(q_c), dz_bar) + dot(tl.trans(k_c), dz)
                tl.store(acc_ptr + rj[:, None] * D + c * KT + rt[None, :], dq_c)
                tl.store(acc_ptr + BB * D + rj[:, None] * D + c * KT + rt[None, :], dk_c)
                tl.debug_barrier()
                store_rows(dw_ptr, c, dw, KT, D)
            db += tl.sum(dz_bar, axis=0) + tl.sum(dz, axis=0)
            tl.debug_barrier()  # the column tiles of every thread are in acc
            dq += tl.load(acc_ptr + rj[:, None] * D + rd[None, :])
            dk += tl.load(acc_ptr + BB * D + rj[:, None] * D + rd[None, :])
            cos, sin = rope_angles(log2_theta, 0, BB, D // 2, D)
            ptrs = dq_ptr + t[:, None] * 3 * C + rd[None, :]
            mask = real[:, None]
            tl.store(ptrs, rope_backward(dq, cos, sin, BB, D), mask=mask)
            tl.store(ptrs + C, rope_backward(dk, cos, sin, BB, D), mask=mask)
            tl.store(ptrs + 2 * C, -dtarget * gamma[None, :], mask=mask)
            tl.store(dlr_ptr + t, dlam, mask=real)
            tl.debug_barrier()  # acc is reused by the next mini-batch
    tl.store(dw_ptr + D * D + rd, db)
    tl.store(dtau_ptr + pid * BB + rj, tl.where(tau_passes, dtau, 0.0))
    tl.store(dgamma_ptr + pid * D + rd, dgamma)
    tl.store(dbeta_ptr + pid * D + rd, dbeta)
