"""Every use of moshi's private names and of the fields of its state objects, in one module
(docs/architecture.md §7).

Read from moshi 0.2.13. Each access says what it relies on and why there is no public route; a
moshi upgrade means reading this file (and running tests/test_moshi.py, test_eval_nll.py,
test_generate.py), not the whole project. Nothing else in ttt-speech uses an underscore name of
moshi (`tests/test_architecture.py` checks it) or reads a field moshi's own state classes define
(`_LMGenState`, `_MHAState`, ...) beyond the public `exec_mask`. Two uses elsewhere lean on
LMGen's behaviour through public names only, documented where they are: `SamplingLMGen` (in
`generation/session.py`) overrides `depformer_step` and adds its own per-step buffers to the state
its `new_streaming_state` returns.

What is here:

- streaming hooks: `StreamingModule._init_streaming_state` / `._streaming_state` (`StreamingHooks`);
- the hybrid layers: `StreamingTransformerLayer._sa_block` / `._ff_block` overrides;
- the delay pattern: `LMModel._get_initial_token`, `lm_utils._delay_sequence` / `_undelay_sequence`;
- attention caches: `_streaming_state.kv_cache` (`RingKVCache`) widened and detached;
- `StreamingModule._cached_children`, rebuilt after patching;
- `LMGen._step` (the step's transformer output), `_LMGenState.offsets` / `.graphed_depth`;
- the fields of moshi's `State` dataclasses, flattened to tensors to save a live stream;
- `loaders._lm_kwargs`, Moshi-7B's architecture (for memory tables built on the meta device);
- the stages of Mimi's quantizer and their `_codebook` buffers (`fit_mimi_codebooks`, the seeded random Mimi).
"""
from __future__ import annotations

import dataclasses
from contextlib import ExitStack
from typing import Any, Callable, Mapping

import torch
from torch import Tensor, nn

from . import _import  # noqa: F401
from moshi.models import lm_utils
from moshi.models.lm import LMGen, LMModel
from moshi.modules.streaming import StreamingModule
from moshi.modules.transformer import RingKVCache, StreamingMultiheadAttention, StreamingTransformerLayer
from moshi.utils.compile import CUDAGraphed


# ---------------------------------------------------------------- streaming hooks


class StreamingHooks:
    """Public names for the streaming hooks of a moshi `StreamingModule` subclass (mixed in first).

    `new_streaming_state(batch_size)` builds the module's state (default: the parent class's);
    `streaming_state` is the live one (None outside `module.streaming(B)`).
    """

    def _init_streaming_state(self, batch_size: int) -> Any:
        # moshi 0.2.13: `StreamingModule.streaming()` builds each module's state by calling this
        # abstract method; overriding it is the only way to give a module a state of its own.
        return self.new_streaming_state(batch_size)

    def new_streaming_state(self, batch_size: int) -> Any:
        return super()._init_streaming_state(batch_size)  # moshi 0.2.13: the parent's (e.g. LMGen's) state

    @property
    def streaming_state(self) -> Any:
        # moshi 0.2.13: the live state is the attribute `_streaming_state` (no public getter; the
        # public `get_streaming_state()` walks every child instead)
        return self._streaming_state

    @streaming_state.setter
    def streaming_state(self, state: Any) -> None:
        self._streaming_state = state  # moshi 0.2.13: as `StreamingModule._start_streaming` sets it


def streaming_state(module: nn.Module) -> Any:
    """The live streaming state of any moshi module (None when it is not streaming)."""
    return getattr(module, "_streaming_state", None)  # moshi 0.2.13: see `StreamingHooks.streaming_state`


def forget_streaming_children(root: nn.Module) -> None:
    """Rebuild moshi's cached list of streaming children after modules were inserted (patching)."""
    for module in root.modules():
        if isinstance(module, StreamingModule):
            # moshi 0.2.13: `_apply_named_streaming` caches each module's streaming children on first use and
            # never looks again; patched-in modules would not be streamed. No public invalidation exists.
            module._cached_children = None


# ---------------------------------------------------------------- hybrid layers


class AttentionBranchLayer(StreamingTransformerLayer):
    """moshi's transformer layer with `ttt_branch` right after the attention residual.

    moshi computes the attention residual inside `_sa_block`, so the branch can only go after it by
    overriding that method: patched layers get this class (their `__class__` is switched), which
    keeps moshi's own forward, streaming state and parameter names.
    """

    ttt_branch: nn.Module

    def _sa_block(self, x: Tensor) -> Tensor:
        # moshi 0.2.13: `StreamingTransformerLayer.forward` calls `_sa_block(x)` = x + attn(norm1(x)); it is the
        # only point where the residual stream after attention is reachable
        return self.ttt_branch(super()._sa_block(x))


