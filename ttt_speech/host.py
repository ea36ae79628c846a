"""Host specs and the one patch loop (docs/architecture.md §6).

A host model (moshi's `LMModel`, HF Llama / Qwen2) is described by a `HostSpec`: where its layers,
attention and norms are, how a TTT core is wrapped to be called by it, and which class a hybrid
layer switches to. `patch_host(model, config, spec)` does the rest the same way for every host;
adding a host is writing its spec (and its `TTTModule`), not copying the loop.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from importlib import import_module
from typing import Callable, Mapping

import torch
from torch import Tensor, nn

from .config import TTTConfig
from .e2e import E2EMLP
from .handle import TTTModel
from .layer import TTTLayer, count_parameters
from .modules import GatedTTTBranch, TTTModule
from .report import PatchReport

logger = logging.getLogger(__name__)

Projections = tuple[Tensor, Tensor, Tensor, Tensor]


def _accept(model: nn.Module, config: TTTConfig) -> None:
    pass


def _nothing(model: nn.Module, indices: list[int], config: TTTConfig) -> None:
    pass


@dataclass(frozen=True)
class HostSpec:
    """What the patch loop needs to know about a host.

    name: recorded in exports (`save_ttt`), e.g. "moshi".
    layers(model): the decoder layers TTT may join (`TTTConfig.layers` indexes them).
    width(model): the model width C.
    heads(model, layer): the layer's attention heads, TTT's head count unless `num_heads` is set.
    wrap(core, layer_index, replaces_attention): the host's `TTTModule` around a core.
    hybrid_layer(layer_class, placement): the class a hybrid layer switches to, which inserts
        `layer.ttt_branch` at `placement` ("attention": after the attention residual;
        "feed_forward": beside the feed-forward block, E2E).
    norms: placement → name of the layer's norm the branch's own norm starts as a copy of.
    attention_projections(attention, width): its (Wq, Wk, Wv, Wo) [C, C] for `init_from_attention`,
        None when its layout has no such square projections (grouped-query attention, biases).
    check(model, config): raise ValueError / TypeError for what this host cannot take.
    finish(model, indices, config): host bookkeeping after the layers are patched.
    attention: the attribute of a layer that holds its attention ("replace" swaps it).
    """

    name: str
    layers: Callable[[nn.Module], nn.ModuleList]
    width: Callable[[nn.Module], int]
    heads: Callable[[nn.Module, nn.Module], int]
    wrap: Callable[[nn.Module, int, bool], TTTModule]
    hybrid_layer: Callable[[type, str], type]
    norms: Mapping[str, str]
    attention_projections: Callable[[nn.Module, int], Projections | None]
    check: Callable[[nn.Module, TTTConfig], None] = _accept
    finish: Callable[[nn.Module, list[int], TTTConfig], None] = _nothing
    attention: str = "self_attn"


def patch_host(model: nn.Module, config: TTTConfig, spec: HostSpec) -> PatchReport:
    """Insert TTT layers into `model`'s layers in place, as `config` says; returns the `PatchReport`.

    "replace": the layer's attention becomes the TTT module. "hybrid": the layer's class is switched
    to `spec.hybrid_layer(...)`, which adds a `GatedTTTBranch` (norm copied from the layer's); with
    gate_init = 0 the model's outputs are exactly the host's. New modules take the device, dtype and
    train/eval mode of the layer they join. The patch is recorded for `TTTModel.of(model)`.
    """
    where = f"patch_{spec.name}"
    if TTTModel.find(model) is not None:
        raise ValueError(f"{where}: this model is already patched with TTT layers")
    spec.check(model, config)
    layers = spec.layers(model)
    indices = config.resolve_layers(len(layers))
    width = spec.width(model)
    params_before = count_parameters(model)
    removed = 0
    inserted: list[nn.Module] = []  # per patched layer: what the patch added (its parameters are TTT's)
    for i in indices:
        layer = layers[i]
        ref = next(layer.parameters())
        kw = {"device": ref.device, "dtype": ref.dtype}
        if config.is_e2e:
            core: nn.Module = E2EMLP(width, config, **kw)
        else:
            core = TTTLayer(width, config, num_heads=config.num_heads or spec.heads(model, layer), **kw)
        ttt = spec.wrap(core, i, config.mode == "replace").train(layer.training)
        if config.mode == "replace":
            attention = getattr(layer, spec.attention)
            if config.init_from_attention:
                _copy_projections(spec.attention_projections(attention, width), core)
            removed += count_parameters(attention)
            setattr(layer, spec.attention, ttt)
            inserted.append(ttt)
        else:
            norm = copy.deepcopy(getattr(layer, spec.norms[config.placement]))
            layer.__class__ = spec.hybrid_layer(type(layer), config.placement)
            layer.ttt_branch = GatedTTTBranch(norm, ttt, width, config.gate_init, **kw).train(layer.training)
            inserted.append(layer.ttt_branch)
    spec.finish(model, indices, config)
    per_layer = count_parameters(inserted[0])
    report = PatchReport(host=spec.name, mode=config.mode, layer_type=config.layer_type, layers=indices,
                         depth=len(layers), width=width, num_heads=core.num_heads, head_dim=core.head_dim,
                         mini_batch_size=config.mini_batch_size, params_per_layer=per_layer,
                         params_added=per_layer * len(indices), params_removed=removed,
                         params_before=params_before, params_after=count_parameters(model))
    TTTModel.attach(model, spec.name, config, report)
    logger.info("patched %s (%s) with TTT layers:\n%s", type(model).__name__, spec.name, report)
    return report


def _copy_projections(projections: Projections | None, core: nn.Module) -> None:
    """Start the TTT core's Q/K/V/O from the replaced attention's (a starting point: RoPE differs)."""
    if projections is None:
        logger.warning("init_from_attention: attention layout not supported (no square Q/K/V/O projections), "
                       "keeping random init")
        return
    wq, wk, wv, wo = projections
    with torch.no_grad():
        core.qkv_proj.weight.copy_(torch.cat((wq, wk, wv)))
        core.o_proj.weight.copy_(wo)


# host name (as recorded in exports) → the module whose `SPEC` describes it, imported when needed
HOSTS = {
    "moshi": "ttt_speech.moshi.patch",
    "llama": "ttt_speech.llama.patch",  # HF Llama / Qwen2 (LLaMA-Omni 1 / 2)
}


def host_spec(name: str, where: str) -> HostSpec:
    """The `HostSpec` of a host named in an export (`where` names the file in errors)."""
    if name not in HOSTS:
        raise ValueError(f"{where}: unknown host {name!r}; expected one of {sorted(HOSTS)}")
    return import_module(HOSTS[name]).SPEC
