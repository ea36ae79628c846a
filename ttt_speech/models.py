"""Model builders: Moshi-architecture LMs (tiny random-init ones for CPU work, real ones from the hub)."""
from __future__ import annotations

from typing import Any

import torch

# Moshi-7B's LM kwargs (moshi/models/loaders.py `_lm_kwargs`) with every size shrunk: the same
# stream layout (1 text + 8 Moshi audio + 8 user audio streams, delays), norms, gating and RoPE.
TINY_MOSHI_KWARGS: dict[str, Any] = {
    "dim": 128,
    "text_card": 32000,
    "existing_text_padding_id": 3,
    "n_q": 16,
    "dep_q": 8,
    "card": 2048,
    "num_heads": 4,
    "num_layers": 4,
    "hidden_scale": 4.125,
    "causal": True,
    "layer_scale": None,
    "context": 3000,
    "max_period": 10000,
    "gating": "silu",
    "norm": "rms_norm_f32",
    "positional_embedding": "rope",
    "depformer_dim": 64,
    "depformer_dim_feedforward": int(4.125 * 64),
    "depformer_num_heads": 2,
    "depformer_num_layers": 2,
    "depformer_layer_scale": None,
    "depformer_multi_linear": True,
    "depformer_context": 8,
    "depformer_max_period": 10000,
    "depformer_gating": "silu",
    "depformer_pos_emb": "none",
    "depformer_weights_per_step": True,
    "delays": [0, 0, 1, 1, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 1],
}


def tiny_moshi_lm(seed: int = 0, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                  **overrides: Any):
    """A randomly initialised Moshi-architecture `LMModel` (default: dim 128, 4 layers, depformer 2)."""
    from moshi.models.lm import LMModel

    kwargs = {**TINY_MOSHI_KWARGS, **overrides}
    unknown = set(overrides) - set(TINY_MOSHI_KWARGS)
    if unknown:
        raise ValueError(f"tiny_moshi_lm: unknown override(s) {sorted(unknown)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LMModel(device=device, dtype=dtype, **kwargs).eval()


def pretrained_moshi_lm(hf_repo: str = "kyutai/moshiko-pytorch-bf16", device: str | torch.device = "cuda",
                        dtype: torch.dtype = torch.bfloat16):
    """Moshi weights from the Hugging Face hub through moshi's own loaders (needs network access)."""
    from moshi.models import loaders

    info = loaders.CheckpointInfo.from_hf_repo(hf_repo)
    return info.get_moshi(device=device, dtype=dtype).eval()
