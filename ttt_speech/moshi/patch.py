"""`patch_moshi`: TTT layers in the temporal transformer of a moshi `LMModel` (its `HostSpec`).

The depformer (over codebooks) is never touched. Hybrid TTT layers go right after a layer's
attention residual, E2E layers (`e2e_mlp`) beside its feed-forward block (`ttt_speech.moshi.e2e`).
"""
from __future__ import annotations

from torch import Tensor, nn

from . import _import  # noqa: F401
from moshi.models.lm import LMModel
from moshi.modules.transformer import StreamingMultiheadAttention, StreamingTransformerLayer

from ..config import TTTConfig
from ..host import HostSpec, patch_host
from ..modules import TTTModule
from ..report import PatchReport
from .e2e import MoshiE2E
from .internals import AttentionBranchLayer, FeedForwardBranchLayer, forget_streaming_children
from .streaming import MoshiTTT

HYBRID_LAYERS = {"attention": AttentionBranchLayer, "feed_forward": FeedForwardBranchLayer}


def transformer_layers(lm: nn.Module) -> list[nn.Module]:
    """Every transformer layer of `lm`, temporal and depformer (the units of sharded training,
    as moshi-finetune wraps them)."""
    return [m for m in lm.modules() if isinstance(m, StreamingTransformerLayer)]


def _check(lm: nn.Module, config: TTTConfig) -> None:
    if not isinstance(lm, LMModel):
        raise TypeError(f"patch_moshi: expected a moshi LMModel, got {type(lm).__name__}")


def _wrap(core: nn.Module, layer_index: int, replaces_attention: bool) -> TTTModule:
    return MoshiE2E(core) if core.config.is_e2e else MoshiTTT(core)  # moshi calls self_attn(x, x, x): both fit


def _projections(attention: StreamingMultiheadAttention, width: int) -> tuple[Tensor, ...] | None:
    """Wq, Wk, Wv, Wo of a plain attention (one fused in-projection, no grouped-query attention)."""
    in_proj, out_proj = attention.in_projs[0], attention.out_projs[0]
    plain = (len(attention.in_projs) == 1 and attention.kv_repeat == 1 and type(in_proj) is nn.Linear
             and type(out_proj) is nn.Linear and in_proj.weight.shape == (3 * width, width))
    return (*in_proj.weight.chunk(3, dim=0), out_proj.weight) if plain else None


def _finish(lm: nn.Module, indices: list[int], config: TTTConfig) -> None:
    forget_streaming_children(lm)  # the new modules must join `lm.streaming(B)`


SPEC = HostSpec(
    name="moshi",
    layers=lambda lm: lm.transformer.layers,
    width=lambda lm: lm.dim,
    heads=lambda lm, layer: layer.self_attn.num_heads,
    wrap=_wrap,
    hybrid_layer=lambda cls, placement: HYBRID_LAYERS[placement],
    norms={"attention": "norm1", "feed_forward": "norm2"},
    attention_projections=_projections,
    check=_check,
    finish=_finish,
)


def patch_moshi(lm: LMModel, config: TTTConfig) -> PatchReport:
    """Insert TTT layers into `lm.transformer` in place (see `ttt_speech.host.patch_host`).

    "replace": `layers[i].self_attn` becomes a TTT layer. "hybrid": attention is kept and
    `x + tanh(α)·TTT(norm(x))` follows its residual (e2e_mlp: the gated MLP beside the feed-forward
    block); with gate_init = 0 the outputs are exactly the unpatched model's. Returns the
    `PatchReport` (also logged); `TTTModel.of(lm)` is the handle on the result.
    """
    return patch_host(lm, config, SPEC)
