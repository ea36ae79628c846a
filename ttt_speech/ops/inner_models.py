"""TTT mini-batches in the dual form, for the two inner models (TTT-Linear, TTT-MLP).

Notation (per head): q, k [b, d] queries / keys of the mini-batch, target = v − k, λ_j the token
learning rates, τ_i the position scales, W0/b0 the fast weights at the mini-batch start and
A/a the λ-weighted gradient sums of tokens of this mini-batch seen in earlier chunks
(zero unless the mini-batch was started by a previous call: that is what makes streaming exact).

Every gradient g_j is taken at W0. Token i sees W_i = W0 − τ_i (A + Σ_{j≤i} λ_j k_jᵀ g_j)
(same for b), evaluated without materialising W_i through a causal [b, b] matrix. When the
mini-batch is complete, W ← W0 − τ_b (A + Σ_j λ_j k_jᵀ g_j) and the sums restart at zero.

Each inner model is split in two (`InnerModel`): `step` is everything that needs the fast weights
W0 of a mini-batch (the gradients at W0, the update, and the queries' product with W0), run in
the sequential scan while W0 is live; `outputs` is the rest of the dual form, the causal
correction −η·(λg), which needs no weights and runs once for all mini-batches. So nothing the
size of the weights is kept per mini-batch (a list of every mini-batch's W0, concatenated, cost
a 2 MB copy per mini-batch per layer at width 4096), and the keys and queries of a mini-batch
meet W0 in one matmul [k; q]·W0 (twice the rows per weight read).
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

    kq: Tensor  # [R, 2b, d+1]  [k 1] over [q 1]: keys and queries stacked, for one matmul with W0
    causal: Tensor  # [R, b, b]  η_ij ([q_i 1]·[k_j 1]) for j ≤ i, 0 above: the first layer's dual matrix
    k_step: Tensor  # [R, d+1, b]  −τ_b·[k 1]ᵀ: the first layer's end-of-mini-batch step
    target: Tensor  # [R, b, d]  (β − (v − k))·γ, the shifted reconstruction target
    lr: Tensor  # [R, b, 1]  λ_j, zero on padding
    complete: Tensor | bool  # [R] bool, or one bool for all rows: the last slot is a real token → update W

    @property
    def k(self) -> Tensor:
        """[k 1] [R, b, d+1] (a view)."""
        return self.kq[..., : self.causal.shape[-1], :]

    @property
    def q(self) -> Tensor:
        """[q 1] [R, b, d+1] (a view)."""
        return self.kq[..., self.causal.shape[-1]:, :]


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
    b, d = q.shape[-2:]
    kq = q.new_empty(*q.shape[:-2], 2 * b, d + 1)  # [N, R, 2b, d+1], written once (no cat, then pad)
    kq[..., :b, :d], kq[..., b:, :d], kq[..., d] = k, q, 1.0
    k1, q1 = kq.split(b, dim=-2)
    causal = eta_matrix(tau) * (q1 @ k1.transpose(-1, -2))
    target = (bias - (v - k)) * weight
    return MiniBatch(kq, causal, (-tau[-1] * k1).transpose(-1, -2), target, lr[..., None], complete)


def eta_matrix(tau: Tensor) -> Tensor:
    """η's position part: τ_i for j ≤ i, 0 above the diagonal. tau [b] → [b, b]."""
    return torch.tril(tau[:, None].expand(-1, tau.shape[0]))


def ones_column(x: Tensor) -> Tensor:
    """[x 1]: append the bias input. [..., i] → [..., i+1]."""
    return F.pad(x, (0, 1), value=1.0)


def subtract_prior(z_q: Tensor, x_q: Tensor, prior: Tensor, tau: Tensor) -> Tensor:
    """z_q − τ_i·([x̄_i 1]·[A; a]): the sums carried into a mini-batch from earlier chunks, seen by slot i.

    z_q [R, b, o] = [x̄ 1]·[W0; b0]; x_q [R, b, i+1]; prior [R, i+1, o]; tau [b].
    """
    return z_q - tau[:, None] * torch.bmm(x_q, prior)


def causal_correction(z_q: Tensor, causal: Tensor, lr_g: Tensor) -> Tensor:
    """Outputs x̄_i·W_i + b_i = z_q,i − Σ_{j≤i} η_ij λ_j g_j of one fast layer, for every slot.

    z_q [n, b, o] = [x̄ 1]·[W0; b0] (prior sums already applied); causal [n, b, b]
    η_ij ([x̄_i 1]·[x_j 1]); lr_g [n, b, o] = λ_j g_j. Any number n of rows (several mini-batches).
    """
    return torch.baddbmm(z_q, causal, lr_g, alpha=-1)


