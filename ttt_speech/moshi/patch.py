"""`patch_moshi`: put TTT layers into the temporal transformer of a moshi `LMModel`."""
from __future__ import annotations

import copy
import logging
from typing import Iterator

import torch
from torch import nn

from . import _import  # noqa: F401
from moshi.models.lm import LMModel
from moshi.modules.streaming import StreamingModule
from moshi.modules.transformer import StreamingMultiheadAttention

from ..config import TTTConfig
from ..e2e import E2EMLP
from ..layer import TTTLayer, count_parameters
from ..report import PatchReport, finish_patch
from .e2e import MoshiE2E, TTTE2ETransformerLayer
from .streaming import GatedTTTBranch, MoshiTTT, TTTHybridTransformerLayer

logger = logging.getLogger(__name__)


def patch_moshi(lm: LMModel, config: TTTConfig) -> PatchReport:
    """Insert TTT layers into `lm.transformer` in place (the depformer is never touched).

    "replace": `layers[i].self_attn` becomes a TTT layer. "hybrid": attention is kept and
    `x + tanh(α)·TTT(norm(x))` follows its residual; with gate_init = 0 the outputs are exactly
    the unpatched model's. layer_type "e2e_mlp" (hybrid only): a gated `E2EMLP` beside the
    feed-forward block, updated by the model's loss (`ttt_speech.moshi.e2e`). New modules take the device and dtype of the layer they join.
    Returns a `PatchReport` (also logged); `lm.ttt_config` / `lm.ttt_report` record the patch.
    """
    if not isinstance(lm, LMModel):
        raise TypeError(f"patch_moshi: expected a moshi LMModel, got {type(lm).__name__}")
    if getattr(lm, "ttt_config", None) is not None:
        raise ValueError("patch_moshi: this model is already patched with TTT layers")
    layers = lm.transformer.layers
    indices = config.resolve_layers(len(layers))
    params_before = count_parameters(lm)
    removed = 0
    width = lm.dim
    for i in indices:
        layer = layers[i]
        attn = layer.self_attn
        ref = next(layer.parameters())
        kw = {"device": ref.device, "dtype": ref.dtype}
        if config.layer_type == "e2e_mlp":  # TTT-E2E: beside the feed-forward block
            ttt = MoshiE2E(E2EMLP(width, config, **kw)).train(layer.training)
            hybrid_class, norm = TTTE2ETransformerLayer, layer.norm2
        else:
            ttt = MoshiTTT(TTTLayer(width, config, num_heads=config.num_heads or attn.num_heads, **kw))
            ttt.train(layer.training)
            hybrid_class, norm = TTTHybridTransformerLayer, layer.norm1
        if config.mode == "replace":
            if config.init_from_attention:
                _copy_attention_projections(attn, ttt.layer)
            removed += count_parameters(attn)
            layer.self_attn = ttt
        else:
            layer.__class__ = hybrid_class
            layer.ttt_branch = GatedTTTBranch(copy.deepcopy(norm), ttt, width, config.gate_init, **kw)
            layer.ttt_branch.train(layer.training)
    _forget_streaming_children(lm)
    per_layer = count_parameters(next(iter(ttt_modules(lm))))
    report = finish_patch("moshi", lm, config, indices, len(layers), width, ttt.layer, per_layer,
                          params_before, removed)
    logger.info("patched moshi LMModel with TTT layers:\n%s", report)
    return report


def ttt_modules(model: nn.Module) -> Iterator[nn.Module]:
    """The per-layer TTT modules added by a patch (hybrid: the gated branch, replace: the layer)."""
    branches = [m for m in model.modules() if isinstance(m, GatedTTTBranch)]
    in_branch = {id(b.ttt) for b in branches}
    yield from branches
    yield from (m for m in model.modules() if isinstance(m, MoshiTTT) and id(m) not in in_branch)


def _copy_attention_projections(attn: StreamingMultiheadAttention, layer: TTTLayer) -> None:
    """Start TTT's Q/K/V/O from a plain (single-projection, no-GQA) attention's weights."""
    in_proj, out_proj = attn.in_projs[0], attn.out_projs[0]
    plain = (len(attn.in_projs) == 1 and attn.kv_repeat == 1 and type(in_proj) is nn.Linear
             and type(out_proj) is nn.Linear and in_proj.weight.shape == (3 * layer.dim, layer.dim))
    if not plain:
        logger.warning("init_from_attention: attention layout not supported, keeping random init")
        return
    with torch.no_grad():
        q, k, v = in_proj.weight.chunk(3, dim=0)
        layer.q_proj.weight.copy_(q)
        layer.k_proj.weight.copy_(k)
        layer.v_proj.weight.copy_(v)
        layer.o_proj.weight.copy_(out_proj.weight)


def _forget_streaming_children(root: nn.Module) -> None:
    """moshi caches each streaming module's list of streaming children: rebuild after patching."""
    for module in root.modules():
        if isinstance(module, StreamingModule):
            module._cached_children = None
