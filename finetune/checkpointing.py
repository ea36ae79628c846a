"""Training checkpoints: everything `--resume` needs to continue exactly where a run stopped.

`<output_dir>/checkpoints/step_000120/`:
  trainable.safetensors  trainable parameters (by name)
  carry.safetensors      carried TTT stream state of every global row (rows stacked in order)
  train_state.pt         step, optimizer (by parameter name, whole tensors), scheduler, data position of every row, RNG states per rank
  config.yaml            the resolved config
Written into a temporary folder and renamed: a crash never leaves half a checkpoint.
"""
from __future__ import annotations

import logging
import os
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)

from ttt_speech.files import save_tensors_atomic, write_text_atomic
from ttt_speech.sharding import full_tensor

STEP_DIR = re.compile(r"^step_(\d{6,})$")
logger = logging.getLogger("finetune")


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(root: Path, step: int, trainable: dict[str, Tensor], carry: dict[str, Tensor] | None,
                    train_state: dict[str, Any], config_yaml: str, keep: int) -> Path:
    """Write checkpoint `step` under `root` atomically; keep the newest `keep` checkpoints."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:06d}"
    stage = Path(tempfile.mkdtemp(dir=root, prefix=f".{final.name}."))
    try:
        save_tensors_atomic(stage / "trainable.safetensors", {k: v.detach().cpu().contiguous() for k, v in trainable.items()})
        if carry is not None:
            save_tensors_atomic(stage / "carry.safetensors", {k: v.cpu().contiguous() for k, v in carry.items()})
        torch.save(train_state, stage / "train_state.pt")
        write_text_atomic(stage / "config.yaml", config_yaml)
        os.chmod(stage, 0o755)
        if final.exists():
            shutil.rmtree(final)
        os.replace(stage, final)
    finally:
        if stage.exists():
            shutil.rmtree(stage)
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old)
    return final


def list_checkpoints(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name)]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def resolve_resume(path: Path) -> Path:
    """`--resume` accepts a checkpoint folder or a run's output folder: its newest readable
    checkpoint, falling back (with a warning) past damaged ones, e.g. one truncated by a full disk."""
    path = Path(path)
    if (path / "train_state.pt").is_file():
        verify_checkpoint(path)
        return path
    found = list_checkpoints(path / "checkpoints")
    if not found:
        raise ValueError(f"--resume: {path} is neither a checkpoint nor a run folder with checkpoints")
    problems = []
    for candidate in reversed(found):
        try:
            verify_checkpoint(candidate)
        except DamagedCheckpoint as e:
            logger.warning("skipping a damaged checkpoint: %s", e)
            problems.append(str(e))
            continue
        if problems:
            logger.warning("--resume: continuing from %s, the newest readable checkpoint", candidate)
        return candidate
    raise ValueError(f"--resume: no readable checkpoint in {path / 'checkpoints'} ({problems[0]})")


def verify_checkpoint(path: Path) -> None:
    """Parse every file of a checkpoint (train_state.pt memory-mapped, carry.safetensors whole, the
    header of trainable.safetensors, config.yaml); a damaged one → `DamagedCheckpoint` naming it."""
    load_checkpoint(path, tensors=False)
    _readable(path / "trainable.safetensors", safetensors_shapes)
    read_checkpoint_config(path)


def read_checkpoint_config(path: Path) -> dict[str, Any]:
    """The resolved config a checkpoint was written with (its config.yaml)."""
    import yaml

    data = _readable(path / "config.yaml", lambda f: yaml.safe_load(f.read_text()))
    if not isinstance(data, dict):
        raise DamagedCheckpoint(f"--resume: {path / 'config.yaml'} is damaged (expected the run's config)")
    return data


class DamagedCheckpoint(ValueError):
    """A checkpoint file that exists but does not parse (truncated, corrupted): `--resume` on a run
    folder falls back past it. Failures to read (permissions, I/O errors) are plain ValueErrors."""


def _readable(file: Path, read):
    """`read(file)`; a missing file, a read failure or a parse failure → ValueError naming the file."""
    if not file.is_file():
        raise ValueError(f"--resume: {file} is missing")
    try:
        return read(file)
    except OSError as e:  # the file may be fine: never a reason to fall back past it
        raise ValueError(f"--resume: cannot read {file} ({e.strerror or e})") from None
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - torch, safetensors and yaml each raise their own kinds
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DamagedCheckpoint(f"--resume: {file} is damaged ({reason})") from None


def load_checkpoint(path: Path, tensors: bool = True
                    ) -> tuple[dict[str, Tensor], dict[str, Tensor] | None, dict[str, Any]]:
    """(trainable tensors, carried TTT state or None, train_state) of a checkpoint folder.

    train_state is memory-mapped: its optimizer tensors are read only where used. tensors=False: the
    trainable tensors are not read ({}; ranks > 0 of a sharded run receive their shards from rank 0).
    A missing or damaged file → ValueError naming it."""
    carry_file = path / "carry.safetensors"
    carry = _readable(carry_file, lambda f: load_file(str(f))) if carry_file.is_file() else None
    state = _readable(path / "train_state.pt", lambda f: torch.load(f, weights_only=False, mmap=True))
    if not isinstance(state, dict) or "step" not in state:
        raise DamagedCheckpoint(f"--resume: {path / 'train_state.pt'} is not a ttt-speech training state")
    trainable = _readable(path / "trainable.safetensors", lambda f: load_file(str(f))) if tensors else {}
    return trainable, carry, state


def safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """{tensor name: shape} of a safetensors file (its header only)."""
    with safe_open(str(path), framework="pt") as f:
        return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}


def full_trainable_state(model: nn.Module, keep: bool) -> dict[str, Tensor]:
    """The trainable parameters by name, whole tensors on the CPU where `keep` ({} elsewhere).
    Gathered one at a time from their shards under FSDP (collective: every rank calls it)."""
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            whole = full_tensor(p.detach())
            if keep:
                out[name] = whole.cpu()
    return out


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's state keyed by parameter name, whole tensors (gathered from the shards under
    FSDP; collective), on the CPU of rank 0 (an empty dict on other ranks). The same format for
    every strategy and number of ranks: a checkpoint resumes onto any of them. {} before the
    first step (torch would take a zero-lr step to create the state, counting it in AdamW's step)."""
    if not optimizer.state:
        return {}
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_optimizer_state_dict(model, optimizer, options=options)


