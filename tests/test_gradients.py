"""Outer-loop gradients through the dual form: gradcheck and checkpointing."""
import pytest
import torch
from torch.func import functional_call

from conftest import make_layer


@pytest.mark.parametrize("layer_type", ["linear", "mlp"])
def test_gradcheck_through_dual_form_and_streaming(layer_type):
    layer = make_layer(layer_type, b=3, dim=8, heads=2, output_gate=True, mlp_expansion=2)
    names = [n for n, _ in layer.named_parameters()]
    expected = {"qkv_proj.weight", "o_proj.weight", "gate_proj.weight",
                "lr_gate_weight", "lr_gate_bias", "tau_offset", "W1", "b1", "ttt_norm_weight",
                "ttt_norm_bias", "post_norm.weight", "post_norm.bias"}
    assert expected <= set(names)
    x = torch.randn(2, 7, 8, dtype=torch.float64, requires_grad=True)

    def two_chunks(x, *params):  # through a carried state too
        p = dict(zip(names, params))
        y1, state = functional_call(layer, p, (x[:, :4],))
        y2, _ = functional_call(layer, p, (x[:, 4:], state))
        return torch.cat([y1, y2], dim=1)

    params = [p.detach().clone().requires_grad_(True) for p in layer.parameters()]
    assert torch.autograd.gradcheck(two_chunks, (x, *params), eps=1e-6, atol=1e-6, rtol=1e-4, fast_mode=True)


@pytest.mark.parametrize("layer_type", ["linear", "mlp"])
def test_checkpointing_gives_same_loss_and_gradients(layer_type):
    x = torch.randn(2, 37, 16, dtype=torch.float64)
    results = []
    for group in (0, 1, 3, 100):
        layer = make_layer(layer_type, b=4, checkpoint_group_size=group, mlp_expansion=2)
        y, _ = layer(x)
        loss = (y**2).mean()
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in layer.named_parameters()}))
    base_loss, base_grads = results[0]
    for loss, grads in results[1:]:
        assert torch.allclose(loss, base_loss, rtol=0, atol=1e-13)
        for n, g in grads.items():
            assert torch.allclose(g, base_grads[n], rtol=0, atol=1e-12), n
