"""Exports: what a user needs to load a fine-tuned model (base model id + TTT/LoRA weights + config).

An export directory holds `model.json` (the base `ModelConfig`, the trainable set and the LoRA
shape) and, as trained: `ttt.safetensors` + `ttt_config.json` (see `save_ttt`), `lora.safetensors`,
or for full fine-tuning `model.safetensors`. It is written to a temporary directory and renamed
into place, so a reader never sees half an export. model.json also records the training's
provenance (`provenance`: steps, data, eval figures, ttt-speech version and git commit); exports
written before it have none and load the same. Every reader opens an export once as an `Export`,
from a folder or a hub repo id `namespace/name[@revision]` (`hub.resolve_export`, docs/architecture.md §1).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from functools import cached_property
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from . import schema
from .checkpoint import (CONFIG_FILE, WEIGHTS_FILE, SavedTTT, fuse_legacy_projections, load_ttt, read_saved_ttt,
                         save_ttt)
from .files import read_json, save_tensors_atomic, write_text_atomic
from .config import TTTConfig
from .handle import TTTModel
from .hub import resolve_export
from .lora import add_lora, load_lora, lora_state_dict
from .models import ModelConfig, load_lm

FORMAT = "ttt-speech-export"
VERSION = 1
MODEL_FILE = "model.json"
TRAINS_EVERYTHING = ("full", "e2e-meta")  # `trainable` values whose export holds every weight
LORA_FILE = "lora.safetensors"
FULL_FILE = "model.safetensors"
EXPORT_FILES = (MODEL_FILE, CONFIG_FILE, WEIGHTS_FILE, LORA_FILE, FULL_FILE)  # what a hub snapshot needs


def export_dir(source: str | Path) -> Path:
    """The local folder named by `source`: itself, or the snapshot of a hub repo id (downloaded), its
    model.json unread: `Export.open` reads it; `ttt-speech inspect` also takes a bare save_ttt folder."""
    return resolve_export(source, EXPORT_FILES)


def code_provenance() -> dict[str, str | None]:
    """The installed ttt-speech version and the git commit of its checkout (None when unknown)."""
    try:
        installed = version("ttt-speech")
    except PackageNotFoundError:
        installed = None
    root = Path(__file__).resolve().parents[1]
    commit = None
    if (root / ".git").exists():  # only our own checkout: never an enclosing repo of a site-packages install
        try:
            out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                 timeout=10)
        except (OSError, subprocess.SubprocessError):  # no git, or it hangs: provenance never fails a save
            out = None
        if out is not None and out.returncode == 0:
            commit = out.stdout.strip() or None
    return {"ttt_speech_version": installed, "git_commit": commit}


def save_export(lm: nn.Module, model: ModelConfig, directory: str | Path, trainable: str,
                lora: dict[str, Any] | None = None, provenance: dict[str, Any] | None = None) -> Path:
    """Write the export of a trained `lm` (built from `model`) into `directory` (replaced atomically).
    `provenance`: how it was trained (steps, data, eval figures: JSON values), recorded in model.json
    with the ttt-speech version and git commit."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}."))
    try:
        patched = TTTModel.find(lm) is not None
        if patched:
            save_ttt(lm, stage)
        if lora is not None:
            save_tensors_atomic(stage / LORA_FILE,
                                {k: v.detach().contiguous() for k, v in lora_state_dict(lm).items()})
        if trainable in TRAINS_EVERYTHING:
            save_tensors_atomic(stage / FULL_FILE, {k: v.detach().contiguous() for k, v in _untied_state(lm).items()})
        meta = {"format": FORMAT, "version": VERSION, "model": schema.to_dict(model),
                "trainable": trainable, "lora": lora, "ttt": patched,
                "provenance": {**(provenance or {}), **code_provenance()}}
        write_text_atomic(stage / MODEL_FILE, json.dumps(meta, indent=2) + "\n")
        os.chmod(stage, 0o755)
        old = None
        if directory.exists():
            old = directory.with_name(f".{directory.name}.old-{os.getpid()}")
            os.replace(directory, old)
        os.replace(stage, directory)
        if old is not None:
            shutil.rmtree(old)
    finally:
        if stage.exists():
            shutil.rmtree(stage)
    return directory