class FeedForwardBranchLayer(StreamingTransformerLayer):
    """moshi's transformer layer with `ttt_branch`'s residual added beside its feed-forward block
    (E2E: y = x + FFN(norm2(x)) + tanh(α)·MLP_W(norm(x)))."""

    ttt_branch: nn.Module

    def _ff_block(self, x: Tensor) -> Tensor:
        # moshi 0.2.13: `_ff_block(x)` = x + FFN(norm2(x)), called by `forward` after attention
        return super()._ff_block(x) + self.ttt_branch.residual(x)


# ---------------------------------------------------------------- the delay pattern


def initial_token(lm: LMModel) -> Tensor:
    """The token `LMModel.forward` prepends to every stream, [1, K, 1]."""
    return lm._get_initial_token()  # moshi 0.2.13: no public accessor; LMModel.forward and LMGen use it


def delay_sequence(lm: LMModel, codes: Tensor, padding: Tensor) -> Tensor:
    """codes [B, K, T] shifted by `lm.delays`, `padding` [B, K, 1] filling the gaps (as `LMModel.forward`)."""
    return lm_utils._delay_sequence(lm.delays, codes, padding)  # moshi 0.2.13: the helper LMModel.forward uses


def undelay_sequence(delays: list[int], tensor: Tensor, fill_value: float) -> tuple[Tensor, Tensor]:
    """Inverse of the delays on [B, K, T, ...] → (values, mask of the positions that exist)."""
    return lm_utils._undelay_sequence(delays, tensor, fill_value=fill_value)  # moshi 0.2.13: as LMModel.forward


# ---------------------------------------------------------------- attention caches


def _attention_caches(lm: LMModel) -> list[tuple[StreamingMultiheadAttention, Any]]:
    """(attention module, its live state) of every streaming self-attention of the temporal transformer."""
    out = []
    for module in lm.transformer.modules():
        state = streaming_state(module)
        if isinstance(module, StreamingMultiheadAttention) and state is not None:
            out.append((module, state))
    return out


def attention_context(lm: LMModel) -> int | None:
    """Steps moshi's temporal attention sees (None when every attention layer was replaced)."""
    for module in lm.transformer.modules():
        if isinstance(module, StreamingMultiheadAttention) and not module.cross_attention:
            return module.context
    return None


def stream_position(lm: LMModel) -> int:
    """Steps the streaming temporal transformer has seen (its first attention's offset); -1 when unknown."""
    state = streaming_state(lm.transformer.layers[0].self_attn)
    # moshi 0.2.13: `_MHAState.offset` [B] counts the steps an attention has seen; no public accessor
    return int(state.offset[0]) if state is not None and hasattr(state, "offset") else -1


def widen_kv_caches(lm: LMModel, chunk_size: int) -> None:
    """Make a streaming `lm`'s attention caches hold `context + chunk_size - 1` steps.

    moshi sizes each ring KV cache to exactly `context` steps, which is right one step at a time
    (`LMGen`) but not for chunks: once a stream is longer than `context`, writing a chunk of S
    steps overwrites keys that the chunk's first S − 1 queries still attend to, so they see a
    window up to S − 1 steps short (measured: NLL off by ~1 nat on a tiny model with context 16).
    The attention mask still limits every query to `context` steps, so a wider cache gives
    exactly the outputs of one full pass / of `LMGen`. Call inside `lm.streaming(B)`, before the
    first chunk (the caches are replaced, empty).
    """
    for module, state in _attention_caches(lm):
        # moshi 0.2.13: `_MHAState.kv_cache` is a `RingKVCache` sized in `_init_streaming_state` from
        # `context`, with no option to size it for chunks: the only route is to swap it for a wider one
        old = state.kv_cache
        if module.context is None or not isinstance(old, RingKVCache) or old.capacity >= module.context + chunk_size - 1:
            continue
        _, B, H, _, D = old.cache.shape
        state.kv_cache = RingKVCache(B, H, D, module.context + chunk_size - 1, respect_exec_mask=old.respect_exec_mask,
                                     device=old.cache.device, dtype=old.cache.dtype)


def detach_kv_caches(lm: LMModel) -> None:
    """Cut the attention caches from the autograd graph (E2E updates write them with grad enabled)."""
    for _, state in _attention_caches(lm):
        cache = state.kv_cache  # moshi 0.2.13: `RingKVCache.cache` [2, B, H, capacity, D], written in place
        if isinstance(cache, RingKVCache) and cache.cache.requires_grad:
            cache.cache = cache.cache.detach()


