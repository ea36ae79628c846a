"""An independent, slow TTT reference: a per-token primal loop written from the math (docs/architecture.md §2).

It shares no code with `ttt_speech.ops`: the inner gradient comes from autograd, RoPE is written
as explicit 2x2 rotations, LayerNorm as torch's own, and every token is processed with its own
weights W_t = W0 − τ_i Σ_{j≤i} λ_j ∇ℓ_j(W0) of the mini-batch it belongs to.
"""
import math

import torch
from torch.nn import functional as F


def _rope(x: torch.Tensor, pos: int, theta: float) -> torch.Tensor:
    """x [d]: rotate pairs (2i, 2i+1) by pos·theta^(−2i/d)."""
    out = x.clone()
    d = x.shape[-1]
    for i in range(d // 2):
        a = pos * theta ** (-2 * i / d)
        c, s = math.cos(a), math.sin(a)
        out[2 * i] = c * x[2 * i] - s * x[2 * i + 1]
        out[2 * i + 1] = s * x[2 * i] + c * x[2 * i + 1]
    return out


def _ln(z, w, b, eps):
    return F.layer_norm(z, (z.shape[-1],), w, b, eps)


def _inner_z(x, fw, layer_type):
    """Pre-LayerNorm output of the inner model for one token x [d]."""
    if layer_type == "linear":
        return x @ fw["W1"] + fw["b1"][0]
    h = F.gelu(x @ fw["W1"] + fw["b1"][0], approximate="tanh")
    return h @ fw["W2"] + fw["b2"][0]


def reference_ttt(layer, x: torch.Tensor) -> torch.Tensor:
    """Outputs of `layer` (a TTTLayer, used only for its parameters and config) on x [B, T, C]."""
    cfg = layer.config
    B, T, C = x.shape
    H, d, b = layer.num_heads, layer.head_dim, cfg.mini_batch_size
    names = list(layer.fast_names)
    wq, wk, wv = layer.qkv_proj.weight.chunk(3)  # rows [Wq; Wk; Wv]
    q_all, k_all, v_all = x @ wq.T, x @ wk.T, x @ wv.T
    lr_all = cfg.base_lr * torch.sigmoid(x @ layer.lr_gate_weight.T + layer.lr_gate_bias) / d  # [B, T, H]
    tau = [max(0.0, 1.0 / (i + 1) + layer.tau_offset[i].item()) for i in range(b)]
    out = torch.zeros(B, T, C, dtype=x.dtype)
    for r in range(B):
        for h in range(H):
            gw, gb = layer.ttt_norm_weight[h].detach(), layer.ttt_norm_bias[h].detach()
            fw = {n: getattr(layer, n)[h].detach().clone() for n in names}
            for t in range(T):
                i = t % b
                if i == 0:
                    fw0 = {n: w.clone() for n, w in fw.items()}
                    acc = {n: torch.zeros_like(w) for n, w in fw.items()}
                sl = slice(h * d, (h + 1) * d)
                q = _rope(q_all[r, t, sl].detach(), i, cfg.rope_theta)
                k = _rope(k_all[r, t, sl].detach(), i, cfg.rope_theta)
                v = v_all[r, t, sl].detach()
                leaf = {n: w.clone().requires_grad_(True) for n, w in fw0.items()}
                with torch.enable_grad():
                    loss = 0.5 * ((_ln(_inner_z(k, leaf, cfg.layer_type), gw, gb, cfg.ln_eps) - (v - k)) ** 2).sum()
                    grads = torch.autograd.grad(loss, [leaf[n] for n in names])
                lam = lr_all[r, t, h].item()
                for n, g in zip(names, grads):
                    acc[n] = acc[n] + lam * g
                fw_t = {n: fw0[n] - tau[i] * acc[n] for n in names}
                out[r, t, sl] = q + _ln(_inner_z(q, fw_t, cfg.layer_type), gw, gb, cfg.ln_eps)
                if i == b - 1:
                    fw = fw_t
    y = F.layer_norm(out, (C,), layer.post_norm.weight, layer.post_norm.bias, layer.post_norm.eps)
    if layer.gate_proj is not None:
        y = F.gelu(x @ layer.gate_proj.weight.T, approximate="tanh") * y
    return y @ layer.o_proj.weight.T
