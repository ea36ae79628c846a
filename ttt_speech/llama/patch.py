"""`patch_llama`: put TTT layers into a transformers `LlamaForCausalLM` / `Qwen2ForCausalLM`."""
from __future__ import annotations

import copy
import logging
from typing import Iterator

import torch
from torch import nn

from . import _import  # noqa: F401
from transformers.models.llama.modeling_llama import LlamaDecoderLayer
from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer

from ..config import TTTConfig
from ..layer import TTTLayer, count_parameters
from ..report import PatchReport, finish_patch
from .cache import TTTPlan
from .modules import GatedTTTBranch, LlamaTTT, TTTHybridDecoderMixin, TTTModelMixin, with_mixin

logger = logging.getLogger(__name__)

# LLaMA-Omni's LLM is a Llama, LLaMA-Omni2's a Qwen2 (Qwen2.5); both decoder layers share one layout.
SUPPORTED_LAYERS = (LlamaDecoderLayer, Qwen2DecoderLayer)


def patch_llama(model: nn.Module, config: TTTConfig) -> PatchReport:
    """Insert TTT layers into a HF Llama / Qwen2 model in place.

    `model`: a `LlamaForCausalLM` / `Qwen2ForCausalLM` (or a model whose `.model` is their
    decoder stack, e.g. LLaMA-Omni's), or the decoder stack (`LlamaModel` / `Qwen2Model`) itself.
    "replace": `layers[i].self_attn` becomes a TTT layer. "hybrid": attention is kept and
    `x + tanh(α)·TTT(norm(x))` follows its residual; with gate_init = 0 the outputs are exactly
    the unpatched model's. New modules take the device and dtype of the layer they join.
    The TTT state then lives in the cache (`TTTCache`, see `ttt_speech.llama.cache`).
    Returns a `PatchReport` (also logged); `model.ttt_config` / `model.ttt_report` record the patch.
    """
    if config.layer_type == "e2e_mlp":
        raise ValueError("patch_llama: layer_type e2e_mlp is implemented for Moshi only (ttt_speech.moshi.e2e)")
    stack = _decoder_stack(model)
    if getattr(model, "ttt_config", None) is not None or isinstance(stack, TTTModelMixin):
        raise ValueError("patch_llama: this model is already patched with TTT layers")
    layers = stack.layers
    bad = [type(layer).__name__ for layer in layers if not isinstance(layer, SUPPORTED_LAYERS)]
    if bad:
        raise TypeError(f"patch_llama: unsupported decoder layer {bad[0]}; expected "
                        f"{' or '.join(c.__name__ for c in SUPPORTED_LAYERS)}")
    indices = config.resolve_layers(len(layers))
    hf = stack.config
    width, heads = hf.hidden_size, config.num_heads or hf.num_attention_heads
    params_before = count_parameters(model)
    removed = 0
    for i in indices:
        layer = layers[i]
        ref = next(layer.parameters())
        ttt = LlamaTTT(TTTLayer(width, config, num_heads=heads, device=ref.device, dtype=ref.dtype),
                       layer_idx=i).train(layer.training)
        if config.mode == "replace":
            if config.init_from_attention:
                _copy_attention_projections(layer.self_attn, ttt.layer)
            removed += count_parameters(layer.self_attn)
            layer.self_attn = ttt
        else:
            layer.__class__ = with_mixin(TTTHybridDecoderMixin, type(layer))
            # the branch's norm starts as a copy of the layer's attention pre-norm (as for Moshi)
            layer.ttt_branch = GatedTTTBranch(copy.deepcopy(layer.input_layernorm), ttt, width, config.gate_init,
                                              device=ref.device, dtype=ref.dtype).train(layer.training)
    stack.__class__ = with_mixin(TTTModelMixin, type(stack))
    stack.ttt_plan = TTTPlan(depth=len(layers), ttt_layers=tuple(indices),
                             replaced=tuple(indices) if config.mode == "replace" else ())
    per_layer = count_parameters(next(iter(ttt_modules(model))))
    report = finish_patch("llama", model, config, indices, len(layers), width, ttt.layer, per_layer,
                          params_before, removed)
    logger.info("patched %s with TTT layers:\n%s", type(model).__name__, report)
    return report


def ttt_modules(model: nn.Module) -> Iterator[nn.Module]:
    """The per-layer TTT modules added by a patch (hybrid: the gated branch, replace: the layer)."""
    branches = [m for m in model.modules() if isinstance(m, GatedTTTBranch)]
    in_branch = {id(b.ttt) for b in branches}
    yield from branches
    yield from (m for m in model.modules() if isinstance(m, LlamaTTT) and id(m) not in in_branch)


def _decoder_stack(model: nn.Module) -> nn.Module:
    """The module holding `.layers` (decoder layers) and `.config`: `model.model` or `model`."""
    for candidate in (getattr(model, "model", None), model):
        if isinstance(candidate, nn.Module) and isinstance(getattr(candidate, "layers", None), nn.ModuleList) \
                and hasattr(candidate, "config"):
            return candidate
    raise TypeError(f"patch_llama: expected a transformers Llama / Qwen2 model, got {type(model).__name__}")


def _copy_attention_projections(attn: nn.Module, layer: TTTLayer) -> None:
    """Start TTT's Q/K/V/O from the attention's projections when they are square and bias-free
    (no grouped-query attention). RoPE layouts differ, so this is a starting point, not a copy."""
    projs = [getattr(attn, n, None) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
    square = all(isinstance(p, nn.Linear) and p.bias is None and p.weight.shape == (layer.dim, layer.dim)
                 for p in projs)
    if not square:
        logger.warning("init_from_attention: attention layout not supported (grouped-query attention or "
                       "biases), keeping random init")
        return
    with torch.no_grad():
        for src, dst in zip(projs, (layer.q_proj, layer.k_proj, layer.v_proj, layer.o_proj)):
            dst.weight.copy_(src.weight)
