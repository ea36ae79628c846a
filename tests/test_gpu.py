"""GPU checks (skipped without CUDA): streaming on CUDA, and LMGen with CUDA graphs, on the PyTorch
path and on the Triton kernels (`kernel: auto` takes them on CUDA)."""
import pytest
import torch
from moshi.models.lm import LMGen
from moshi.utils.compile import no_cuda_graph

from conftest import make_layer, max_diff
from ttt_speech import TTTConfig, patch_moshi, tiny_moshi_lm

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("kernel", ["torch", "triton"])
@pytest.mark.parametrize("layer_type", ["linear", "mlp"])
def test_streaming_contract_on_cuda(layer_type, kernel):
    layer = make_layer(layer_type, b=16, dim=64, heads=4, dtype=torch.float32, kernel=kernel).cuda()
    x = torch.randn(2, 100, 64, device="cuda")
    with torch.no_grad():
        full, _ = layer(x)
        state, ys = None, []
        for start, size in ((0, 1), (1, 15), (16, 17), (33, 5), (38, 62)):
            y, state = layer(x[:, start:start + size], state)
            ys.append(y)
    assert max_diff(torch.cat(ys, 1), full) <= 1e-5


def test_bf16_on_cuda_keeps_float32_state():
    layer = make_layer("linear", b=16, dim=64, heads=4, dtype=torch.float32).cuda().bfloat16()
    with torch.no_grad():
        _, state = layer(torch.randn(1, 40, 64, device="cuda", dtype=torch.bfloat16))
    assert all(t.dtype == torch.float32 for t in state.weights + state.grads)


@pytest.mark.parametrize("kernel", ["torch", "triton"])
@pytest.mark.parametrize("mode", ["hybrid", "replace"])
def test_lmgen_with_cuda_graphs_matches_eager(mode, kernel):
    """If the TTT state were rebound instead of updated in place, graph replays would freeze it."""
    lm = tiny_moshi_lm(card=64, text_card=100, device="cuda")
    patch_moshi(lm, TTTConfig(mini_batch_size=4, mode=mode, gate_init=1.0, kernel=kernel))
    g = torch.Generator().manual_seed(0)
    user = torch.randint(0, 64, (2, 8, 30), generator=g).cuda()

    def run(graphs: bool):
        logits = []
        gen = LMGen(lm, use_sampling=False, on_text_logits_hook=lambda t: logits.append(t.clone()))
        ctx = torch.no_grad() if graphs else no_cuda_graph()
        with ctx, gen.streaming(2):
            for t in range(30):
                gen.step(user[:, :, t:t + 1])
        return torch.cat(logits, dim=2)

    eager, graphed = run(False), run(True)
    assert max_diff(graphed, eager) <= 1e-4
