"""Saving and restoring live streaming state: moshi's modules, TTT, and the file that holds them.

A moshi `StreamingModule` keeps its state in a `State` dataclass (`module._streaming_state`).
`capture_states` flattens such states into named tensors: tensor fields (KV caches, offsets,
LMGen's token cache, conv buffers), int fields (host-side step counters) as 0-d tensors, and each
state's `exec_mask`. Fields that are structure rather than data (device, CUDA-graph wrappers,
exit stacks, callbacks) are skipped; anything else is refused loudly, so a moshi version with a new
kind of state cannot be saved incompletely. `restore_states` copies the values back *in place*
(CUDA graphs captured on the live buffers stay valid) and checks that every tensor was used.
The TTT state of `MoshiTTT` modules is left to `ttt_stream_state` / `load_ttt_stream_state`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open
from torch import Tensor, nn

from ..checkpoint import save_tensors_atomic
from ..moshi import _import  # noqa: F401
from moshi.modules.transformer import RingKVCache
from moshi.utils.compile import CUDAGraphed

from ..moshi.streaming import TTTStreamState

FORMAT = "ttt-speech-generation-state"
VERSION = "1"
_STRUCTURE = (torch.device, CUDAGraphed, ExitStack)
_TTT_FIELDS = {"ttt", "reset_fn", "keep_graph"}  # TTTStreamState: the TTT state is saved apart


def _fields(name: str, state: Any) -> list[tuple[str, Any]]:
    items = [(f.name, getattr(state, f.name)) for f in dataclasses.fields(state) if f.name != "batch_size"]
    items.append(("exec_mask", state.exec_mask))
    if isinstance(state, TTTStreamState):
        if state.window_start is not None or state.window_reset is not None:
            raise ValueError(f"{name}: a TTT state in training window mode cannot be saved for generation")
        items = [(k, v) for k, v in items if k not in _TTT_FIELDS | {"window_start", "window_reset"}]
    return items


def _key(prefix: str, module: str, field: str) -> str:
    return f"{prefix}{module}.{field}" if module else f"{prefix}{field}"


def capture_states(states: Mapping[str, Any], prefix: str) -> dict[str, Tensor]:
    """{module name: moshi State} → flat {prefix + module.field: tensor} (CPU copies)."""
    out: dict[str, Tensor] = {}
    for module, state in states.items():
        for field, value in _fields(module, state):
            key = _key(prefix, module, field)
            if isinstance(value, Tensor):
                out[key] = value.detach().to("cpu", copy=True).contiguous()
            elif isinstance(value, bool):
                out[key] = torch.tensor(value)
            elif isinstance(value, int):
                out[key] = torch.tensor(value, dtype=torch.int64)
            elif isinstance(value, RingKVCache):
                out[f"{key}.cache"] = value.cache.detach().to("cpu", copy=True).contiguous()
                out[f"{key}.end_offset"] = value.end_offset.detach().to("cpu", copy=True).contiguous()
            elif value is None or isinstance(value, _STRUCTURE) or callable(value):
                continue
            else:
                raise ValueError(f"cannot save the streaming state of {module or 'the model'}: field "
                                 f"{field!r} holds a {type(value).__name__}, which this version does not know")
    return out


def restore_states(states: Mapping[str, Any], tensors: Mapping[str, Tensor], prefix: str, where: str) -> None:
    """Copy what `capture_states` returned back into live states of the same layout."""
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


def model_fingerprint(model: nn.Module) -> str:
    """A cheap identity of a model's weights: names, shapes, dtypes and 3 values of each tensor."""
    h = hashlib.sha256()
    samples = []
    for name, p in model.state_dict().items():
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype};".encode())
        flat = p.detach().reshape(-1)
        if flat.numel():
            samples.append(flat[[0, flat.numel() // 2, flat.numel() - 1]].float())
    if samples:
        h.update(torch.cat(samples).cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def write_state(path: str | Path, tensors: dict[str, Tensor], meta: dict[str, Any]) -> Path:
    """One safetensors file (written atomically): the tensors, plus `meta` as JSON metadata."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_tensors_atomic(path, tensors, metadata={"format": FORMAT, "version": VERSION, "meta": json.dumps(meta)})
    return path


def read_state(path: str | Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(tensors, meta) of a file written by `write_state`; clear errors for anything else."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such generation state file")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
        tensors = load_file(str(path))
    except (OSError, SafetensorError) as e:
        raise ValueError(f"{path}: not a readable state file ({e})") from None
    if header.get("format") != FORMAT:
        raise ValueError(f"{path}: not a generation state file (written by `ttt-speech generate --state-out`)")
    if header.get("version") != VERSION:
        raise ValueError(f"{path}: state format version {header.get('version')!r}, this version reads {VERSION!r}")
    try:
        meta = json.loads(header.get("meta", ""))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: corrupt metadata ({e})") from None
    return tensors, meta
