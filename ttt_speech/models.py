"""Model builders: Moshi-architecture LMs (tiny random-init ones for CPU work, real ones from the hub)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from .schema import doc

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

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


@dataclass
class ModelConfig:
    """Which Moshi LM (and Mimi codec) to build: shared by training, evaluation and generation."""

    name: str = doc("tiny", "'tiny' (random-init Moshi-architecture model, no download) or a Hugging Face "
                            "repo id such as kyutai/moshiko-pytorch-bf16")
    moshi_weights: Path | None = doc(None, "local Moshi LM weights (.safetensors) used instead of the hub file")
    mimi_weights: Path | None = doc(None, "local Mimi codec weights used instead of the hub file")
    config_path: Path | None = doc(None, "local config.json of the checkpoint (hub repos ship one)")
    text_tokenizer: Path | None = doc(None, "local SentencePiece .model of the text stream (for word-timed "
                                            "transcripts); null: the checkpoint's (hub); the tiny model has none")
    tiny: dict = doc(factory=dict, help="overrides of the tiny model's kwargs (e.g. {dim: 64, card: 64, context: 32})")
    seed: int = doc(0, "initialisation seed of the tiny model and of the random Mimi")
    dtype: Literal["float32", "bfloat16", "float16"] = doc("float32", "parameter dtype of the LM (TTT state is always float32)")
    device: str = doc("auto", "'auto' (cuda when available, else cpu), 'cpu', 'cuda', 'cuda:1', ...")

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("model.name: expected 'tiny' or a Hugging Face repo id, got ''")
        for key in ("moshi_weights", "mimi_weights", "config_path", "text_tokenizer"):
            path = getattr(self, key)
            if path is not None and not Path(path).is_file():
                raise ValueError(f"model.{key}: {path} is not a readable file")
        if self.name == "tiny":
            unknown = sorted(set(self.tiny) - set(TINY_MOSHI_KWARGS))
            if unknown:
                raise ValueError(f"model.tiny: unknown kwarg(s) {unknown}; allowed: {sorted(TINY_MOSHI_KWARGS)}")

    @property
    def is_tiny(self) -> bool:
        return self.name == "tiny"

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        try:
            return torch.device(self.device)
        except RuntimeError:
            raise ValueError(f"model.device: expected auto, cpu or cuda[:N], got {self.device!r}") from None

    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def codec_id(self) -> str:
        """Identity of the Mimi codec, part of the key of cached codes."""
        if self.is_tiny:
            return f"mimi-random-seed{self.seed}"
        if self.mimi_weights is not None:
            return f"mimi-local-{Path(self.mimi_weights).resolve()}"
        return f"mimi-{self.name}"


def load_lm(config: ModelConfig, device: torch.device | None = None):
    """The Moshi `LMModel` described by `config` (eval mode; on `device` or config.device).

    On the meta device: the architecture only, no weights read or allocated (sharded training
    builds it so on every rank but 0, and fills the shards from rank 0's copy)."""
    device = torch.device(device) if device is not None else config.torch_device()
    if config.is_tiny:
        return tiny_moshi_lm(seed=config.seed, device=device, dtype=config.torch_dtype(), **config.tiny)
    return _checkpoint(config).get_moshi(device=device, dtype=config.torch_dtype(),
                                         load_weight=device.type != "meta").eval()


def load_mimi(config: ModelConfig, device: torch.device | None = None):
    """The Mimi codec of `config`: a random-init Mimi for 'tiny' (seeded), the checkpoint's otherwise."""
    from moshi.models import loaders

    device = device or config.torch_device()
    if config.is_tiny:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            return loaders.get_mimi(None, device=device).eval()
    return _checkpoint(config).get_mimi(device=device).eval()


def load_text_tokenizer(config: ModelConfig):
    """The SentencePiece processor of the text stream: `text_tokenizer`, else the checkpoint's;
    None for the tiny model without one (its text stream can only be padding)."""
    import sentencepiece

    if config.text_tokenizer is not None:
        return sentencepiece.SentencePieceProcessor(model_file=str(config.text_tokenizer))
    if config.is_tiny:
        return None
    return _checkpoint(config).get_text_tokenizer()


def _checkpoint(config: ModelConfig):
    from moshi.models import loaders

    return loaders.CheckpointInfo.from_hf_repo(
        config.name, moshi_weights=config.moshi_weights, mimi_weights=config.mimi_weights,
        config_path=config.config_path)
