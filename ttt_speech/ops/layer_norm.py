"""Per-head LayerNorm and the analytic gradient of the LayerNorm-fused L2 reconstruction loss."""
import torch
from torch import Tensor
from torch.nn import functional as F


def layer_norm(z: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    """LayerNorm over the last dim (biased variance). z [..., d]; weight, bias broadcast to [..., d]."""
    return torch.addcmul(bias, F.layer_norm(z, z.shape[-1:], eps=eps), weight)


def layer_norm_l2_grad(z: Tensor, target: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    """∇_z of ℓ = ½‖LN(z) − target‖² (summed over the last dim d), in closed form.

    LayerNorm's backward fused with the L2 loss, so the inner loop needs no autograd (it must run
    under `torch.inference_mode()`) and stays differentiable for the outer loop. Shapes [..., d].
    """
    return scaled_l2_grad(z, (bias - target) * weight, weight * weight, 1.0, eps)


def scaled_l2_grad(z: Tensor, shifted_target: Tensor, weight_sq: Tensor, scale: Tensor | float,
                   eps: float) -> Tensor:
    """scale · ∇_z ℓ, with the target-only terms precomputed (the form used inside the scan).

    shifted_target = (β − target)·γ and weight_sq = γ² (broadcast to z [..., d]); scale [..., 1]
    (the token learning rates λ). With x̂ = LN(z) unscaled and g = ∂ℓ/∂x̂ = x̂γ² + (β − target)γ:
    ∇_z ℓ = (g − mean(g) − x̂·mean(g·x̂)) / σ.
    """
    x_hat = F.layer_norm(z, z.shape[-1:], eps=eps)
    rstd = torch.rsqrt(z.var(-1, keepdim=True, unbiased=False) + eps)  # (native_layer_norm's rstd has no gradient)
    g = torch.addcmul(shifted_target, x_hat, weight_sq)
    centred = g - g.mean(-1, keepdim=True)
    return torch.addcmul(centred, x_hat, (g * x_hat).mean(-1, keepdim=True), value=-1) * (rstd * scale)
