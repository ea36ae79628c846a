"""Training checkpoints: everything `--resume` needs to continue exactly where a run stopped.

`<output_dir>/checkpoints/step_000120/`:
  trainable.safetensors  trainable parameters (by name)
  carry.safetensors      carried TTT stream state of every global row (rows stacked in order)
  train_state.pt         step, optimizer, scheduler, data position of every row, RNG states per rank
  config.yaml            the resolved config
Written into a temporary folder and renamed: a crash never leaves half a checkpoint.
"""
from __future__ import annotations

import os
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from torch import Tensor

from ttt_speech.files import save_tensors_atomic, write_text_atomic

STEP_DIR = re.compile(r"^step_(\d{6,})$")


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
    """`--resume` accepts a checkpoint folder or a run's output folder (its newest checkpoint)."""
    path = Path(path)
    if (path / "train_state.pt").is_file():
        return path
    found = list_checkpoints(path / "checkpoints")
    if not found:
        raise ValueError(f"--resume: {path} is neither a checkpoint nor a run folder with checkpoints")
    return found[-1]


def load_checkpoint(path: Path) -> tuple[dict[str, Tensor], dict[str, Tensor] | None, dict[str, Any]]:
    """(trainable tensors, carried TTT state or None, train_state) of a checkpoint folder."""
    for name in ("trainable.safetensors", "train_state.pt"):
        if not (path / name).is_file():
            raise ValueError(f"--resume: {path / name} is missing")
    carry = load_file(str(path / "carry.safetensors")) if (path / "carry.safetensors").is_file() else None
    state = torch.load(path / "train_state.pt", weights_only=False)
    return load_file(str(path / "trainable.safetensors")), carry, state


def split_rows(tensors: dict[str, Tensor], rows: list[int]) -> dict[str, Tensor]:
    """This rank's rows of a stacked carried state."""
    index = torch.tensor(rows)
    return {k: v.index_select(0, index) for k, v in tensors.items()}
