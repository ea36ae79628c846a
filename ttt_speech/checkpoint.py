"""Save / load TTT parameters apart from the base model (safetensors + JSON), written atomically."""
from __future__ import annotations

import json
import os
import tempfile
from importlib import import_module
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .config import TTTConfig
from .report import PatchReport

WEIGHTS_FILE = "ttt.safetensors"
CONFIG_FILE = "ttt_config.json"
FORMAT_VERSION = 1
# host name → (module, patch function, TTT-module iterator), imported only when needed.
HOSTS = {
    "moshi": ("ttt_speech.moshi", "patch_moshi", "ttt_modules"),
    "llama": ("ttt_speech.llama", "patch_llama", "ttt_modules"),  # HF Llama / Qwen2 (LLaMA-Omni 1/2)
}


def _host(name: str, where: str) -> tuple[Any, Any]:
    if name not in HOSTS:
        raise ValueError(f"{where}: unknown host {name!r}; expected one of {sorted(HOSTS)}")
    module, patch, modules = HOSTS[name]
    mod = import_module(module)
    return getattr(mod, patch), getattr(mod, modules)


def ttt_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The TTT parameters of a patched model, keyed by their names in `model`."""
    report = _report(model, "ttt_state_dict")
    _, modules = _host(report.host, "ttt_state_dict")
    owned = {id(p) for m in modules(model) for p in m.parameters()}
    return {n: p for n, p in model.named_parameters() if id(p) in owned}


def save_ttt(model: nn.Module, directory: str | Path) -> Path:
    """Write `ttt.safetensors` and `ttt_config.json` for a patched model into `directory`."""
    report = _report(model, "save_ttt")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous() for k, v in ttt_state_dict(model).items()}
    meta = {"format_version": FORMAT_VERSION, "host": report.host,
            "ttt": model.ttt_config.to_dict(), "report": report.to_dict()}
    save_tensors_atomic(directory / WEIGHTS_FILE, tensors)
    write_text_atomic(directory / CONFIG_FILE, json.dumps(meta, indent=2) + "\n")
    return directory


def read_ttt_config(directory: str | Path) -> tuple[str, TTTConfig]:
    """(host name, TTTConfig) recorded by `save_ttt` in `directory` (no weights are read)."""
    config_path = Path(directory) / CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path}: missing (expected a directory written by save_ttt)")
    try:
        meta = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_path}: not valid JSON ({e})") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{config_path}: format_version {meta.get('format_version')!r}, expected {FORMAT_VERSION}")
    try:
        return meta.get("host"), TTTConfig.from_dict(meta["ttt"])
    except (KeyError, ValueError) as e:
        raise ValueError(f"{config_path}: {e}") from None


def load_ttt(model: nn.Module, directory: str | Path) -> PatchReport:
    """Patch a fresh base model as recorded in `directory` and load the saved TTT weights."""
    directory = Path(directory)
    host, config = read_ttt_config(directory)
    weights_path = directory / WEIGHTS_FILE
    if not weights_path.is_file():
        raise FileNotFoundError(f"{weights_path}: missing (expected a directory written by save_ttt)")
    patch, _ = _host(host, str(directory / CONFIG_FILE))
    report = patch(model, config)
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


def _report(model: nn.Module, where: str) -> PatchReport:
    report = getattr(model, "ttt_report", None)
    if report is None:
        raise ValueError(f"{where}: the model has no TTT layers (patch it first)")
    return report
