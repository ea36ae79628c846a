"""One mini-batch of TTT in the dual form, for the two inner models (TTT-Linear, TTT-MLP).

Notation (per head): q, k [b, d] queries / keys of the mini-batch, target = v − k, λ_j the token
learning rates, τ_i the position scales, W0/b0 the fast weights at the mini-batch start and
A/a the λ-weighted gradient sums of tokens of this mini-batch seen in earlier chunks
(zero unless the mini-batch was started by a previous call: that is what makes streaming exact).

Every gradient g_j is taken at W0. Token i sees W_i = W0 − τ_i (A + Σ_{j≤i} λ_j k_jᵀ g_j)
(same for b), evaluated without materialising W_i through a causal [b, b] matrix. When the
mini-batch is complete, W ← W0 − τ_b (A + Σ_j λ_j k_jᵀ g_j) and the sums restart at zero.
"""
from typing import NamedTuple

import torch
from torch import Tensor

from .activations import gelu_tanh, gelu_tanh_grad
from .layer_norm import layer_norm, layer_norm_l2_grad


class MiniBatch(NamedTuple):
    """Inputs of one mini-batch, b slots (padding slots have lr = 0)."""

    q: Tensor  # [B, H, b, d]
    k: Tensor  # [B, H, b, d]
    target: Tensor  # [B, H, b, d]  v − k
    lr: Tensor  # [B, H, b]  λ_j, zero on padding
    complete: Tensor  # [B] bool: the mini-batch's last slot is a real token → update W


class InnerNorm(NamedTuple):
    weight: Tensor  # [1, H, 1, d]
    bias: Tensor  # [1, H, 1, d]
    eps: float


def dual_linear(
    x_bar: Tensor, x: Tensor, w: Tensor, b: Tensor, grad_w: Tensor, grad_b: Tensor,
    lr_grad: Tensor, tau: Tensor, with_prior: bool,
) -> Tensor:
    """Outputs x̄_i · W_i + b_i of one fast linear layer for every slot i of a mini-batch.

    x_bar [B,H,b,i] inputs to evaluate; x [B,H,b,i] the inputs the gradients were taken at;
    w [B,H,i,o], b [B,H,1,o]; grad_w/grad_b the prior sums A, a; lr_grad [B,H,b,o] = λ_j g_j;
    tau [b]. with_prior=False skips the A/a term when it is known to be zero.
    """
    n = tau.shape[0]
    eta = tau[:, None] * torch.ones(n, n, dtype=tau.dtype, device=tau.device).tril()  # τ_i, j ≤ i
    out = x_bar @ w + b - (eta * (x_bar @ x.transpose(-1, -2))) @ lr_grad - eta @ lr_grad
    if with_prior:
        out = out - tau[:, None] * (x_bar @ grad_w + grad_b)
    return out


def accumulate(
    x: Tensor, w: Tensor, b: Tensor, grad_w: Tensor, grad_b: Tensor,
    lr_grad: Tensor, tau_last: Tensor, complete: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Add this mini-batch's λ-weighted gradients to the sums; step W, b where it is complete."""
    grad_w = grad_w + x.transpose(-1, -2) @ lr_grad
    grad_b = grad_b + lr_grad.sum(-2, keepdim=True)
    done = complete[:, None, None, None]
    w = torch.where(done, w - tau_last * grad_w, w)
    b = torch.where(done, b - tau_last * grad_b, b)
    grad_w = torch.where(done, torch.zeros_like(grad_w), grad_w)
    grad_b = torch.where(done, torch.zeros_like(grad_b), grad_b)
    return w, b, grad_w, grad_b


def linear_minibatch(
    weights: tuple[Tensor, ...], grads: tuple[Tensor, ...], mb: MiniBatch,
    tau: Tensor, norm: InnerNorm, with_prior: bool,
) -> tuple[Tensor, tuple[Tensor, ...], tuple[Tensor, ...]]:
    """TTT-Linear, f(x) = x + LN(x·W + b). weights (W [B,H,d,d], b [B,H,1,d]); grads alike."""
    w, b = weights
    grad_w, grad_b = grads
    z = mb.k @ w + b
    g = layer_norm_l2_grad(z, mb.target, norm.weight, norm.bias, norm.eps)
    lr_g = mb.lr[..., None] * g
    z_bar = dual_linear(mb.q, mb.k, w, b, grad_w, grad_b, lr_g, tau, with_prior)
    out = mb.q + layer_norm(z_bar, norm.weight, norm.bias, norm.eps)
    w, b, grad_w, grad_b = accumulate(mb.k, w, b, grad_w, grad_b, lr_g, tau[-1], mb.complete)
    return out, (w, b), (grad_w, grad_b)


def mlp_minibatch(
    weights: tuple[Tensor, ...], grads: tuple[Tensor, ...], mb: MiniBatch,
    tau: Tensor, norm: InnerNorm, with_prior: bool,
) -> tuple[Tensor, tuple[Tensor, ...], tuple[Tensor, ...]]:
    """TTT-MLP, f(x) = x + LN(gelu(x·W1 + b1)·W2 + b2), the dual-form rule applied layer by layer.

    weights (W1 [B,H,d,m], b1 [B,H,1,m], W2 [B,H,m,d], b2 [B,H,1,d]); grads alike.
    """
    w1, b1, w2, b2 = weights
    gw1, gb1, gw2, gb2 = grads
    z1 = mb.k @ w1 + b1
    x2 = gelu_tanh(z1)
    z2 = x2 @ w2 + b2
    g2 = layer_norm_l2_grad(z2, mb.target, norm.weight, norm.bias, norm.eps)
    g1 = (g2 @ w2.transpose(-1, -2)) * gelu_tanh_grad(z1)
    lr_g1 = mb.lr[..., None] * g1
    lr_g2 = mb.lr[..., None] * g2
    x2_bar = gelu_tanh(dual_linear(mb.q, mb.k, w1, b1, gw1, gb1, lr_g1, tau, with_prior))
    z2_bar = dual_linear(x2_bar, x2, w2, b2, gw2, gb2, lr_g2, tau, with_prior)
    out = mb.q + layer_norm(z2_bar, norm.weight, norm.bias, norm.eps)
    w1, b1, gw1, gb1 = accumulate(mb.k, w1, b1, gw1, gb1, lr_g1, tau[-1], mb.complete)
    w2, b2, gw2, gb2 = accumulate(x2, w2, b2, gw2, gb2, lr_g2, tau[-1], mb.complete)
    return out, (w1, b1, w2, b2), (gw1, gb1, gw2, gb2)


MINIBATCH_STEPS = {"linear": linear_minibatch, "mlp": mlp_minibatch}
