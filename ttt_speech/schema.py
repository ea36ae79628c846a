"""Nested config dataclasses loaded from YAML, validated in one place.

Every app config (training, evaluation, generation) is a tree of dataclasses whose fields carry
their documentation in `field(metadata={"help": ...})`. This module turns a YAML mapping into
such a tree, rejecting unknown keys and wrong types with a one-line error naming the field
(`train.optim.lr: expected a number, got 'fast'`), applies `key.sub=value` overrides from the
command line, and renders the field reference used by the README and `--help`.
"""
from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import MISSING, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal, Mapping, TypeVar, Union

T = TypeVar("T")
_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def doc(default: Any = MISSING, help: str = "", factory: Any = MISSING) -> Any:  # noqa: A002
    """`dataclasses.field` with its documentation attached (`help` feeds the config reference)."""
    if factory is not MISSING:
        return dataclasses.field(default_factory=factory, metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


def from_dict(cls: type[T], data: Any, where: str) -> T:
    """Build dataclass `cls` from a mapping; `where` names it in errors (e.g. "train.optim")."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ValueError(f"{where}: expected a mapping of fields, got {_show(data)}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in fields(cls) if f.init}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {unknown}; allowed: {sorted(known)}")
    kwargs = {name: _coerce(hints[name], value, f"{where}.{name}") for name, value in data.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:  # a required field is missing, or __post_init__ refused
        raise ValueError(f"{where}: {e}") from None


def to_dict(obj: Any) -> Any:
    """A dataclass tree → plain YAML/JSON-ready data (Paths become strings)."""
    if is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; unreadable or malformed files are a one-line ValueError."""
    import yaml

    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path}: is a directory, expected a YAML config file")
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as e:
        raise ValueError(f"{path}: cannot read config ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if data is None:  # not {}: every field at its default would hide a wrong or truncated file
        raise ValueError(f"{path}: the file is empty; expected a YAML mapping of config fields "
                         "(write {} to take every default)")
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping at the top level, got {_show(data)}")
    return data


def load_config(cls: type[T], path: str | Path, overrides: list[str] = (), where: str = "config") -> T:
    """Dataclass tree `cls` from a YAML file plus `key.sub=value` overrides; every error is one line
    naming the file and the field (`runs/x.yaml: train.optim.lr: expected a number, got 'fast'`)."""
    data = apply_overrides(load_yaml(path), list(overrides))
    try:
        return from_dict(cls, data, where)
    except ValueError as e:
        override = _override_of(cls, path, list(overrides), where)
        raise ValueError(f"{f'command-line override {override}' if override else path}: {e}") from None


def _override_of(cls: type, path: str | Path, overrides: list[str], where: str) -> str | None:
    """The override that makes the config invalid, so that a value given on the command line is not
    blamed on the file: the first one after which the file plus the overrides so far fails to
    validate; None when the file alone fails. (Found by validating again, not by reading the
    error's text; only on the error path.)"""
    for n in range(len(overrides) + 1):
        try:
            from_dict(cls, apply_overrides(load_yaml(path), overrides[:n]), where)
        except ValueError:
            return overrides[n - 1] if n else None
    return None


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` strings (values parsed as YAML scalars/lists) to a nested mapping."""
    import yaml

    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r}: expected key.sub=value")
        parts = key.split(".")
        node = data
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ValueError(f"override {item!r}: {part} is not a section")
            node = child
        try:
            node[parts[-1]] = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError:
            node[parts[-1]] = raw
    return data


def reference(cls: type, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted name, default, help) for every field of a dataclass tree, depth first. An optional
    section (`Section | None`) documented with `doc` has a row of its own, then its fields (their
    defaults when it is set); one documented elsewhere (TTTConfig: the README) has its row only."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        name = f"{prefix}{f.name}"
        tp = hints[f.name]
        if is_dataclass(tp):
            rows.extend(reference(tp, prefix=f"{name}."))
            continue
        default = f.default if f.default is not MISSING else (
            f.default_factory() if f.default_factory is not MISSING else "(required)")
        rows.append((name, _show_default(default), f.metadata.get("help", "")))
        section = [t for t in typing.get_args(tp) if is_dataclass(t)] if _is_optional(tp) else []
        if len(section) == 1 and any("help" in g.metadata for g in fields(section[0])):
            rows.extend(reference(section[0], prefix=f"{name}."))
    return rows


def _is_optional(tp: Any) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType) and type(None) in typing.get_args(tp)


def _show_default(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(to_dict(value))


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if is_dataclass(tp):
        return from_dict(tp, value, where)
    if origin in (Union, types.UnionType):
        options = [option for option in typing.get_args(tp) if option is not type(None)]
        if value is None and len(options) < len(typing.get_args(tp)):
            return None
        if len(options) == 1:  # `X | None`: X's own error, which names the field inside a section
            return _coerce(options[0], value, where)
        errors = []
        for option in options:
            try:
                return _coerce(option, value, where)
            except ValueError as e:
                errors.append(str(e).split(": ", 1)[-1])
        raise ValueError(f"{where}: " + " or ".join(dict.fromkeys(errors)))
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ValueError(f"{where}: expected one of {list(allowed)}, got {_show(value)}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where}: expected a list, got {_show(value)}")
        (item,) = typing.get_args(tp)[:1] or (Any,)
        return [_coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise ValueError(f"{where}: expected a mapping, got {_show(value)}")
        args = typing.get_args(tp)
        if len(args) == 2:  # dict[str, X]: the values are checked like any field
            return {str(k): _coerce(args[1], v, f"{where}.{k}") for k, v in value.items()}
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{where}: expected true or false, got {_show(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{where}: expected an integer, got {_show(value)}")
        return value
    if tp is float:
        if isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
            value = float(value)  # YAML 1.1 reads 3e-4 (no dot) as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{where}: expected a number, got {_show(value)}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"{where}: expected a string, got {_show(value)}")
        return value
    if tp is Path:
        if not isinstance(value, (str, Path)) or not str(value):
            raise ValueError(f"{where}: expected a path, got {_show(value)}")
        return Path(value)
    raise TypeError(f"{where}: unsupported config type {tp!r}")  # a bug in the schema, not in the input


def _show(value: Any) -> str:
    if isinstance(value, (dict, list)):
        return f"a {type(value).__name__}"
    return repr(value)


def check(condition: bool, where: str, expected: str, value: Any) -> None:
    """Raise the standard one-line error unless `condition` holds."""
    if not condition:
        raise ValueError(f"{where}: expected {expected}, got {_show(value)}")


def markdown_reference(cls: type) -> str:
    """The field reference of a config tree as a Markdown table (kept in the docs, checked by a test)."""
    lines = ["| field | default | meaning |", "|---|---|---|"]
    for name, default, help_text in reference(cls):
        lines.append(f"| `{name}` | `{default}` | {help_text.replace('|', '/')} |")
    return "\n".join(lines)
