"""Objaverse 1.0 objects from a local cache of the `objaverse` package, strictly offline.

The cache is the package's own layout (`~/.objaverse/hf-objaverse-v1` by default):
`object-paths.json.gz`, `lvis-annotations.json.gz`, `metadata/<dir>.json.gz` and
`glbs/<dir>/<uid>.glb`. The package downloads whatever file it misses, so every file is checked
here before a package function reads it: a missing one is an error, never a download.
"""

from __future__ import annotations

import csv
import functools
import itertools
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from shapekiln.data_prep.sources.base import ShapeRecord
from shapekiln.data_prep.sources.folder import CAPTION_COLUMNS, ID_COLUMNS, load_mesh
from shapekiln.errors import ShapekilnError

log = logging.getLogger(__name__)

EXTRA_HINT = 'pip install -e ".[objaverse]"'


def _objaverse():
    """The `objaverse` package, an optional dependency (the `objaverse` extra: it brings pandas and pyarrow)."""
    try:
        import objaverse
    except ImportError:
        raise ShapekilnError(f"the objaverse source needs the objaverse package, which is an extra: {EXTRA_HINT}") from None
    return objaverse

OBJECT_PATHS_FILE = "object-paths.json.gz"
LVIS_FILE = "lvis-annotations.json.gz"


@dataclass(frozen=True)
class ObjaverseItem:
    uid: str
    object_path: str  # relative to the cache: glbs/<dir>/<uid>.glb

    @property
    def metadata_dir(self) -> str:
        return self.object_path.split("/")[1]


