"""Loading saved models with checks that speak to the user: the right class, the right sizes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, TypeVar

from shapekiln.errors import ShapekilnError

T = TypeVar("T")


def load_pretrained(cls: type[T], path: str | Path, expect: dict[str, Any] | None = None) -> T:
    """`cls.from_pretrained(path)` from config.json + safetensors only (never a pickle).

    A folder of another model class, or whose config differs from `expect` (say, another
    resolution), is a ShapekilnError naming the difference. `path` may name a model shipped with the
    package ("general-32", models/pretrained.py), checked against its checksum.
    """
    from shapekiln.models.pretrained import resolve

    path = resolve(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ShapekilnError(f"{path} is not a saved model folder (no config.json)")
    try:
        config = json.loads(config_file.read_text())
    except ValueError:
        raise ShapekilnError(f"{config_file} is not valid JSON") from None
    saved_class = config.get("_class_name")
    if saved_class != cls.__name__:
        raise ShapekilnError(f"{path} holds a {saved_class or 'unknown'} model, not a {cls.__name__}")
    for key, value in (expect or {}).items():
        if config.get(key) != value:
            raise ShapekilnError(f"{path} holds a {cls.__name__} with {key}={config.get(key)}, but {value} is needed")
    if not list(path.glob("*.safetensors")):
        raise ShapekilnError(f"{path} has no .safetensors weights")
    try:
        return cls.from_pretrained(str(path), use_safetensors=True)
    except (OSError, ValueError, RuntimeError, KeyError) as error:  # a damaged file, or weights of another model
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ShapekilnError(f"{path}: cannot load the {cls.__name__} weights ({reason[:200]})") from None
