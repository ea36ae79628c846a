"""Save / load TTT parameters apart from the base model (safetensors + JSON), written atomically."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from .config import TTTConfig
from .files import read_json, save_tensors_atomic, write_text_atomic
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
    ttt = handle.config.to_dict()
    del ttt["kernel"]  # where the inner loop runs is the loader's machine's choice (it loads as "auto")
    meta = {"format_version": FORMAT_VERSION, "host": handle.host, "ttt": ttt, "report": handle.report.to_dict()}
    save_tensors_atomic(directory / WEIGHTS_FILE, tensors)
    write_text_atomic(directory / CONFIG_FILE, json.dumps(meta, indent=2) + "\n")
    return directory


LEGACY_PROJECTIONS = ("q_proj.weight", "k_proj.weight", "v_proj.weight")


def fuse_legacy_projections(tensors: dict[str, Tensor], expected: dict[str, Tensor]) -> dict[str, Tensor]:
    """Exports written before `TTTLayer.qkv_proj` held Q, K and V apart: join them as [Wq; Wk; Wv]."""
    out = dict(tensors)
    for name in expected:
        if name.endswith(".qkv_proj.weight") and name not in out:
            prefix = name[: -len("qkv_proj.weight")]
            parts = [prefix + p for p in LEGACY_PROJECTIONS]
            if all(p in out for p in parts):
                out[name] = torch.cat([out.pop(p) for p in parts])
    return out


@dataclass(frozen=True)
class SavedTTT:
    """What `save_ttt` recorded next to the weights: the host's name, the TTTConfig, the PatchReport."""

    host: str
    config: TTTConfig
    report: PatchReport


def read_saved_ttt(directory: str | Path) -> SavedTTT:
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
    saved = read_saved_ttt(directory)
    weights_path = directory / WEIGHTS_FILE
    if not weights_path.is_file():
        raise FileNotFoundError(f"{weights_path}: missing (expected a directory written by save_ttt)")
    report = patch_host(model, saved.config, host_spec(saved.host, str(directory / CONFIG_FILE)))
    expected = ttt_state_dict(model)
    tensors = fuse_legacy_projections(load_file(str(weights_path)), expected)
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