class ObjaverseSource:
    """Objaverse objects whose GLB is in the cache: the given uids, the union of the given LVIS
    categories, or everything cached, sorted by uid and cut to `limit`.

    Captions come from a Cap3D-style CSV (`uid,caption`, with or without a header row) where it has
    the uid, else from the Sketchfab annotations (name, name with tags, first sentence of the
    description). The category is the LVIS one, else the first Sketchfab category, else "unknown".
    """

    name = "objaverse"

    def __init__(
        self,
        cache_dir: str | os.PathLike | None = None,
        uids: list[str] | None = None,
        lvis_categories: list[str] | None = None,
        captions_csv: str | os.PathLike | None = None,
        limit: int | None = None,
    ):
        objaverse = _objaverse()
        if cache_dir is not None:
            # The package reads the module global _VERSIONED_PATH each time one of its functions
            # runs (BASE_PATH only at import, so setting that now would do nothing).
            objaverse._VERSIONED_PATH = str(Path(cache_dir).expanduser().resolve())
        self.cache_dir = Path(objaverse._VERSIONED_PATH)
        if not self.cache_dir.is_dir():
            raise ShapekilnError(
                f"Objaverse cache not found: {self.cache_dir} (fill it with objaverse.load_objects "
                f"on a machine with network, or pass cache_dir)"
            )
        if limit is not None and limit < 0:
            raise ShapekilnError(f"limit must be 0 or more, got {limit}")
        self._has(OBJECT_PATHS_FILE)
        object_paths = objaverse._load_object_paths()
        # LVIS categories are optional for labelling, required for selecting by category.
        has_lvis = self._has(LVIS_FILE, required=bool(lvis_categories))
        lvis = objaverse.load_lvis_annotations() if has_lvis else {}
        unknown = sorted(set(lvis_categories or []) - set(lvis))
        if unknown:
            raise ShapekilnError(f"unknown LVIS categories: {', '.join(unknown)}")

        wanted = set(uids) if uids is not None else set(object_paths)
        if lvis_categories:
            wanted &= {uid for category in lvis_categories for uid in lvis[category]}
        on_disk = _cached_object_paths(self.cache_dir)
        selected = sorted(uid for uid in wanted if object_paths.get(uid) in on_disk)
        # With neither uids nor categories, "wanted" is the whole dataset and a cache holds a part
        # of it by design; otherwise the user asked for these uids and should hear which are absent.
        self.missing = sorted(wanted.difference(selected)) if uids or lvis_categories else []
        if self.missing:
            log.warning("%d requested Objaverse uids have no GLB in %s, skipped (first: %s)",
                        len(self.missing), self.cache_dir, ", ".join(self.missing[:5]))
        selected = selected[:limit]
        self._items = [ObjaverseItem(uid, object_paths[uid]) for uid in selected]

        # Everything the workers need is kept for the selected uids only, so it pickles small.
        selected_set = set(selected)
        self._captions = read_cap3d_csv(Path(captions_csv), selected_set) if captions_csv else {}
        self._lvis_category: dict[str, str] = {}
        for category in sorted(lvis):
            for uid in lvis[category]:
                if uid in selected_set:
                    self._lvis_category.setdefault(uid, category)
        # One metadata file read serves every selected uid in it, so workers ask for them together.
        by_file: dict[str, list[str]] = {}
        for item in self._items:
            by_file.setdefault(item.metadata_dir, []).append(item.uid)
        self._uids_by_metadata_file = {name: tuple(group) for name, group in by_file.items()}
        # Metadata is optional for uids captioned by the CSV; for the others a missing file is a
        # run-level error, said once here rather than once per shape.
        for metadata_dir, dir_uids in sorted(self._uids_by_metadata_file.items()):
            if any(uid not in self._captions for uid in dir_uids):
                self._has(f"metadata/{metadata_dir}.json.gz")

    def items(self) -> Iterator[ObjaverseItem]:
        return iter(self._items)

    def item_id(self, item: ObjaverseItem) -> str:
        return item.uid

    def load(self, item: ObjaverseItem) -> ShapeRecord:
        mesh = load_mesh(self.cache_dir / item.object_path)
        annotation = self._annotation(item)
        lvis_category = self._lvis_category.get(item.uid)
        category = lvis_category or (annotation["categories"] or ["unknown"])[0]
        captions = self._captions.get(item.uid) or annotation_captions(annotation)
        if not captions and category != "unknown":
            captions = [f"a {category.replace('_', ' ')}"]
        if not captions:
            raise ShapekilnError(f"{item.uid}: no caption (no captions CSV row, empty annotations)")
        return ShapeRecord(
            id=item.uid,
            mesh=mesh,
            captions=captions,
            category=category,
            attributes={
                "license": annotation["license"],
                "tags": annotation["tags"],
                "lvis_category": lvis_category,
            },
            source=self.name,
        )

    def _has(self, relative: str, required: bool = True) -> bool:
        """Whether a cache file exists; a required one that does not is an error naming it."""
        exists = (self.cache_dir / relative).is_file()
        if required and not exists:
            raise ShapekilnError(
                f"Objaverse cache {self.cache_dir} has no {relative}; the objaverse package would "
                f"download it, and data prep runs offline"
            )
        return exists

    def _annotation(self, item: ObjaverseItem) -> dict[str, Any]:
        """The uid's slim annotation; empty fields where its metadata file is not in the cache."""
        empty = {"name": "", "tags": [], "categories": [], "description": "", "license": None}
        if not self._has(f"metadata/{item.metadata_dir}.json.gz", required=False):
            return empty
        annotations = _metadata_file_annotations(
            str(self.cache_dir), item.metadata_dir, self._uids_by_metadata_file[item.metadata_dir]
        )
        return annotations.get(item.uid, empty)


@functools.lru_cache(maxsize=None)
def _metadata_file_annotations(
    cache_dir: str, metadata_dir: str, uids: tuple[str, ...]
) -> dict[str, dict[str, Any]]:
    """Slim annotations of `uids`, all in one metadata file: read once per worker process, since a
    file holds thousands of full records and takes a second to parse."""
    # A worker process imports objaverse afresh (spawn), with the default path.
    objaverse = _objaverse()
    objaverse._VERSIONED_PATH = cache_dir
    return {uid: _slim(record) for uid, record in objaverse.load_annotations(list(uids)).items()}


