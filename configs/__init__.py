"""The configs shipped with ttt-speech (this folder's YAML files, installed with the package), found
by name: `ttt-speech train tiny` works outside a clone, and `ttt-speech config cp` starts your own.

A config's paths (manifests, data roots, output folders) are relative to the folder the command runs
in, wherever the config itself lives; a packaged config used by name therefore reads and writes
below the current folder, as it does in a clone.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

FOLDER = Path(__file__).resolve().parent
COMMAND = re.compile(r"ttt-speech (train|demo|generate|eval [a-z-]+)\b")  # the command its comment shows


@dataclass
class PackagedConfig:
    name: str  # file name, e.g. tiny.yaml
    path: Path
    command: str  # what it is for, e.g. "train" or "eval librilight" (from its leading comment)
    description: str  # the first line of its leading comment


def packaged_configs() -> list[PackagedConfig]:
    """Every shipped config, sorted by name."""
    out = []
    for path in sorted(FOLDER.glob("*.yaml")):
        comment = []
        for line in path.read_text().splitlines():
            if not line.startswith("#"):
                break
            comment.append(line.lstrip("#").strip())
        text = "\n".join(comment)
        own = re.search(COMMAND.pattern + r"[^\n]*?\b" + re.escape(path.name), text)  # an example running this file
        match = own or COMMAND.search(text)
        command = match[1] if match else ("Python: TTTConfig.from_yaml" if "TTTConfig" in " ".join(comment) else "")
        out.append(PackagedConfig(path.name, path, command, comment[0] if comment else ""))
    return out


def packaged_names() -> str:
    """"demo, eval_librilight, ...": the shipped configs' names, for error messages."""
    return ", ".join(c.name.removesuffix(".yaml") for c in packaged_configs())


def find_packaged(name: str) -> PackagedConfig | None:
    """The shipped config called `name` (with or without .yaml), or None."""
    stem = name.removesuffix(".yaml")
    return next((c for c in packaged_configs() if c.name == f"{stem}.yaml"), None)


def resolve_config(path: str | Path) -> Path:
    """The config file a command was given: the path itself when it exists, else the packaged config
    of that name (`tiny`, `tiny.yaml`, or `configs/tiny.yaml` run outside a clone). A bare name that
    is neither is a one-line error listing the packaged names; any other path is returned for the
    loader's own missing-file error."""
    path = Path(path)
    if path.is_file():  # not a folder: in a clone `demo` is also the demo app's package
        return path
    packaged = find_packaged(path.name) if path.parent in (Path("."), Path("configs")) else None
    if packaged is not None:
        return packaged.path
    if path.parent == Path(".") and path.suffix in ("", ".yaml"):
        raise ValueError(f"config: no file {str(path)!r} here, and no packaged config of that name (packaged: "
                         f"{packaged_names()}; "
                         "`ttt-speech config list` describes them)")
    return path
