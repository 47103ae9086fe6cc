"""What every dataset source yields: one `ShapeRecord` per shape, loaded lazily from a small item."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator, Protocol

import trimesh


@dataclass
class ShapeRecord:
    """One raw shape, before normalization.

    `mesh` keeps whatever visuals the source has (vertex colors, a texture) so views can be shaded.
    `captions` has at least one entry; `attributes` are source-specific and JSON-serializable.
    """

    id: str
    mesh: trimesh.Trimesh
    captions: list[str]
    category: str = "unknown"
    attributes: dict[str, Any] = field(default_factory=dict)
    source: str = ""


class Source(Protocol):
    """A dataset source: a cheap, deterministic list of items, and a loader run in worker processes.

    `items()` must be fast and picklable (ids and paths, no meshes): the runner splits it into
    shards and hands items to workers. `load(item)` does the slow part and raises
    `ShapekilnError` (or any exception) for a bad input; the runner records it in failures.jsonl.
    """

    name: str

    def items(self) -> Iterator[Any]: ...

    def item_id(self, item: Any) -> str: ...

    def load(self, item: Any) -> ShapeRecord: ...
