"""`patch_llama`: TTT layers in a transformers `LlamaForCausalLM` / `Qwen2ForCausalLM` (its `HostSpec`)."""
from __future__ import annotations

from torch import Tensor, nn

from . import _import  # noqa: F401
from transformers.models.llama.modeling_llama import LlamaDecoderLayer
from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer

from ..config import TTTConfig
from ..host import HostSpec, patch_host
from ..modules import TTTModule
from ..report import PatchReport
from .cache import TTTPlan
from .modules import (LlamaTTT, LlamaTTTAttention, TTTCheckpointMixin, TTTHybridDecoderMixin, TTTModelMixin,
                      with_mixin)

# LLaMA-Omni's LLM is a Llama, LLaMA-Omni2's a Qwen2 (Qwen2.5); both decoder layers share one layout.
SUPPORTED_LAYERS = (LlamaDecoderLayer, Qwen2DecoderLayer)


def decoder_stack(model: nn.Module) -> nn.Module:
    """The module holding `.layers` (decoder layers) and `.config`: `model.model` or `model`."""
    for candidate in (getattr(model, "model", None), model):
        if isinstance(candidate, nn.Module) and isinstance(getattr(candidate, "layers", None), nn.ModuleList) \
                and hasattr(candidate, "config"):
            return candidate
    raise TypeError(f"patch_llama: expected a transformers Llama / Qwen2 model, got {type(model).__name__}")


def _check(model: nn.Module, config: TTTConfig) -> None:
    if config.is_e2e:
        raise ValueError("patch_llama: layer_type e2e_mlp is implemented for Moshi only (ttt_speech.moshi.e2e)")
    stack = decoder_stack(model)
    if any(isinstance(layer, TTTCheckpointMixin) for layer in stack.layers):
        raise ValueError("patch_llama: the decoder layers are already checkpointed (checkpoint_layers); patch first, "
                         "then call checkpoint_layers")
    bad = [type(layer).__name__ for layer in stack.layers if not isinstance(layer, SUPPORTED_LAYERS)]
    if bad:
        raise TypeError(f"patch_llama: unsupported decoder layer {bad[0]}; expected "
                        f"{' or '.join(c.__name__ for c in SUPPORTED_LAYERS)}")


def _wrap(core: nn.Module, layer_index: int, replaces_attention: bool) -> TTTModule:
    return (LlamaTTTAttention if replaces_attention else LlamaTTT)(core, layer_idx=layer_index)


def _projections(attention: nn.Module, width: int) -> tuple[Tensor, ...] | None:
    """Wq, Wk, Wv, Wo when they are square and bias-free (no grouped-query attention)."""
    projs = [getattr(attention, n, None) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
    square = all(isinstance(p, nn.Linear) and p.bias is None and p.weight.shape == (width, width) for p in projs)
    return tuple(p.weight for p in projs) if square else None


def _finish(model: nn.Module, indices: list[int], config: TTTConfig) -> None:
    """The decoder stack gives every forward a `TTTCache` and tells the TTT layers about padding."""
    stack = decoder_stack(model)
    stack.__class__ = with_mixin(TTTModelMixin, type(stack))
    stack.ttt_plan = TTTPlan(depth=len(stack.layers), ttt_layers=tuple(indices),
                             replaced=tuple(indices) if config.mode == "replace" else ())


SPEC = HostSpec(
    name="llama",
    layers=lambda model: decoder_stack(model).layers,
    width=lambda model: decoder_stack(model).config.hidden_size,
    heads=lambda model, layer: decoder_stack(model).config.num_attention_heads,
    wrap=_wrap,
    hybrid_layer=lambda cls, placement: with_mixin(TTTHybridDecoderMixin, cls),
    norms={"attention": "input_layernorm"},  # the branch's norm starts as the attention pre-norm (as Moshi's)
    attention_projections=_projections,
    check=_check,
    finish=_finish,
)


def patch_llama(model: nn.Module, config: TTTConfig) -> PatchReport:
    """Insert TTT layers into a HF Llama / Qwen2 model in place (see `ttt_speech.host.patch_host`).

    `model`: a `LlamaForCausalLM` / `Qwen2ForCausalLM` (or a model whose `.model` is their
    decoder stack, e.g. LLaMA-Omni's), or the decoder stack (`LlamaModel` / `Qwen2Model`) itself.
    "replace": `layers[i].self_attn` becomes a TTT layer. "hybrid": attention is kept and
    `x + tanh(α)·TTT(norm(x))` follows its residual; with gate_init = 0 the outputs are exactly
    the unpatched model's. The TTT state then lives in the cache (`TTTCache`, see
    `ttt_speech.llama.cache`). Returns the `PatchReport` (also logged); `TTTModel.of(model)` is the
    handle on the result.
    """
    return patch_host(model, config, SPEC)
