"""Files written atomically (a temporary name, then a rename: a reader never sees half a file) and
read back with one-line errors naming the file: safetensors, text, JSON."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor


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
