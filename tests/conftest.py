import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # for `reference`

from ttt_speech.config import TTTConfig  # noqa: E402
from ttt_speech.layer import TTTLayer  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def eager_moshi():
    """moshi's kernels (gating, RoPE) eager in the test process. moshi torch.compiles them lazily,
    again for each new shape (seconds per shape on 2 cores), and dynamo falls back to eager once a
    process has compiled too many shapes: which kernel ran (they round differently) would depend on
    the tests run before, and exact comparisons with it. Subprocesses (torchrun runs) compile."""
    try:
        from moshi.utils.compile import no_compile
    except ImportError:
        yield
        return
    with no_compile():
        yield


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def make_layer(layer_type="linear", b=4, dim=16, heads=2, dtype=torch.float64, seed=0, **cfg):
    """A TTT layer whose fast weights and gates are far from init, so that TTT visibly acts:
    W ~ N(0, 0.3) keeps the inner LayerNorm well conditioned, a large lr makes updates matter."""
    torch.manual_seed(seed)
    layer = TTTLayer(dim, TTTConfig(layer_type=layer_type, mini_batch_size=b, **cfg), num_heads=heads, dtype=dtype)
    with torch.no_grad():
        for name in layer.fast_names:
            getattr(layer, name).normal_(std=0.3)
        layer.tau_offset.normal_(std=0.1)
        layer.ttt_norm_weight.normal_(1.0, 0.1)
        layer.ttt_norm_bias.normal_(0.0, 0.1)
        layer.lr_gate_bias.fill_(2.0)
        layer.o_proj.weight.normal_(std=dim**-0.5)
    return layer


def max_diff(a, b):
    return (a - b).abs().max().item()


def inserted_modules(model):
    """What a patch added to each patched layer (the gated branch, or the TTT module in replace mode)."""
    from ttt_speech import TTTModel

    return [site.inserted for site in TTTModel.of(model).sites]
