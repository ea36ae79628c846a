"""Fast weights stay float32 in bf16 models and under autocast; no autograd needed at inference."""
import torch

from conftest import make_layer, max_diff


def test_state_is_float32_for_a_bf16_model():
    layer = make_layer("linear", b=4, dtype=torch.bfloat16)
    with torch.no_grad():
        y, state = layer(torch.randn(2, 13, 16, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16
    assert all(t.dtype == torch.float32 for t in state.weights + state.grads)


def test_state_is_float32_under_autocast():
    layer = make_layer("mlp", b=4, dtype=torch.float32, mlp_expansion=2)
    x = torch.randn(2, 13, 16)
    with torch.no_grad():
        reference, _ = layer(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y, state = layer(x)
    assert all(t.dtype == torch.float32 for t in state.weights + state.grads)
    # Only the projections ran in bf16; the inner loop did not drift.
    assert max_diff(y.float(), reference) < 0.05


def test_bf16_streaming_stays_close_to_float32():
    """Over many updates a bf16 model with fp32 state tracks the fp32 model (no drift)."""
    layer32 = make_layer("linear", b=4, dtype=torch.float32)
    layer16 = make_layer("linear", b=4, dtype=torch.float32).to(torch.bfloat16)
    x = torch.randn(1, 400, 16)
    with torch.no_grad():
        y32, _ = layer32(x)
        state, ys = None, []
        for t in range(0, 400, 7):
            y, state = layer16(x[:, t:t + 7].bfloat16(), state)
            ys.append(y)
    err = (torch.cat(ys, 1).float() - y32).abs()
    assert err[:, -50:].max() < 0.1 and err[:, -50:].mean() < 3 * err[:, :50].mean() + 1e-3


def test_runs_under_inference_mode():
    for layer_type in ("linear", "mlp"):
        layer = make_layer(layer_type, b=4, dtype=torch.float32, mlp_expansion=2)
        with torch.inference_mode():
            y, state = layer(torch.randn(2, 9, 16))
            y2, _ = layer(torch.randn(2, 1, 16), state)
        assert torch.isfinite(y).all() and torch.isfinite(y2).all()
