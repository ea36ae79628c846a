"""Files written atomically (a temporary name, then a rename: a reader never sees half a file) and
read back with one-line errors naming the file: safetensors, text, JSON; the folders and files a
command will write, checked before its work (writable, and nobody else's results)."""
from __future__ import annotations

import errno
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

RUN_LOCK = ".lock"  # flocked by a training run for its life and left in its output_dir: marks a run's folder

if TYPE_CHECKING:  # torch is imported where tensors are handled: the command tree is built without it
    from torch import Tensor


def save_tensors_atomic(path: str | Path, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> None:
    """safetensors file written to a temporary name and renamed: never half-written."""
    from safetensors.torch import save_file

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
    from safetensors.torch import load_file

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


def require_file(path: str | Path, what: str) -> Path:
    """`path` if it is an existing file; otherwise a one-line ValueError saying what it is instead."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path}: is a directory, expected {what}")
    if not path.is_file():
        raise ValueError(f"{path}: not found, expected {what}")
    return path


def writable_dir(path: str | Path, what: str, create: bool = True) -> Path:
    """Create folder `path` (and its parents) and prove it writable with a probe file, so that a long
    job fails before its work rather than when it writes its results. `create=False` checks only:
    the probe goes into the nearest folder that exists (`path` or one above it) and nothing is left,
    for a command that may still fail before it writes (it creates the folder then). One-line
    ValueError naming `what` (e.g. "output_dir") when the path is a file, or cannot be created or written."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{what}: {path} is a file, expected a folder")
    existing = path if create else next(p for p in (path, *path.parents) if p.exists())
    try:
        if create:
            path.mkdir(parents=True, exist_ok=True)
        elif not existing.is_dir():  # a file where a folder above `path` would have to be
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(existing))
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".write-probe.")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ValueError(f"{what}: cannot write into {path} ({e.strerror or e})") from None
    return path


def fresh_output_dir(path: str | Path, outputs: Sequence[str], overwrite: bool, what: str = "output_dir") -> Path:
    """`writable_dir(path, what)` for a command that writes the files `outputs` into it, refusing
    (unless `overwrite`) a folder that is a training run's (it holds RUN_LOCK) or that already holds
    one of `outputs` (an earlier run's results, which this one would replace). Several commands
    whose outputs differ may share a folder (`eval librilight` and `eval length-gen`)."""
    path = Path(path)
    if path.is_dir() and not overwrite:
        if (path / RUN_LOCK).exists():
            held = ", ".join(sorted(p.name for p in path.iterdir() if p.name != RUN_LOCK)[:4]) or "nothing yet"
            raise ValueError(f"{what}: {path} is a training run's folder (holding {held}); choose another {what}, "
                             "or pass --overwrite to write into it anyway")
        previous = [name for name in outputs if (path / name).exists()]
        if previous:
            raise ValueError(f"{what}: {path} already holds {', '.join(previous)} (an earlier run's results); "
                             f"choose another {what}, or pass --overwrite to replace them")
    return writable_dir(path, what)


def writable_file(path: str | Path, what: str, create: bool = True) -> Path:
    """Check that file `path` can be written (its folder is created, unless not `create`, and probed:
    `writable_dir`); a folder at `path` is a one-line ValueError naming `what`."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{what}: {path} is a folder, expected a file name")
    writable_dir(path.parent, f"{what} (its folder)", create)
    return path
