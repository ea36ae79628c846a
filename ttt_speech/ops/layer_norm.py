"""Per-head LayerNorm and the analytic gradient of the LayerNorm-fused L2 reconstruction loss."""
import torch
from torch import Tensor
from torch.autograd.function import once_differentiable
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
    (the token learning rates λ). With x̂ = (z − μ)/σ and g = ∂ℓ/∂x̂ = x̂γ² + (β − target)γ:
    ∇_z ℓ = (g − mean(g) − x̂·mean(g·x̂)) / σ. One autograd node with a hand-written backward
    (the outer loop differentiates this once per mini-batch; op by op it was a dozen nodes, and
    `native_layer_norm`'s σ⁻¹, which has no autograd formula of its own, is fine here).
    """
    return _ScaledL2Grad.apply(z, shifted_target, weight_sq, scale, eps)


class _ScaledL2Grad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z: Tensor, t: Tensor, w2: Tensor, s: Tensor | float, eps: float) -> Tensor:
        x_hat, _, rstd = torch.native_layer_norm(z, z.shape[-1:], None, None, eps)  # rstd [..., 1]
        g = torch.addcmul(t, x_hat, w2)
        m = (g * x_hat).mean(-1, keepdim=True)
        h = torch.addcmul(g - g.mean(-1, keepdim=True), x_hat, m, value=-1)
        a = rstd * s
        ctx.save_for_backward(x_hat, rstd, g, m, h, a, w2, s if isinstance(s, Tensor) else None)
        ctx.shapes = (t.shape, w2.shape)
        return h * a

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        # out = a·L(g), with L(u) = u − mean(u) − x̂·mean(u·x̂) (symmetric in u), g = x̂·γ² + t,
        # x̂ = LN(z), a = σ⁻¹·s.
        x_hat, rstd, g, m, h, a, w2, s = ctx.saved_tensors
        t_shape, w2_shape = ctx.shapes
        d = x_hat.shape[-1]
        grad_a = (grad * h).sum(-1, keepdim=True)
        grad_h = grad * a
        mean_hx = (grad_h * x_hat).mean(-1, keepdim=True)
        grad_g = torch.addcmul(grad_h - grad_h.mean(-1, keepdim=True), x_hat, mean_hx, value=-1)  # L(a·ȳ)
        # through g, and through x̂ in L itself (g fixed): −a·ȳ·m − g·mean(a·ȳ·x̂)
        grad_x_hat = torch.addcmul(torch.addcmul(grad_g * w2, grad_h, m, value=-1), g, mean_hx, value=-1)
        # LayerNorm backward σ⁻¹·L(x̂̄), plus σ⁻¹'s own path through a (∂σ⁻¹/∂z = −σ⁻²·x̂/d)
        coef = ((grad_x_hat * x_hat).sum(-1, keepdim=True) + grad_a * a) / d
        grad_z = torch.addcmul(grad_x_hat - grad_x_hat.mean(-1, keepdim=True), x_hat, coef, value=-1) * rstd
        need = ctx.needs_input_grad
        grad_t = grad_g.sum_to_size(t_shape) if need[1] else None
        grad_w2 = (grad_g * x_hat).sum_to_size(w2_shape) if need[2] else None
        grad_s = (grad_a * rstd).sum_to_size(s.shape) if s is not None and need[3] else None
        return grad_z, grad_t, grad_w2, grad_s, None
