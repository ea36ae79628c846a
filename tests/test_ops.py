"""The pure math pieces against autograd / direct formulas."""
import math

import torch
from torch.nn import functional as F

from ttt_speech.ops.activations import gelu_tanh_grad
from ttt_speech.ops.inner_lr import position_scale, token_lr
from ttt_speech.ops.layer_norm import layer_norm, layer_norm_l2_grad
from ttt_speech.ops.rope import rope_interleaved


def test_layer_norm_matches_torch():
    z, w, b = torch.randn(3, 5, 8, dtype=torch.float64), torch.randn(8, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    assert torch.allclose(layer_norm(z, w, b, 1e-6), F.layer_norm(z, (8,), w, b, 1e-6), atol=1e-12)


def test_layer_norm_l2_grad_matches_autograd():
    z = torch.randn(4, 3, 16, dtype=torch.float64, requires_grad=True)
    target, w, b = (torch.randn(16, dtype=torch.float64) for _ in range(3))
    loss = 0.5 * ((F.layer_norm(z, (16,), w, b, 1e-6) - target) ** 2).sum()
    (expected,) = torch.autograd.grad(loss, z)
    assert torch.allclose(layer_norm_l2_grad(z.detach(), target, w, b, 1e-6), expected, atol=1e-12)


def test_gelu_tanh_grad_is_exact():
    x = torch.linspace(-6, 6, 1001, dtype=torch.float64, requires_grad=True)
    (expected,) = torch.autograd.grad(F.gelu(x, approximate="tanh").sum(), x)
    assert torch.allclose(gelu_tanh_grad(x.detach()), expected, atol=1e-14)


def test_rope_rotates_pairs_by_position():
    d, theta = 8, 100.0
    x = torch.randn(2, 5, d, dtype=torch.float64)
    pos = torch.tensor([0, 1, 2, 3, 0])
    y = rope_interleaved(x, pos, theta)
    assert torch.equal(y[:, 0], x[:, 0]) and torch.allclose(y[:, 4], x[:, 4])  # position 0: identity
    for t, p in enumerate(pos.tolist()):
        for i in range(d // 2):
            a = p * theta ** (-2 * i / d)
            c, s = math.cos(a), math.sin(a)
            expected = torch.stack([c * x[:, t, 2 * i] - s * x[:, t, 2 * i + 1], s * x[:, t, 2 * i] + c * x[:, t, 2 * i + 1]], -1)
            assert torch.allclose(y[:, t, 2 * i:2 * i + 2], expected, atol=1e-14)
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1))


def test_inner_learning_rates():
    x = torch.randn(2, 3, 6, dtype=torch.float64)
    w, b = torch.randn(2, 6, dtype=torch.float64), torch.randn(2, dtype=torch.float64)
    lam = token_lr(x, w, b, base_lr=0.5, head_dim=4)
    assert lam.shape == (2, 2, 3)
    assert torch.allclose(lam[1, 0, 2], 0.5 * torch.sigmoid(x[1, 2] @ w[0] + b[0]) / 4)
    tau = position_scale(torch.tensor([0.0, 0.0, -0.5, 0.1], dtype=torch.float64))
    assert torch.allclose(tau, torch.tensor([1.0, 0.5, 0.0, 0.35], dtype=torch.float64))