def load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer, trainable: dict[str, Tensor],
                    optimizer_state: dict[str, Any], from_rank0: bool, is_main: bool) -> None:
    """Load trainable weights and `full_optimizer_state`'s format (each rank keeps its shards), or
    the index-keyed `optimizer.state_dict()` of checkpoints written before it.

    from_rank0: only rank 0's tensors are used; it sends every rank its part (collective). Every
    rank passes `optimizer_state` as `load_checkpoint` gave it (memory-mapped, not read), so that
    all take the same branch."""
    options = StateDictOptions(full_state_dict=True, strict=False, broadcast_from_rank0=from_rank0)
    set_model_state_dict(model, trainable, options=options)
    if not optimizer_state:  # saved before the first step: a fresh optimizer is that state
        return
    groups = optimizer_state.get("param_groups") or [{}]
    if any(isinstance(p, int) for p in groups[0].get("params", ())):  # by index: written before names
        if from_rank0:
            raise ValueError("--resume: this checkpoint's optimizer state predates sharded checkpoints; "
                             "resume it with distributed: ddp")
        optimizer.load_state_dict(optimizer_state)
        return
    set_optimizer_state_dict(model, optimizer, optimizer_state if is_main or not from_rank0 else {}, options=options)


def split_rows(tensors: dict[str, Tensor], rows: list[int]) -> dict[str, Tensor]:
    """This rank's rows of a stacked carried state."""
    index = torch.tensor(rows)
    return {k: v.index_select(0, index) for k, v in tensors.items()}
