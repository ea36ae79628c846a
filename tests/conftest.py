import json
import os
import sys
from pathlib import Path

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's interpreter (tests/test_kernels.py). It must be on
# before triton is first imported (triton defines its own language library then), so it is set here,
# for the whole session; tests/test_kernel_builds.py unsets it for the child process that compiles.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).parent))  # for `reference`
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))  # for `make_local_checkpoint`

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


# ---- a moshi-format checkpoint on disk, run offline (tests/test_local_checkpoint.py, test_offline_commands.py)

@pytest.fixture(scope="session")
def local_checkpoint(tmp_path_factory):
    """(folder, hub cache, repo id) of one moshi-format checkpoint on disk, built once per session
    (scripts/make_local_checkpoint.py: Kyutai's layout, random weights; 31 MB of LM, 385 MB of Mimi, a
    40-piece tokenizer), also laid out in a hub-layout cache as `repo id`."""
    from make_local_checkpoint import cache_as_hub, make_checkpoint

    root = tmp_path_factory.mktemp("checkpoint")
    folder = make_checkpoint(root / "ckpt", seed=3)
    repo_id = "org/moshi-tiny"
    cache_as_hub(folder, root / "hf-cache", repo_id)
    return folder, root / "hf-cache", repo_id


def go_offline(monkeypatch, cache: Path) -> None:
    """No network: huggingface_hub offline, reading `cache` (its constants are read at import, so they
    are patched too; the env vars reach child processes)."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))


@pytest.fixture
def offline(monkeypatch):
    """`offline(cache)`: `go_offline` for this test."""
    return lambda cache: go_offline(monkeypatch, cache)


def local_files(folder: Path) -> dict:
    """The ModelConfig fields naming every file of the checkpoint `folder` (from its config.json)."""
    names = json.loads((folder / "config.json").read_text())
    return {"moshi_weights": str(folder / names["moshi_name"]), "mimi_weights": str(folder / names["mimi_name"]),
            "config_path": str(folder / "config.json"), "text_tokenizer": str(folder / names["tokenizer_name"])}
