"""Save / load TTT parameters apart from the base model (safetensors + JSON), written atomically."""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .config import TTTConfig
from .handle import TTTModel
from .host import host_spec, patch_host
from .report import PatchReport

WEIGHTS_FILE = "ttt.safetensors"
CONFIG_FILE = "ttt_config.json"
FORMAT_VERSION = 1


def ttt_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The TTT parameters of a patched model, keyed by their names in `model`."""
    return TTTModel.of(model, "ttt_state_dict: the model").named_parameters()


def save_ttt(model: nn.Module, directory: str | Path) -> Path:
    """Write `ttt.safetensors` and `ttt_config.json` for a patched model into `directory`."""
    handle = TTTModel.of(model, "save_ttt: the model")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous() for k, v in handle.named_parameters().items()}
    meta = {"format_version": FORMAT_VERSION, "host": handle.host,
            "ttt": handle.config.to_dict(), "report": handle.report.to_dict()}
    save_tensors_atomic(directory / WEIGHTS_FILE, tensors)
    write_text_atomic(directory / CONFIG_FILE, json.dumps(meta, indent=2) + "\n")
    return directory


def read_json(path: str | Path, what: str, missing_ok: bool = False) -> dict | None:
    """The JSON object in `path` (`what` says what it should be, for the errors); None for a missing
    file when `missing_ok`. Unreadable or malformed files are a one-line ValueError naming the file."""
    path = Path(path)
    if not path.is_file():
        if missing_ok:
            return None
        raise FileNotFoundError(f"{path}: missing (expected {what})")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON, expected {what} ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object ({what})")
    return data


@dataclass(frozen=True)
class SavedTTT:
    """What `save_ttt` recorded next to the weights: the host's name, the TTTConfig, the PatchReport."""

    host: str
    config: TTTConfig
    report: PatchReport


def read_ttt_config(directory: str | Path) -> SavedTTT:
    """What `save_ttt` recorded in `directory`'s ttt_config.json (no weights are read)."""
    path = Path(directory) / CONFIG_FILE
    meta = read_json(path, "a directory written by save_ttt")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {meta.get('format_version')!r}, expected {FORMAT_VERSION}")
    try:
        return SavedTTT(meta.get("host"), TTTConfig.from_dict(meta["ttt"]), PatchReport(**meta["report"]))
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: not a TTT export config ({e})") from None


def load_ttt(model: nn.Module, directory: str | Path) -> PatchReport:
    """Patch a fresh base model as recorded in `directory` and load the saved TTT weights."""
    directory = Path(directory)
    saved = read_ttt_config(directory)
    weights_path = directory / WEIGHTS_FILE
    if not weights_path.is_file():
        raise FileNotFoundError(f"{weights_path}: missing (expected a directory written by save_ttt)")
    report = patch_host(model, saved.config, host_spec(saved.host, str(directory / CONFIG_FILE)))
    tensors = load_file(str(weights_path))
    expected = ttt_state_dict(model)
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{weights_path}: does not match the patched model "
                         f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    with torch.no_grad():
        for name, param in expected.items():
            if tensors[name].shape != param.shape:
                raise ValueError(f"{weights_path}: {name} has shape {tuple(tensors[name].shape)}, "
                                 f"expected {tuple(param.shape)}")
            param.copy_(tensors[name])
    return report


def save_tensors_atomic(path: str | Path, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> None:
    """safetensors file written to a temporary name and renamed: never half-written."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def read_tensors(path: str | Path, what: str) -> tuple[dict[str, Tensor], dict[str, str]]:
    """(tensors, metadata) of a safetensors file; an unreadable one is a ValueError naming it as `what`."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        return load_file(str(path)), metadata
    except (OSError, SafetensorError) as e:
        raise ValueError(f"{path}: not a readable {what} ({e})") from None


def write_text_atomic(path: str | Path, text: str) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
