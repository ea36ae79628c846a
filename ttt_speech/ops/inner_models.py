"""TTT mini-batches in the dual form, for the two inner models (TTT-Linear, TTT-MLP).

Notation (per head): q, k [b, d] queries / keys of the mini-batch, target = v − k, λ_j the token
learning rates, τ_i the position scales, W0/b0 the fast weights at the mini-batch start and
A/a the λ-weighted gradient sums of tokens of this mini-batch seen in earlier chunks
(zero unless the mini-batch was started by a previous call: that is what makes streaming exact).

Every gradient g_j is taken at W0. Token i sees W_i = W0 − τ_i (A + Σ_{j≤i} λ_j k_jᵀ g_j)
(same for b), evaluated without materialising W_i through a causal [b, b] matrix. When the
mini-batch is complete, W ← W0 − τ_b (A + Σ_j λ_j k_jᵀ g_j) and the sums restart at zero.

Each inner model is split in two (`InnerModel`): `step` is the part the next mini-batch depends
on (the gradients at W0 and the update), run in the sequential scan; `outputs` is the dual-form
output, which only needs each mini-batch's W0 and λg, and runs once for all mini-batches.
Everything that does not depend on the fast weights is computed once beforehand (`prepare`).

Layout: batch rows and heads are folded into R = B·H rows, and every fast layer is one tensor
[W; b] [R, i+1, o] (the bias as an extra input row), fed inputs with a trailing 1:
x·W + b = [x 1]·[W; b], so the bias needs no separate matmul, sum or update.
"""
from typing import Callable, NamedTuple

import torch
from torch import Tensor
from torch.nn import functional as F

from .activations import gelu_tanh, gelu_tanh_grad
from .layer_norm import scaled_l2_grad


class MiniBatch(NamedTuple):
    """Inputs of one mini-batch of b slots (padding slots have lr = 0). `prepare` makes them for
    all N mini-batches at once, with a leading dim N on every tensor."""

    q: Tensor  # [R, b, d+1]  [q 1]
    k: Tensor  # [R, b, d+1]  [k 1]
    causal: Tensor  # [R, b, b]  η_ij ([q_i 1]·[k_j 1]) for j ≤ i, 0 above: the first layer's dual matrix
    k_step: Tensor  # [R, d+1, b]  −τ_b·[k 1]ᵀ: the first layer's end-of-mini-batch step
    target: Tensor  # [R, b, d]  (β − (v − k))·γ, the shifted reconstruction target
    lr: Tensor  # [R, b, 1]  λ_j, zero on padding
    complete: Tensor | bool  # [R] bool, or one bool for all rows: the last slot is a real token → update W


class InnerNorm(NamedTuple):
    weight_sq: Tensor  # [R, 1, d]  γ²
    eps: float


def prepare(q: Tensor, k: Tensor, v: Tensor, lr: Tensor, complete: Tensor, tau: Tensor,
            weight: Tensor, bias: Tensor) -> MiniBatch:
    """The weight-independent inputs of N mini-batches, at once.

    q, k, v [N, R, b, d]; lr [N, R, b]; complete [N, R]; tau [b];
    weight, bias [R, 1, d] (the inner LayerNorm's γ, β per row). Returns a MiniBatch with a
    leading dim N on every field.
    """
    q1, k1 = ones_column(q), ones_column(k)
    causal = eta_matrix(tau) * (q1 @ k1.transpose(-1, -2))
    target = (bias - (v - k)) * weight
    return MiniBatch(q1, k1, causal, (-tau[-1] * k1).transpose(-1, -2), target, lr[..., None], complete)


def eta_matrix(tau: Tensor) -> Tensor:
    """η's position part: τ_i for j ≤ i, 0 above the diagonal. tau [b] → [b, b]."""
    return torch.tril(tau[:, None].expand(-1, tau.shape[0]))


def ones_column(x: Tensor) -> Tensor:
    """[x 1]: append the bias input. [..., i] → [..., i+1]."""
    return F.pad(x, (0, 1), value=1.0)


def dual_output(x_bar: Tensor, wb: Tensor, causal: Tensor, lr_g: Tensor, tau: Tensor,
                prior: Tensor | None) -> Tensor:
    """Outputs x̄_i·W_i + b_i of one fast layer for every slot i of n mini-batches (rows n·R).

    x_bar [n·R,b,i+1] = [x̄ 1]; wb [n·R,i+1,o] = [W0; b0] of each mini-batch; causal [n·R,b,b]
    η_ij ([x̄_i 1]·[x_j 1]); lr_g [n·R,b,o] = λ_j g_j; tau [b]; prior [R,i+1,o] the sums [A; a]
    carried into the first of these mini-batches, None when they are known to be zero.
    """
    out = torch.baddbmm(torch.bmm(x_bar, wb), causal, lr_g, alpha=-1)
    if prior is None:
        return out
    R = prior.shape[0]
    first = out[:R] - tau[:, None] * torch.bmm(x_bar[:R], prior)
    return torch.cat((first, out[R:]))


