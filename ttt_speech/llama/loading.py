"""`ModelConfig` (host llama) → a transformers causal LM and its tokenizer, as `ttt_speech.models`
builds Moshi LMs: a tiny random-init model, a local checkpoint folder or a hub id read from the
Hugging Face cache (downloaded when the hub is reachable). Failures are one line naming model.name."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from . import _import  # noqa: F401
from ..models import TINY_LLMS, ModelConfig
from .models import tiny_llm
from .pretrained import llm_config

LLM_TYPES = ("llama", "qwen2")  # config.json model_types trained as they are
OMNI_PREFIX = "omni_speech"  # LLaMA-Omni / LLaMA-Omni2 (omni_speech_llama, omni_speech2s_qwen2, ...): their LLM


def check_llm(config: ModelConfig) -> None:
    """Refuse, from config.json alone (before data or weights are read), a model that is not a Llama /
    Qwen2 (or a LLaMA-Omni / LLaMA-Omni2 checkpoint, whose LLM is one); one line naming model.name."""
    if config.name in TINY_LLMS:
        return
    model_type = str(_raw_config(config).get("model_type", ""))
    if model_type not in LLM_TYPES and not model_type.startswith(OMNI_PREFIX):  # not qwen2_moe, llama4, ...
        raise ValueError(f"model.name: {config.name} is a {model_type or 'model without a model_type'!r}; model.host "
                         "llama trains Llama and Qwen2 models (and LLaMA-Omni / LLaMA-Omni2 checkpoints)")


def load_llm(config: ModelConfig, device: torch.device) -> nn.Module:
    """The `LlamaForCausalLM` / `Qwen2ForCausalLM` of `config` (eval mode; on the meta device: the
    architecture only, nothing read or allocated). A LLaMA-Omni folder loads its LLM (`llm_config`)."""
    dtype = config.torch_dtype()
    if config.name in TINY_LLMS:
        with torch.device(device):  # the meta device too: an FSDP rank > 0 holds no weights
            return tiny_llm(TINY_LLMS[config.name], seed=config.seed, dtype=dtype, **config.tiny)
    model_cls, llm = llm_config(_raw_config(config))
    if device.type == "meta":
        from transformers import AutoModelForCausalLM

        # as from_pretrained builds it: buffers (RoPE's inv_freq) float32 whatever the dtype; FSDP ranks > 0
        # receive rank 0's buffers, which must match them
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(llm, dtype=dtype).eval()
    try:
        return model_cls.from_pretrained(config.name, config=llm, dtype=dtype).to(device).eval()
    except (OSError, ValueError, RuntimeError) as e:  # RuntimeError: weights of other shapes
        raise ValueError(f"model.name: cannot load {config.name!r} with transformers ({str(e).splitlines()[0]})") \
            from None


def load_llm_tokenizer(config: ModelConfig):
    """The model's tokenizer (`AutoTokenizer`), None for a tiny model (it has none: token files only)."""
    from transformers import AutoTokenizer

    if config.name in TINY_LLMS:
        return None
    try:
        return AutoTokenizer.from_pretrained(config.name)
    except (OSError, ValueError) as e:
        raise ValueError(f"model.name: cannot load the tokenizer of {config.name!r} ({str(e).splitlines()[0]})") \
            from None


def _raw_config(config: ModelConfig) -> dict:
    """config.json of the folder or hub id (the HF cache's copy; fetched when the hub is reachable)."""
    if Path(config.name).is_dir():
        path = Path(config.name) / "config.json"
    else:
        from huggingface_hub import hf_hub_download

        from ..hub import LIBRARY, hub_failure

        try:
            path = Path(hf_hub_download(config.name, "config.json", library_name=LIBRARY))
        except Exception as e:  # noqa: BLE001 - the hub's failures are explained, anything else is re-raised
            reason = hub_failure(e, config.name, filename="config.json")
            if reason is None:
                raise
            raise ValueError(f"model.name: {reason} (`hf download {config.name}` fetches it; or give a transformers "
                             "checkpoint folder)") from None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"model.name: cannot read {path} ({e})") from None