def _slim(record: dict[str, Any]) -> dict[str, Any]:
    """The fields we use, out of a record that also holds thumbnails, user and archive details."""
    return {
        "name": record.get("name") or "",
        "tags": [tag["name"] for tag in record.get("tags") or [] if tag.get("name")],
        "categories": [c["name"] for c in record.get("categories") or [] if c.get("name")],
        "description": record.get("description") or "",
        "license": record.get("license"),
    }


def annotation_captions(annotation: dict[str, Any]) -> list[str]:
    """Name, name with tags, first sentence of the description: cleaned, deduplicated, non-empty."""
    name = _clean(annotation["name"].replace("_", " "))
    tags = ", ".join(annotation["tags"])
    candidates = [
        name, f"{name}, {tags}" if name and tags else "", _first_sentence(annotation["description"])
    ]
    captions: list[str] = []
    for caption in candidates:
        if caption and caption.lower() not in {c.lower() for c in captions}:
            captions.append(caption)
    return captions


def _clean(text: str) -> str:
    """Plain text out of Sketchfab's markup: no HTML tags, no links, single spaces."""
    text = re.sub(r"<[^>]+>", " ", text)
    text = re.sub(r"https?://\S+|www\.\S+", " ", text)
    return " ".join(text.split())


def _first_sentence(description: str) -> str:
    # Descriptions are often lists of lines ("Speed: ..."): a line break also ends a sentence.
    first_line = next(filter(None, map(_clean, description.splitlines())), "")
    return re.split(r"(?<=[.!?])\s", first_line, maxsplit=1)[0]


def read_cap3d_csv(path: Path, uids: set[str]) -> dict[str, list[str]]:
    """Captions for `uids` from a `uid,caption` CSV. Cap3D's own file has no header row, so a first
    row is a header only when its cells are column names."""
    if not path.is_file():
        raise ShapekilnError(f"captions CSV not found: {path}")
    with open(path, newline="", encoding="utf-8-sig") as file:
        rows = csv.reader(file)
        first = next(rows, None)
        if first is None:
            raise ShapekilnError(f"captions CSV {path} is empty")
        names = [cell.strip().lower() for cell in first]
        uid_column, caption_column = 0, 1
        if set(ID_COLUMNS + CAPTION_COLUMNS) & set(names):
            uid_column = next((names.index(c) for c in ID_COLUMNS if c in names), None)
            caption_column = next((names.index(c) for c in CAPTION_COLUMNS if c in names), None)
            if uid_column is None or caption_column is None:
                raise ShapekilnError(
                    f"captions CSV {path} needs a uid column (uid, id or modelId) and a caption "
                    f"column (caption, text or description); found: {', '.join(first)}"
                )
        elif len(first) < 2:
            raise ShapekilnError(f"captions CSV {path} has one column; expected uid,caption")
        else:
            rows = itertools.chain([first], rows)
        captions: dict[str, list[str]] = {}
        for row in rows:
            if len(row) <= max(uid_column, caption_column):
                continue
            uid, caption = row[uid_column].strip(), " ".join(row[caption_column].split())
            if uid in uids and caption and caption not in captions.setdefault(uid, []):
                captions[uid].append(caption)
    return captions


def _cached_object_paths(cache_dir: Path) -> set[str]:
    """Object paths (glbs/<dir>/<uid>.glb) of the GLBs in the cache, from one directory listing
    rather than a stat per uid of an 800k-object index. Partial downloads end in .tmp: left out."""
    glbs = cache_dir / "glbs"
    if not glbs.is_dir():
        return set()
    return {
        f"glbs/{directory.name}/{entry.name}"
        for directory in os.scandir(glbs) if directory.is_dir()
        for entry in os.scandir(directory.path) if entry.name.endswith(".glb")
    }