@dataclass(frozen=True)
class Export:
    """An export folder or hub repo id, resolved and its model.json read and checked once: every reader
    of an export (loading, `inspect`, `export card / push`) asks this object, so one export is one hub
    commit and one model.json however many questions are asked."""

    source: str | Path  # as the user gave it
    directory: Path  # the local folder (the hub snapshot for a repo id)
    meta: dict[str, Any]  # model.json; `provenance` may be absent

    @classmethod
    def open(cls, source: str | Path) -> Export:
        """Resolve `source` and read its model.json (no weights). An export missing a file its model.json
        declares (a deleted model.safetensors) is refused here, by every reader, before anything is
        loaded or uploaded."""
        directory = export_dir(source)
        path = directory / MODEL_FILE
        meta = read_json(path, "an export directory written by `ttt-speech train`")
        if meta.get("format") != FORMAT or meta.get("version") != VERSION:
            raise ValueError(f"{path}: not a ttt-speech export (format {meta.get('format')!r}, "
                             f"version {meta.get('version')!r})")
        export = cls(source, directory, meta)
        missing = next((name for name in export.files if not (directory / name).is_file()), None)
        if missing is not None:
            raise ValueError(f"{directory / missing}: missing, and {MODEL_FILE} declares it (an incomplete export: "
                             "copy the whole folder again, or export it again)")
        return export

    @property
    def files(self) -> list[str]:
        """The files the export holds, as its model.json declares them: what `open` checks and what
        `export push` uploads."""
        return [MODEL_FILE, *((CONFIG_FILE, WEIGHTS_FILE) if self.has_ttt else ()),
                *((LORA_FILE,) if self.lora else ()),
                *((FULL_FILE,) if self.trainable in TRAINS_EVERYTHING else ())]

    @property
    def trainable(self) -> str | None:
        """What training updated (`ttt`, `lora`, `full`, ...), as model.json records it."""
        return self.meta.get("trainable")

    @property
    def has_ttt(self) -> bool:
        """Whether the model carries TTT layers (ttt.safetensors + ttt_config.json)."""
        return bool(self.meta.get("ttt"))

    @property
    def lora(self) -> dict[str, Any] | None:
        """The LoRA shape (`rank`, `scale`), None without LoRA adapters."""
        return self.meta.get("lora")

    @property
    def provenance(self) -> dict[str, Any]:
        """How it was trained (steps, data, eval figures, code version); empty for exports written before."""
        return self.meta.get("provenance") or {}

    @property
    def label(self) -> str:
        """The export as reports name it: a hub repo id with the commit that was read."""
        if self.directory == Path(self.source):
            return str(self.source)
        return f"{self.source} (hub commit {self.directory.name})"

    @cached_property
    def model_config(self) -> ModelConfig:
        """The base model the export was trained from."""
        return schema.from_dict(ModelConfig, self.meta["model"], f"{self.directory / MODEL_FILE}:model")

    @cached_property
    def saved_ttt(self) -> SavedTTT | None:
        """What its ttt_config.json records (host, TTTConfig, patch report; no weights); None without TTT."""
        return read_saved_ttt(self.directory) if self.has_ttt else None

    @property
    def ttt_config(self) -> TTTConfig | None:
        """The TTTConfig the model is patched with (None: trained without TTT), so settings that depend
        on it (chunk sizes) can be checked before any model is loaded."""
        return self.saved_ttt.config if self.saved_ttt is not None else None

    def load(self, device: torch.device | None = None,
             model: ModelConfig | None = None) -> tuple[nn.Module, ModelConfig]:
        """Rebuild the fine-tuned LM: the base model (or `model`, e.g. a local copy of the same weights),
        its LoRA adapters, its TTT layers and their weights. Returns (lm in eval mode, ModelConfig)."""
        model = model or self.model_config
        lm = load_lm(model, device=device)
        if self.lora:
            add_lora(lm, self.lora["rank"], self.lora["scale"])
            load_lora(lm, load_file(str(self.directory / LORA_FILE)), str(self.directory / LORA_FILE))
        if self.has_ttt:
            load_ttt(lm, self.directory)
        if self.trainable in TRAINS_EVERYTHING:
            path = self.directory / FULL_FILE
            try:
                tensors = fuse_legacy_projections(load_file(str(path)), lm.state_dict())
                missing, unexpected = lm.load_state_dict(tensors, strict=False)
                aliases = _aliases(lm)
                missing = [k for k in missing if k not in aliases]  # loaded through the tensor they share
            except RuntimeError as e:  # shapes differ: `model` is not the architecture the export was trained on
                detail = next((line.strip() for line in str(e).splitlines() if "size mismatch" in line), str(e))
                raise ValueError(f"{path}: does not fit the model {model.name!r} ({detail}); leave `model` unset to "
                                 "use the export's own base model") from None
            if missing or unexpected:
                raise ValueError(f"{path}: does not match the model (missing {missing[:3]}, "
                                 f"unexpected {unexpected[:3]})")
        return lm.eval(), model


def _aliases(lm: nn.Module) -> set[str]:
    """State-dict names whose tensor is an earlier name's (tied weights: a Llama's lm_head and embeddings)."""
    seen, out = set(), set()
    for name, tensor in lm.state_dict(keep_vars=True).items():
        key = (tensor.data_ptr(), tuple(tensor.shape), tensor.stride())
        if key in seen and tensor.numel():
            out.add(name)
        seen.add(key)
    return out


def _untied_state(lm: nn.Module) -> dict:
    """`lm.state_dict()` with each shared tensor once (safetensors refuses aliases)."""
    aliases = _aliases(lm)
    return {k: v for k, v in lm.state_dict().items() if k not in aliases}


def load_exported_lm(source: str | Path, device: torch.device | None = None,
                     model: ModelConfig | None = None) -> tuple[nn.Module, ModelConfig]:
    """Rebuild a fine-tuned LM from an export folder or hub repo id `namespace/name[@revision]` (what
    the model card tells users to call): `Export.open(source).load(device, model)`."""
    return Export.open(source).load(device, model)
