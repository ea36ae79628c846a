"""The dual form against the independent per-token primal reference (float64, ≤ 1e-10)."""
import pytest
import torch

from conftest import make_layer, max_diff
from reference import reference_ttt


@pytest.mark.parametrize("layer_type", ["linear", "mlp"])
@pytest.mark.parametrize("b", [1, 4, 16])
def test_dual_form_matches_per_token_reference(layer_type, b):
    layer = make_layer(layer_type, b=b, dim=16, heads=2, output_gate=True, mlp_expansion=2)
    x = torch.randn(2, 2 * b + 3, 16, dtype=torch.float64)  # T not a multiple of b (b > 1)
    with torch.no_grad():
        y, _ = layer(x)
        expected = reference_ttt(layer, x)
    assert y.abs().max() > 0.1  # the comparison is not between near-zero tensors
    assert max_diff(y, expected) <= 1e-10


def test_reference_comparison_can_fail():
    """A slightly different τ must be caught: the test above is able to fail."""
    layer = make_layer("linear", b=4)
    x = torch.randn(1, 9, 16, dtype=torch.float64)
    with torch.no_grad():
        y, _ = layer(x)
        layer.tau_offset[2] += 1e-3
        expected = reference_ttt(layer, x)
    assert max_diff(y, expected) > 1e-8


def test_ttt_adapts_fast_weights():
    """The final state differs from the initial one: the inner loop learned something."""
    layer = make_layer("linear", b=4)
    with torch.no_grad():
        _, state = layer(torch.randn(1, 12, 16, dtype=torch.float64))
    assert max_diff(dict(state.named_weights())["W1"][0], layer.W1) > 1e-3
    assert state.offset.tolist() == [0]
