"""Trainable weights and AdamW's state as a sharded checkpoint (`torch.distributed.checkpoint`, the
format of torchtitan and torchtune): every rank writes its own shards in parallel, and a checkpoint
written by N ranks loads onto any number of ranks, sharded or not (DCP reshards on load).

    <checkpoint>/sharded/.metadata        the index, written last by rank 0 (its presence: complete)
    <checkpoint>/sharded/__R_0.distcp     rank R's shards

Keys, flat: `weights.<parameter name>` and `optimizer.<parameter name>.<AdamW state>` (exp_avg,
exp_avg_sq, step), names as in the unsharded model; AdamW's hyperparameters (param_groups) go to
train_state.pt with the rest of the small state. Parameters without optimizer state (never stepped)
have no optimizer keys, and get none back on load.
"""
from __future__ import annotations

import contextlib
import warnings
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import Tensor, nn

SHARDED_DIR = "sharded"
WEIGHTS, OPTIMIZER = "weights.", "optimizer."


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def state_to_save(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Tensor]:
    """The flat state of a sharded checkpoint: this rank's DTensors (FSDP) or whole tensors (DDP and
    one process: DCP writes each replicated tensor once)."""
    out: dict[str, Tensor] = {}
    for name, p in trainable_parameters(model).items():
        out[WEIGHTS + name] = p.detach()
        for key, value in optimizer.state.get(p, {}).items():
            out[f"{OPTIMIZER}{name}.{key}"] = value
    return out


@contextlib.contextmanager
def _quiet_alone(group) -> Iterator[None]:
    """DCP warns "assuming the intent is to save/load in a single process" on every call without a
    process group, even when told so (no_dist): it is the intent here."""
    with warnings.catch_warnings():
        if group is None:
            warnings.filterwarnings("ignore", message=".*in a single process")
        yield


def save_sharded(folder: Path, state: dict[str, Tensor], group, asynchronous: bool = False) -> Future | None:
    """Write `state` into `folder` (collective over `group`; None: this process alone). Asynchronous:
    the tensors are copied to CPU memory now and written by a background thread; the returned future
    completes when every rank's files and the index are written."""
    import torch.distributed.checkpoint as dcp

    from torch.distributed.checkpoint.api import CheckpointException

    writer = dcp.FileSystemWriter(str(folder))
    try:
        with _quiet_alone(group):
            if asynchronous:
                return dcp.async_save(state, storage_writer=writer, process_group=group, no_dist=group is None)
            dcp.save(state, storage_writer=writer, process_group=group, no_dist=group is None)
    except CheckpointException as e:  # a BaseException: it would escape the commands' one-line errors
        raise ValueError(f"checkpoint: cannot write {folder} ({_one_line(e)})") from None
    return None


def read_metadata(folder: Path):
    """The index of a sharded checkpoint (DCP's `Metadata`)."""
    import torch.distributed.checkpoint as dcp

    return dcp.FileSystemReader(str(folder)).read_metadata()


def sharded_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """{parameter name: whole shape} of the weights of a sharded checkpoint (its index only)."""
    entries = read_metadata(folder).state_dict_metadata
    return {k[len(WEIGHTS):]: tuple(v.size) for k, v in entries.items() if k.startswith(WEIGHTS)}


def shard_problem(folder: Path) -> str | None:
    """What is wrong with the shard files the index names (missing: a copy that lost a rank's file;
    shorter than the index says: truncated, e.g. by a full disk), or None."""
    ends: dict[str, int] = {}
    for info in (read_metadata(folder).storage_data or {}).values():
        ends[info.relative_path] = max(ends.get(info.relative_path, 0), info.offset + info.length)
    for name, end in sorted(ends.items()):
        file = folder / name
        if not file.is_file():
            return f"{file} is missing (a rank's shards; {len(ends)} file(s) in the index)"
        if file.stat().st_size < end:
            return f"{file} is truncated ({file.stat().st_size} bytes, the index reads up to {end})"
    return None


def _one_line(e: BaseException) -> str:
    """The first failure of a DCP `CheckpointException` (one per rank), as one line."""
    failures = getattr(e, "failures", None) or {}
    first = next(iter(failures.values()), e)
    text = str(first).strip()
    return getattr(first, "strerror", None) or (text.splitlines()[0] if text else type(first).__name__)


def load_sharded(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                 param_groups: list[dict[str, Any]], group) -> None:
    """Load weights and AdamW's state from a sharded checkpoint into this rank's parameters (its
    shards under FSDP, whole tensors otherwise), in place; `param_groups`: the hyperparameters
    saved beside it (collective over `group`; None: this process alone)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    entries = read_metadata(folder).state_dict_metadata
    params = trainable_parameters(model)
    target: dict[str, Tensor] = {WEIGHTS + n: p.detach() for n, p in params.items()}
    for key, meta in entries.items():
        if not key.startswith(OPTIMIZER):
            continue
        name, state_key = key[len(OPTIMIZER):].rsplit(".", 1)
        p = params[name]
        # AdamW's moments are shaped and sharded as their parameter; its `step` is a CPU scalar
        # (torch 2.13, neither fused nor capturable), also for a scalar parameter
        like_param = state_key != "step" and tuple(meta.size) == tuple(p.shape)
        target[key] = (torch.empty_like(p.detach(), dtype=meta.properties.dtype) if like_param
                       else torch.empty(tuple(meta.size), dtype=meta.properties.dtype))
    try:
        with _quiet_alone(group):
            dcp.load(target, storage_reader=dcp.FileSystemReader(str(folder)), process_group=group,
                     no_dist=group is None)
    except CheckpointException as e:  # a BaseException: it would escape the commands' one-line errors
        raise ValueError(f"--resume: cannot read {folder} ({_one_line(e)})") from None
    optimizer.state.clear()
    for key, value in target.items():
        if key.startswith(OPTIMIZER):
            name, state_key = key[len(OPTIMIZER):].rsplit(".", 1)
            optimizer.state[params[name]][state_key] = value
    for current, saved in zip(optimizer.param_groups, param_groups, strict=True):
        current.update({k: v for k, v in saved.items() if k != "params"})


def read_weights(folder: Path) -> dict[str, Tensor]:
    """The weights of a sharded checkpoint, whole tensors on the CPU by parameter name (this
    process alone: for tools and tests)."""
    import torch.distributed.checkpoint as dcp

    entries = read_metadata(folder).state_dict_metadata
    target = {k: torch.empty(tuple(m.size), dtype=m.properties.dtype) for k, m in entries.items()
              if k.startswith(WEIGHTS)}
    with _quiet_alone(None):
        dcp.load(target, storage_reader=dcp.FileSystemReader(str(folder)), no_dist=True)
    return {k[len(WEIGHTS):]: v for k, v in target.items()}
