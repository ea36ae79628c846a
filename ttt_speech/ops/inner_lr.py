"""The learnable inner learning rate: a per-token, per-head gate λ and a per-position scale τ."""
import torch
from torch import Tensor


def token_lr(x: Tensor, gate_weight: Tensor, gate_bias: Tensor, base_lr: float, head_dim: int) -> Tensor:
    """λ_{h,t} = base_lr · sigmoid(θ_h · x_t + c_h) / d.

    x [B, T, C] (the TTT layer input, full width); gate_weight [H, C]; gate_bias [H] → [B, H, T].
    The division by d stands in for the mean of an MSE loss (the loss itself is a sum over d).
    """
    logits = torch.einsum("btc,hc->bht", x, gate_weight) + gate_bias[:, None]
    return base_lr * torch.sigmoid(logits) / head_dim


def position_scale(tau_offset: Tensor) -> Tensor:
    """τ_i = max(0, 1/i + a_i) for in-mini-batch positions i = 1..b. tau_offset [b] → [b]."""
    b = tau_offset.shape[0]
    i = torch.arange(1, b + 1, device=tau_offset.device, dtype=tau_offset.dtype)
    return torch.relu(1.0 / i + tau_offset)