# ---------------------------------------------------------------- LMGen


def step_with_transformer_output(gen: LMGen, user: Tensor, replace: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """One `LMGen` step → (tokens [B, K, 1], the step's temporal-transformer output [B, 1, C]).

    The gen must be built with `support_out_of_sync=True` (then the first max_delay steps return too).
    """
    # moshi 0.2.13: `LMGen.step` returns only the tokens; `_step` also returns the transformer output, which
    # scoring the depformer teacher-forced needs (`forward_depformer_training` on that output)
    out = gen._step(user, depformer_replace_tokens=replace)
    if out is None:
        raise RuntimeError("LMGen._step returned nothing: build the LMGen with support_out_of_sync=True")
    return out


def lmgen_offsets(gen: LMGen) -> list[int]:
    """Steps each row of a streaming `LMGen` has executed."""
    return streaming_state(gen).offsets.tolist()  # moshi 0.2.13: `_LMGenState.offsets` [B] int64


def reset_depformer_graph(gen: LMGen) -> None:
    """Drop the CUDA graph captured around `depformer_step` (it bakes in Python-level settings)."""
    state = streaming_state(gen)  # moshi 0.2.13: `_LMGenState.graphed_depth` is the `CUDAGraphed` of depformer_step
    if state.graphed_depth is not None and not state.graphed_depth.disable:
        state.graphed_depth.reset()


# ---------------------------------------------------------------- Moshi-7B's architecture


def moshi_7b_lm(device: torch.device | str = "meta", dtype: torch.dtype = torch.bfloat16) -> LMModel:
    """Moshi-7B's `LMModel`, random or (by default) unallocated on the meta device."""
    from moshi.models import loaders

    # moshi 0.2.13: `loaders._lm_kwargs` are the kwargs of the released Moshi-7B checkpoints (their
    # config.json repeats them); no public name holds them without downloading a checkpoint.
    return LMModel(device=device, dtype=dtype, **loaders._lm_kwargs)


# ---------------------------------------------------------------- Mimi's codebooks


@torch.no_grad()
def fit_mimi_codebooks(mimi: nn.Module, latent: Tensor, centroids: Callable[[Tensor, int], Tensor]) -> None:
    """Set the codebook of every active residual stage of `mimi`'s quantizer, stage after stage:
    `centroids(x, bins)` → [bins, D] from the stage's inputs x [N, D] (the residuals the stages
    before it leave), `latent` [1, C, N] being Mimi's unquantized encoder output."""
    # moshi 0.2.13: Mimi's quantizer is a `SplitResidualVectorQuantizer`: `rvq_first` (n_q_semantic
    # stages) then `rvq_rest`, each a `ResidualVectorQuantizer` with `input_proj`, `bins` and
    # `vq.layers` (`VectorQuantization`: `project_in`, `encode`, `decode`). No public walk of the stages.
    quantizer = mimi.quantizer
    stages = ((quantizer.rvq_first, quantizer.n_q_semantic),
              (quantizer.rvq_rest, mimi.num_codebooks - quantizer.n_q_semantic))
    for rvq, count in stages:
        residual = rvq.input_proj(latent)  # [1, D, N]
        for layer in rvq.vq.layers[:count]:
            x = layer.project_in(residual.transpose(1, 2))[0]  # [N, D], as the codebook sees them
            _set_codebook(layer, centroids(x, rvq.bins))
            residual = residual - layer.decode(layer.encode(residual))


def _set_codebook(layer: nn.Module, centroids: Tensor) -> None:
    """Make `centroids` [bins, D] the codebook of one Mimi quantizer stage (a `VectorQuantization`)."""
    # moshi 0.2.13: `VectorQuantization._codebook` (`EuclideanCodebook`) stores its centroids as the
    # buffers `embedding_sum` / `cluster_usage` (centroid = sum / usage) with the flag `_initialized`,
    # and caches `embedding` in `_embedding` (and the flag in `_cached_initialized`) on first use.
    # Only its training forward (k-means, then EMA) sets them; no public setter exists.
    codebook = layer._codebook
    if tuple(centroids.shape) != tuple(codebook.embedding_sum.shape):
        raise ValueError(f"fit_mimi_codebooks: expected centroids {tuple(codebook.embedding_sum.shape)}, "
                         f"got {tuple(centroids.shape)}")
    codebook.embedding_sum.copy_(centroids)
    codebook.cluster_usage.fill_(1.0)
    codebook._initialized.fill_(1.0)
    codebook._embedding = None
    codebook._cached_initialized = False


# ---------------------------------------------------------------- live state ↔ tensors

# Fields of moshi states that are structure, not data: skipped when saving.
_STRUCTURE = (torch.device, CUDAGraphed, ExitStack)


def _fields(name: str, state: Any) -> list[tuple[str, Any]]:
    # moshi 0.2.13: every streaming state is a `State` dataclass (plus `exec_mask`, set in __post_init__);
    # its fields are the data. States may name fields that are saved apart (`saved_apart`, the TTT state).
    apart = set(getattr(state, "saved_apart", ()))
    items = [(f.name, getattr(state, f.name)) for f in dataclasses.fields(state)
             if f.name != "batch_size" and f.name not in apart]
    items.append(("exec_mask", state.exec_mask))
    check = getattr(state, "check_saveable", None)
    if check is not None:
        check(name)
    return items


def _key(prefix: str, module: str, field: str) -> str:
    return f"{prefix}{module}.{field}" if module else f"{prefix}{field}"


def _host_copy(tensor: Tensor) -> Tensor:
    """A CPU copy; a meta tensor (an architecture built without memory) as it is: its shape and dtype
    size a state that is never allocated (docs/serve.md's Moshi-7B session size)."""
    return tensor.detach() if tensor.is_meta else tensor.detach().to("cpu", copy=True).contiguous()


def moshi_states_to_tensors(states: Mapping[str, Any], prefix: str) -> dict[str, Tensor]:
    """{module name: moshi State} (e.g. `module.get_streaming_state()`) → flat {prefix + module.field: tensor}.

    Tensor fields (KV caches, offsets, token caches, conv buffers) are copied to the CPU, int / bool
    fields (host-side counters) become 0-d tensors, structure (device, CUDA-graph wrappers, exit
    stacks, callbacks) is skipped; anything else is refused, so a moshi version with a new kind of
    state cannot be saved incompletely.
    """
    out: dict[str, Tensor] = {}
    for module, state in states.items():
        for field, value in _fields(module, state):
            key = _key(prefix, module, field)
            if isinstance(value, Tensor):
                out[key] = _host_copy(value)
            elif isinstance(value, bool):
                out[key] = torch.tensor(value)
            elif isinstance(value, int):
                out[key] = torch.tensor(value, dtype=torch.int64)
            elif isinstance(value, RingKVCache):  # moshi 0.2.13: its data is `cache` and `end_offset`
                out[f"{key}.cache"] = _host_copy(value.cache)
                out[f"{key}.end_offset"] = _host_copy(value.end_offset)
            elif value is None or isinstance(value, _STRUCTURE) or callable(value):
                continue
            else:
                raise ValueError(f"cannot save the streaming state of {module or 'the model'}: field "
                                 f"{field!r} holds a {type(value).__name__}, which this version does not know")
    return out


def load_moshi_states(states: Mapping[str, Any], tensors: Mapping[str, Tensor], prefix: str, where: str) -> None:
    """Copy what `moshi_states_to_tensors` returned back into live states of the same layout, *in place*
    (CUDA graphs captured on the live buffers stay valid); every tensor under `prefix` must be used."""
    used: set[str] = set()

    def take(key: str, like: Tensor) -> Tensor:
        if key not in tensors:
            raise ValueError(f"{where}: missing {key} (saved from a different model or configuration?)")
        value = tensors[key]
        if tuple(value.shape) != tuple(like.shape):
            raise ValueError(f"{where}: {key} has shape {tuple(value.shape)}, the live stream has "
                             f"{tuple(like.shape)} (different batch size or model?)")
        used.add(key)
        return value.to(device=like.device, dtype=like.dtype)

    for module, state in states.items():
        for field, value in _fields(module, state):
            key = _key(prefix, module, field)
            with torch.no_grad():
                if isinstance(value, Tensor):
                    value.copy_(take(key, value))
                elif isinstance(value, bool):
                    setattr(state, field, bool(take(key, torch.tensor(value))))
                elif isinstance(value, int):
                    setattr(state, field, int(take(key, torch.tensor(value, dtype=torch.int64))))
                elif isinstance(value, RingKVCache):
                    value.cache.copy_(take(f"{key}.cache", value.cache))
                    value.end_offset.copy_(take(f"{key}.end_offset", value.end_offset))
    stray = sorted(k for k in tensors if k.startswith(prefix) and k not in used)
    if stray:
        raise ValueError(f"{where}: state for nothing in the live stream: {stray[:5]}"
                         f"{' ...' if len(stray) > 5 else ''} (saved from a different model?)")