def advance(wb: Tensor, sums: Tensor, x: Tensor, lr_g: Tensor, tau_last: Tensor, complete: Tensor | bool,
            with_prior: bool, x_step: Tensor, in_place: bool = False) -> tuple[Tensor, Tensor]:
    """Add this mini-batch's λ-weighted gradients [x 1]ᵀ·(λg) to the sums; step [W; b] where complete.

    wb, sums [R,i+1,o]; x [R,b,i+1] = [x 1]; lr_g [R,b,o]; complete: [R] bool, or one bool;
    x_step [R,i+1,b] = −τ_b·[x 1]ᵀ (negated: baddbmm's alpha = −1 would cost two multiplies in backward).
    A mini-batch complete for every row, other than the first of a chunk, starts from zero sums
    (a row with pending sums has no real token after them in this chunk), hence the short path.
    in_place: update wb and sums in their own memory and return them (inference: see `InnerModel`).
    """
    if complete is True and not with_prior:
        return (wb.baddbmm_(x_step, lr_g) if in_place else torch.baddbmm(wb, x_step, lr_g)), sums
    sums = sums.baddbmm_(x.transpose(1, 2), lr_g) if in_place else torch.baddbmm(sums, x.transpose(1, 2), lr_g)
    if complete is False:
        return wb, sums
    if complete is True:
        if in_place:
            return wb.sub_(tau_last * sums), sums.zero_()
        return wb - tau_last * sums, torch.zeros_like(sums)
    done = complete[:, None, None]
    if in_place:
        return wb.sub_(tau_last * sums * done), sums.masked_fill_(done, 0.0)
    return torch.where(done, wb - tau_last * sums, wb), torch.where(done, 0.0, sums)


Weights = tuple[Tensor, ...]


def linear_step(weights: Weights, grads: Weights, mb: MiniBatch, tau: Tensor, norm: InnerNorm,
                with_prior: bool, in_place: bool = False) -> tuple[Weights, Weights, Weights]:
    """TTT-Linear, f(x) = x + LN(x·W + b): gradients at W0, the queries through W0, the update.

    weights ([W; b] [R,d+1,d],); grads alike. Returns (q·W0, λg) for `linear_outputs`, and the
    next (weights, grads).
    """
    (wb,), (sums,) = weights, grads
    z_k, z_q = torch.bmm(mb.kq, wb).chunk(2, dim=1)  # [R, b, d] each: the loss's input, the output's
    if with_prior:
        z_q = subtract_prior(z_q, mb.q, sums, tau)
    lr_g = scaled_l2_grad(z_k, mb.target, norm.weight_sq, mb.lr, norm.eps)
    new_wb, sums = advance(wb, sums, mb.k, lr_g, tau[-1], mb.complete, with_prior, mb.k_step, in_place)
    return (z_q, lr_g), (new_wb,), (sums,)


def linear_outputs(saved: Weights, causal: Tensor, tau: Tensor) -> Tensor:
    """z̄ [n·R, b, d] of n mini-batches at once (the layer's output is q + LN(z̄)).

    saved: `linear_step`'s (q·W0, λg) concatenated over the mini-batches; causal [n·R, b, b].
    """
    z_q, lr_g = saved
    return causal_correction(z_q, causal, lr_g)


def mlp_step(weights: Weights, grads: Weights, mb: MiniBatch, tau: Tensor, norm: InnerNorm,
             with_prior: bool, in_place: bool = False) -> tuple[Weights, Weights, Weights]:
    """TTT-MLP, f(x) = x + LN(gelu(x·W1 + b1)·W2 + b2): gradients at W0, the queries through W0, the update.

    weights ([W1; b1] [R,d+1,m], [W2; b2] [R,m+1,d]); grads alike. The queries' first layer is
    finished here (its dual form needs λg1, its gelu comes before W2 is applied).
    """
    (w1, w2), (s1, s2) = weights, grads
    z1_k, z1_q = torch.bmm(mb.kq, w1).chunk(2, dim=1)
    x2 = ones_column(gelu_tanh(z1_k))
    lr_g2 = scaled_l2_grad(torch.bmm(x2, w2), mb.target, norm.weight_sq, mb.lr, norm.eps)
    lr_g1 = torch.bmm(lr_g2, w2[:, :-1].transpose(1, 2)) * gelu_tanh_grad(z1_k)
    if with_prior:
        z1_q = subtract_prior(z1_q, mb.q, s1, tau)
    x2_bar = ones_column(gelu_tanh(causal_correction(z1_q, mb.causal, lr_g1)))
    z2_q = torch.bmm(x2_bar, w2)
    if with_prior:
        z2_q = subtract_prior(z2_q, x2_bar, s2, tau)
    new_w1, s1 = advance(w1, s1, mb.k, lr_g1, tau[-1], mb.complete, with_prior, mb.k_step, in_place)
    new_w2, s2 = advance(w2, s2, x2, lr_g2, tau[-1], mb.complete, with_prior, x2.transpose(1, 2) * -tau[-1],
                         in_place)
    return (z2_q, x2_bar, x2, lr_g2), (new_w1, new_w2), (s1, s2)


def mlp_outputs(saved: Weights, causal: Tensor, tau: Tensor) -> Tensor:
    """z̄2 [n·R, b, d] of n mini-batches at once: the second layer's causal correction."""
    z2_q, x2_bar, x2, lr_g2 = saved
    causal2 = eta_matrix(tau) * torch.bmm(x2_bar, x2.transpose(1, 2))
    return causal_correction(z2_q, causal2, lr_g2)


class InnerModel(NamedTuple):
    """`step(weights, grads, mb, tau, norm, with_prior, in_place)` → (saved, weights, grads): all that
    needs a mini-batch's W0, so W0 is dead once its step returns and, where autograd does not keep
    it, the next W can overwrite it (`in_place`: no copy of the fast weights per mini-batch, and
    the streaming state is updated where it lives). `outputs(saved, causal, tau)`: the rest, batched."""

    step: Callable[..., tuple[Weights, Weights, Weights]]
    outputs: Callable[..., Tensor]


INNER_MODELS = {"linear": InnerModel(linear_step, linear_outputs), "mlp": InnerModel(mlp_step, mlp_outputs)}
