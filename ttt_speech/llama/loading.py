"""`ModelConfig` (host llama) → a transformers causal LM and its tokenizer, as `ttt_speech.models`
builds Moshi LMs: a tiny random-init model, a local checkpoint folder or a hub id read from the
Hugging Face cache (downloaded when the hub is reachable). Failures are one line naming model.name."""
from __future__ import annotations

import torch
from torch import nn

from . import _import  # noqa: F401
from ..models import ModelConfig
from .models import tiny_llm

TINY_ARCH = {"tiny-llama": "llama", "tiny-qwen2": "qwen2"}


def load_llm(config: ModelConfig, device: torch.device) -> nn.Module:
    """The `LlamaForCausalLM` / `Qwen2ForCausalLM` of `config` (eval mode; on the meta device: the
    architecture only, nothing read or allocated)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    dtype = config.torch_dtype()
    if config.name in TINY_ARCH:
        with torch.device(device):  # the meta device too: an FSDP rank > 0 holds no weights
            return tiny_llm(TINY_ARCH[config.name], seed=config.seed, dtype=dtype, **config.tiny)
    try:
        if device.type == "meta":
            with torch.device("meta"):
                return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(config.name), dtype=dtype).eval()
        return AutoModelForCausalLM.from_pretrained(config.name, dtype=dtype).to(device).eval()
    except OSError as e:  # not in the cache and no hub, or not a checkpoint
        raise ValueError(f"model.name: cannot load {config.name!r} with transformers ({str(e).splitlines()[0]}); "
                         f"download it first (`hf download {config.name}`) or give its folder") from None


def load_llm_tokenizer(config: ModelConfig):
    """The model's tokenizer (`AutoTokenizer`), None for a tiny model (it has none: token files only)."""
    from transformers import AutoTokenizer

    if config.name in TINY_ARCH:
        return None
    try:
        return AutoTokenizer.from_pretrained(config.name)
    except OSError as e:
        raise ValueError(f"model.name: cannot load the tokenizer of {config.name!r} ({str(e).splitlines()[0]})") from None