def advance(wb: Tensor, sums: Tensor, x: Tensor, lr_g: Tensor, tau_last: Tensor, complete: Tensor | bool,
            with_prior: bool, x_step: Tensor) -> tuple[Tensor, Tensor]:
    """Add this mini-batch's λ-weighted gradients [x 1]ᵀ·(λg) to the sums; step [W; b] where complete.

    wb, sums [R,i+1,o]; x [R,b,i+1] = [x 1]; lr_g [R,b,o]; complete: [R] bool, or one bool;
    x_step [R,i+1,b] = −τ_b·[x 1]ᵀ (negated: baddbmm's alpha = −1 would cost two multiplies in backward).
    A mini-batch complete for every row, other than the first of a chunk, starts from zero sums
    (a row with pending sums has no real token after them in this chunk), hence the short path.
    """
    if complete is True and not with_prior:
        return torch.baddbmm(wb, x_step, lr_g), sums
    sums = torch.baddbmm(sums, x.transpose(1, 2), lr_g)
    if complete is False:
        return wb, sums
    stepped = wb - tau_last * sums
    if complete is True:
        return stepped, torch.zeros_like(sums)
    done = complete[:, None, None]
    return torch.where(done, stepped, wb), torch.where(done, 0.0, sums)


Weights = tuple[Tensor, ...]


def linear_step(weights: Weights, grads: Weights, mb: MiniBatch, tau: Tensor, norm: InnerNorm,
                with_prior: bool) -> tuple[Weights, Weights, Weights]:
    """TTT-Linear, f(x) = x + LN(x·W + b): gradients at W0 and the update of one mini-batch.

    weights ([W; b] [R,d+1,d],); grads alike. Returns (W0, λg) for `linear_outputs`, and the
    next (weights, grads).
    """
    (wb,), (sums,) = weights, grads
    lr_g = scaled_l2_grad(torch.bmm(mb.k, wb), mb.target, norm.weight_sq, mb.lr, norm.eps)
    new_wb, sums = advance(wb, sums, mb.k, lr_g, tau[-1], mb.complete, with_prior, mb.k_step)
    return (wb, lr_g), (new_wb,), (sums,)


def linear_outputs(saved: Weights, mbs: MiniBatch, tau: Tensor, prior: Weights | None) -> Tensor:
    """z̄ [n·R, b, d] of n mini-batches at once (the layer's output is q + LN(z̄)).

    saved: `linear_step`'s (W0, λg) concatenated over the mini-batches; mbs: their inputs, of
    which q and causal are used, with rows n·R; prior: the sums carried into the first of them.
    """
    wb, lr_g = saved
    return dual_output(mbs.q, wb, mbs.causal, lr_g, tau, None if prior is None else prior[0])


def mlp_step(weights: Weights, grads: Weights, mb: MiniBatch, tau: Tensor, norm: InnerNorm,
             with_prior: bool) -> tuple[Weights, Weights, Weights]:
    """TTT-MLP, f(x) = x + LN(gelu(x·W1 + b1)·W2 + b2): gradients at W0 and the update.

    weights ([W1; b1] [R,d+1,m], [W2; b2] [R,m+1,d]); grads alike.
    """
    (w1, w2), (s1, s2) = weights, grads
    z1 = torch.bmm(mb.k, w1)
    x2 = ones_column(gelu_tanh(z1))
    lr_g2 = scaled_l2_grad(torch.bmm(x2, w2), mb.target, norm.weight_sq, mb.lr, norm.eps)
    lr_g1 = torch.bmm(lr_g2, w2[:, :-1].transpose(1, 2)) * gelu_tanh_grad(z1)
    new_w1, s1 = advance(w1, s1, mb.k, lr_g1, tau[-1], mb.complete, with_prior, mb.k_step)
    new_w2, s2 = advance(w2, s2, x2, lr_g2, tau[-1], mb.complete, with_prior, x2.transpose(1, 2) * -tau[-1])
    return (w1, w2, x2, lr_g1, lr_g2), (new_w1, new_w2), (s1, s2)


def mlp_outputs(saved: Weights, mbs: MiniBatch, tau: Tensor, prior: Weights | None) -> Tensor:
    """z̄2 [n·R, b, d] of n mini-batches at once: the dual-form rule applied layer by layer."""
    w1, w2, x2, lr_g1, lr_g2 = saved
    p1, p2 = (None, None) if prior is None else prior
    x2_bar = ones_column(gelu_tanh(dual_output(mbs.q, w1, mbs.causal, lr_g1, tau, p1)))
    causal2 = eta_matrix(tau) * torch.bmm(x2_bar, x2.transpose(1, 2))
    return dual_output(x2_bar, w2, causal2, lr_g2, tau, p2)


class InnerModel(NamedTuple):
    step: Callable[..., tuple[Weights, Weights, Weights]]
    outputs: Callable[..., Tensor]


INNER_MODELS = {"linear": InnerModel(linear_step, linear_outputs), "mlp": InnerModel(mlp_step, mlp_outputs)}


def pack_layers(tensors: Weights) -> Weights:
    """(W1 [B,H,i,o], b1 [B,H,1,o], W2, b2, …) → ([W1; b1] [B·H, i+1, o], …)."""
    return tuple(torch.cat((w, b), -2).flatten(0, 1) for w, b in zip(tensors[::2], tensors[1::2]))


def unpack_layers(packed: Weights, batch_size: int) -> Weights:
    """Inverse of `pack_layers`: ([W; b] [B·H, i+1, o], …) → (W [B,H,i,o], b [B,H,1,o], …)."""
    out: list[Tensor] = []
    for wb in packed:
        wb = wb.unflatten(0, (batch_size, -1))
        out += [wb[..., :-1, :], wb[..., -1:, :]]
    return tuple(out)
