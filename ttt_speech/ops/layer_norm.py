"""Per-head LayerNorm and the analytic gradient of the LayerNorm-fused L2 reconstruction loss."""
import torch
from torch import Tensor


def layer_norm(z: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    """LayerNorm over the last dim (biased variance). z [..., d]; weight, bias broadcast to [..., d]."""
    mu = z.mean(-1, keepdim=True)
    var = z.var(-1, keepdim=True, unbiased=False)
    return (z - mu) * torch.rsqrt(var + eps) * weight + bias


def layer_norm_l2_grad(z: Tensor, target: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    """∇_z of ℓ = ½‖LN(z) − target‖² (summed over the last dim d), in closed form.

    LayerNorm's backward fused with the L2 loss, so the inner loop needs no autograd (it must run
    under `torch.inference_mode()`) and stays differentiable for the outer loop. Shapes [..., d].
    """
    d = z.shape[-1]
    mu = z.mean(-1, keepdim=True)
    rstd = torch.rsqrt(z.var(-1, keepdim=True, unbiased=False) + eps)
    x_hat = (z - mu) * rstd
    g_x_hat = (x_hat * weight + bias - target) * weight
    return (
        d * g_x_hat
        - g_x_hat.sum(-1, keepdim=True)
        - x_hat * (g_x_hat * x_hat).sum(-1, keepdim=True)
    ) * (rstd / d)
