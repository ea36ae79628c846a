"""The file a saved generation stream lives in, and the identity of the model it belongs to.

The live state itself is flattened elsewhere: moshi's streaming states by
`ttt_speech.moshi.internals.moshi_states_to_tensors` (KV caches, offsets, LMGen's token cache,
Mimi's buffers), the TTT state by `TTTModel.stream_state`; `GenerationSession.state_dict` gathers
both.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..files import read_tensors, require_file, save_tensors_atomic

FORMAT = "ttt-speech-generation-state"
VERSION = "1"


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
    path = require_file(path, "a generation state file (written by `ttt-speech generate --state-out` or `serve`)")
    tensors, header = read_tensors(path, "state file")
    if header.get("format") != FORMAT:
        raise ValueError(f"{path}: not a generation state file (written by `ttt-speech generate --state-out` or "
                         "`ttt-speech serve`)")
    if header.get("version") != VERSION:
        raise ValueError(f"{path}: state format version {header.get('version')!r}, this version reads {VERSION!r}")
    try:
        meta = json.loads(header.get("meta", ""))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: corrupt metadata ({e})") from None
    return tensors, meta
