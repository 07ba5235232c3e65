"""Strict mapping of TOML/YAML/dict data onto frozen dataclasses.

Config is data: every concern has one frozen dataclass whose defaults are
explained where they are declared. This module maps plain mappings onto them
exactly: unknown keys and wrong types are errors that name the source.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def load_mapping(path: str | Path) -> dict[str, Any]:
    """Read a ``.toml``, ``.yaml``/``.yml`` or ``.json`` file into a dict."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    suffix = path.suffix.lower()
    text = path.read_text(encoding="utf-8")
    if suffix == ".toml":
        data = tomllib.loads(text)
    elif suffix in (".yaml", ".yml"):
        import yaml  # optional dependency, only needed for YAML configs

        data = yaml.safe_load(text) or {}
    elif suffix == ".json":
        data = json.loads(text)
    else:
        raise ValueError(f"config file {path}: expected .toml, .yaml, .yml or .json, found {suffix!r}")
    if not isinstance(data, dict):
        raise ValueError(f"config file {path}: expected a mapping at top level, found {type(data).__name__}")
    return data


def _check_type(value: Any, annotation: Any, where: str) -> Any:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in args:
            try:
                return _check_type(value, option, where)
            except (TypeError, ValueError) as exc:
                errors.append(str(exc))
        raise TypeError(f"{where}: expected {annotation}, found {value!r}")
    if annotation is type(None):
        if value is not None:
            raise TypeError(f"{where}: expected null, found {value!r}")
        return None
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"{where}: expected a list, found {type(value).__name__} {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_check_type(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise TypeError(f"{where}: expected {len(args)} items, found {len(value)}")
        return tuple(_check_type(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin in (dict, Mapping) or annotation is dict:
        if not isinstance(value, Mapping):
            raise TypeError(f"{where}: expected a mapping, found {type(value).__name__}")
        if args:
            return {_check_type(k, args[0], where): _check_type(v, args[1], f"{where}.{k}") for k, v in value.items()}
        return dict(value)
    if dataclasses.is_dataclass(annotation):
        if isinstance(value, annotation):
            return value
        return from_mapping(annotation, value, source=where)
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{where}: expected a number, found {type(value).__name__} {value!r}")
        return float(value)
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{where}: expected an integer, found {type(value).__name__} {value!r}")
        return value
    if annotation in (str, bool):
        if not isinstance(value, annotation):
            raise TypeError(f"{where}: expected {annotation.__name__}, found {type(value).__name__} {value!r}")
        return value
    return value


def from_mapping(cls: type[T], data: Mapping[str, Any], *, source: str = "config") -> T:
    """Build dataclass ``cls`` from ``data``, rejecting unknown keys and wrong types.

    Missing keys take the dataclass defaults. ``source`` names the file or
    option in error messages.
    """
    if not isinstance(data, Mapping):
        raise TypeError(f"{source}: expected a mapping for {cls.__name__}, found {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(
            f"{source}: unknown key(s) {', '.join(unknown)} for {cls.__name__}; "
            f"expected some of {', '.join(sorted(fields))}"
        )
    hints = typing.get_type_hints(cls)
    kwargs = {name: _check_type(value, hints[name], f"{source}.{name}") for name, value in data.items()}
    return cls(**kwargs)


def to_mapping(obj: Any) -> dict[str, Any]:
    """Plain-dict form of a (nested) config dataclass, JSON-serialisable."""
    return json.loads(json.dumps(dataclasses.asdict(obj), default=str))
