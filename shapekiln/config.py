"""Typed YAML configs: a file loads into a dataclass, checked once, with errors that name the key and file."""

from __future__ import annotations

import dataclasses
import typing
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import yaml

from shapekiln.errors import ShapekilnError

T = TypeVar("T")


def resolve_config_path(name_or_path: str | Path, group: str) -> Path:
    """A path to a YAML file, or a size name (`tiny`, `small`, `paper`) of a packaged config in configs/<group>/."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise ShapekilnError(f"config file not found: {path}")
        return path
    packaged = resources.files("shapekiln.configs").joinpath(group, f"{name_or_path}.yaml")
    if not packaged.is_file():
        choices = sorted(p.name.removesuffix(".yaml") for p in resources.files("shapekiln.configs").joinpath(group).iterdir() if p.name.endswith(".yaml"))
        raise ShapekilnError(f"no {group} config named {name_or_path!r} (choose one of {', '.join(choices)} or give a .yaml path)")
    return Path(str(packaged))


def load_config(cls: type[T], name_or_path: str | Path, group: str, overrides: dict[str, Any] | None = None) -> T:
    """Load configs/<group>/<name>.yaml (or a path) into `cls`, applying non-None overrides.

    A file must give every key (its defaults in the dataclass do not count), so a config file
    states a whole run and a key left out by mistake is an error rather than a silent default.
    """
    path = resolve_config_path(name_or_path, group)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ShapekilnError(f"{path}: not valid YAML ({str(error).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ShapekilnError(f"{path}: expected a mapping of keys to values at the top level")
    data.update({key: value for key, value in (overrides or {}).items() if value is not None})
    return from_dict(cls, data, str(path), require_all=True)


def from_dict(cls: type[T], data: dict[str, Any], where: str, require_all: bool = False) -> T:
    """Build dataclass `cls` from a dict: unknown keys, missing keys and wrong types are errors.

    A key with a default may be left out unless `require_all` (nested sections inherit it).
    """
    fields = {field.name: field for field in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ShapekilnError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(fields)})")
    hints = typing.get_type_hints(cls)
    values = {}
    for name, field in fields.items():
        if name not in data:
            if require_all or (field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING):
                raise ShapekilnError(f"{where}: missing key {name!r}")
            continue
        values[name] = _check_type(data[name], hints[name], f"{where}: key {name!r}", require_all)
    config = cls(**values)
    validate = getattr(config, "validate", None)
    if validate is not None:
        try:
            validate()
        except ValueError as error:
            raise ShapekilnError(f"{where}: {error}") from None
    return config


def _check_type(value: Any, hint: Any, where: str, require_all: bool = False) -> Any:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ShapekilnError(f"{where}: expected a mapping")
        return from_dict(hint, value, where, require_all)
    if origin is typing.Literal:
        if value not in typing.get_args(hint):
            raise ShapekilnError(f"{where}: expected one of {list(typing.get_args(hint))}, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ShapekilnError(f"{where}: expected a list, got {value!r}")
        (item_hint, *_) = typing.get_args(hint) or (Any,)
        return origin(_check_type(item, item_hint, where) for item in value)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        (inner,) = [arg for arg in args if arg is not type(None)]
        return _check_type(value, inner, where)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool) and (not isinstance(value, hint) or (hint is int and isinstance(value, bool))):
        raise ShapekilnError(f"{where}: expected {hint.__name__}, got {value!r}")
    return value


def to_dict(config: Any) -> dict[str, Any]:
    """A JSON/YAML-safe dict of a config dataclass (saved beside every run's outputs)."""
    return dataclasses.asdict(config)
