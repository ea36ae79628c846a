"""JSONL manifests (moshi-finetune's form): one `{"path": ..., "duration": ...}` object per line.

Paths are relative to the manifest's folder unless absolute. An entry is an audio file (encoded
to Mimi codes through the cache) or a code file (`.safetensors`, see `codes.py`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .audio import AUDIO_SUFFIXES
from . import FRAME_RATE

CODE_SUFFIX = ".safetensors"


@dataclass(frozen=True)
class ManifestEntry:
    path: Path
    duration: float | None  # seconds, as declared (None when the line has none)

    @property
    def is_codes(self) -> bool:
        return self.path.suffix == CODE_SUFFIX

    @property
    def frames(self) -> int | None:
        return None if self.duration is None else int(round(self.duration * FRAME_RATE))


def read_manifest(path: str | Path, field: str = "manifest",
                  kinds: tuple[tuple[str, ...], str] | None = None) -> list[ManifestEntry]:
    """Entries of a JSONL manifest; any bad line is a one-line error naming file and line.
    kinds: (suffixes, what they are) the files must have; default audio or code files."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{field}: {path} is a directory, expected a JSONL manifest file" if path.is_dir()
                         else f"{field}: manifest {path} not found")
    entries = []
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{field}: cannot read manifest {path} ({e})") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not a JSON object ({e.msg})") from None
        if not isinstance(item, dict) or not isinstance(item.get("path"), str) or not item["path"]:
            raise ValueError(f"{where}: expected an object with a 'path' string")
        duration = item.get("duration")
        if duration is not None and (isinstance(duration, bool) or not isinstance(duration, (int, float))
                                     or duration <= 0):
            raise ValueError(f"{where}: 'duration' must be a positive number of seconds, got {duration!r}")
        file = Path(item["path"])
        file = file if file.is_absolute() else path.parent / file
        if kinds is not None:
            if file.suffix.lower() not in kinds[0]:
                raise ValueError(f"{where}: {file.name}: expected {kinds[1]}")
        elif file.suffix != CODE_SUFFIX and file.suffix.lower() not in AUDIO_SUFFIXES:
            raise ValueError(f"{where}: {file.name}: expected audio ({', '.join(AUDIO_SUFFIXES)}) or a code file "
                             f"({CODE_SUFFIX})")
        if not file.is_file():
            raise ValueError(f"{where}: {file} is a directory, expected a file" if file.is_dir()
                             else f"{where}: file {file} not found")
        entries.append(ManifestEntry(file, None if duration is None else float(duration)))
    if not entries:
        raise ValueError(f"{field}: manifest {path} lists no files")
    return entries


def write_manifest(path: str | Path, entries: list[ManifestEntry]) -> Path:
    """Write a manifest (paths relative to its folder when possible), atomically."""
    from ..files import write_text_atomic

    path = Path(path)
    lines = []
    for e in entries:
        try:
            rel = e.path.resolve().relative_to(path.parent.resolve())
        except ValueError:
            rel = e.path.resolve()
        item = {"path": str(rel)}
        if e.duration is not None:
            item["duration"] = round(e.duration, 3)
        lines.append(json.dumps(item))
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, "\n".join(lines) + "\n")
    return path
