"""A folder of mesh files (ShapeNet's layout or any other), captioned from an optional CSV."""

from __future__ import annotations

import csv
import hashlib
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import trimesh

from shapekiln.data_prep.sources.base import ShapeRecord
from shapekiln.errors import ShapekilnError

MESH_EXTENSIONS = (".glb", ".gltf", ".obj", ".off", ".ply", ".stl")

# Mesh formats we cannot read: listed as items so each shows up in failures.jsonl with the reason,
# rather than vanishing from the dataset without a trace. Every other file (.mtl, textures, .bin
# buffers, notes) is a companion or unrelated and is skipped silently.
UNSUPPORTED_MESH_EXTENSIONS = frozenset(
    {".fbx", ".blend", ".3ds", ".max", ".dae", ".usd", ".usda", ".usdc", ".usdz", ".x3d", ".x3db",
     ".wrl", ".vrml", ".3mf", ".abc", ".lwo", ".ma", ".mb", ".c4d", ".step", ".stp", ".iges",
     ".igs"}
)

# ShapeNetCore v2's 55 synsets, named as people say them (the WordNet names are long lists).
SHAPENET_SYNSETS = {
    "02691156": "airplane", "02747177": "trash bin", "02773838": "bag", "02801938": "basket",
    "02808440": "bathtub", "02818832": "bed", "02828884": "bench", "02843684": "birdhouse",
    "02871439": "bookshelf", "02876657": "bottle", "02880940": "bowl", "02924116": "bus",
    "02933112": "cabinet", "02942699": "camera", "02946921": "can", "02954340": "cap",
    "02958343": "car", "02992529": "cellphone", "03001627": "chair", "03046257": "clock",
    "03085013": "keyboard", "03207941": "dishwasher", "03211117": "display", "03261776": "earphone",
    "03325088": "faucet", "03337140": "file cabinet", "03467517": "guitar", "03513137": "helmet",
    "03593526": "jar", "03624134": "knife", "03636649": "lamp", "03642806": "laptop",
    "03691459": "loudspeaker", "03710193": "mailbox", "03759954": "microphone",
    "03761084": "microwave", "03790512": "motorbike", "03797390": "mug", "03928116": "piano",
    "03938244": "pillow", "03948459": "pistol", "03991062": "flowerpot", "04004475": "printer",
    "04074963": "remote control", "04090263": "rifle", "04099429": "rocket",
    "04225987": "skateboard", "04256520": "sofa", "04330267": "stove", "04379243": "table",
    "04401088": "telephone", "04460130": "tower", "04468005": "train", "04530566": "watercraft",
    "04554684": "washer",
}

# Column names accepted in a captions CSV, by priority. Text2Shape's files have both `id` (a
# per-caption row number) and `modelId` (the ShapeNet model), so `modelId` must win.
ID_COLUMNS = ("modelid", "uid", "id")
CAPTION_COLUMNS = ("description", "caption", "text")

_UNSAFE_KEY_CHARS = re.compile(r"[^A-Za-z0-9_-]+")


@dataclass(frozen=True)
class FolderItem:
    """One file under the root: what `items()` hands to the workers."""

    id: str
    path: str  # relative to the root, with forward slashes
    category: str
    shapenet: bool


class FolderSource:
    """Every mesh file under `root`, recursively; captions from `captions_csv` or a default.

    A file at `<synset>/<model_id>/models/model_normalized.obj` (ShapeNetCore v2) gets the id
    `model_id` and the synset's name as category; any other file gets its relative path as id and
    its folder's name as category.
    """

    name = "folder"

    def __init__(self, root: str | os.PathLike, captions_csv: str | os.PathLike | None = None):
        self.root = Path(root).expanduser().resolve()
        if not self.root.is_dir():
            raise ShapekilnError(f"mesh folder not found: {self.root}")
        self._captions, self._csv_categories = (
            read_captions_csv(Path(captions_csv)) if captions_csv is not None else ({}, {})
        )
        self._items = _scan(self.root)
        if not self._items:
            raise ShapekilnError(
                f"no mesh files ({', '.join(MESH_EXTENSIONS)}) found under {self.root}"
            )

    def items(self) -> Iterator[FolderItem]:
        return iter(self._items)

    def item_id(self, item: FolderItem) -> str:
        return item.id

    def load(self, item: FolderItem) -> ShapeRecord:
        mesh = load_mesh(self.root / item.path)
        # A CSV row may name a shape by its id or by its path relative to the root.
        keys = (item.id, item.path, Path(item.path).with_suffix("").as_posix())
        captions = next((self._captions[key] for key in keys if key in self._captions), [])
        category = next(
            (self._csv_categories[key] for key in keys if key in self._csv_categories),
            item.category,
        )
        return ShapeRecord(
            id=item.id,
            mesh=mesh,
            captions=captions or [_default_caption(item, category)],
            category=category,
            attributes={"path": item.path},
            source=self.name,
        )


def load_mesh(path: Path) -> trimesh.Trimesh:
    """One mesh file as a single Trimesh with its visuals; a ShapekilnError says what is wrong."""
    suffix = path.suffix.lower()
    if suffix not in MESH_EXTENSIONS:
        raise ShapekilnError(
            f"{path}: unsupported extension {suffix} (supported: {', '.join(MESH_EXTENSIONS)})"
        )
    if not path.is_file():
        raise ShapekilnError(f"{path}: file not found")
    try:
        # process=False: trimesh's clean-up would silently drop NaN vertices and their faces,
        # hiding a broken file. force="mesh" concatenates a scene with its node transforms applied.
        mesh = trimesh.load(path, file_type=suffix[1:], force="mesh", process=False)
    except Exception as error:
        reason = " ".join(str(error).split()) or "no details"
        raise ShapekilnError(
            f"{path}: cannot read mesh ({type(error).__name__}: {reason})"
        ) from error
    if not isinstance(mesh, trimesh.Trimesh) or len(mesh.faces) == 0:
        raise ShapekilnError(f"{path}: mesh has no faces")
    not_finite = ~np.isfinite(mesh.vertices).all(axis=1)
    if not_finite.any():
        raise ShapekilnError(
            f"{path}: {not_finite.sum()} of {len(mesh.vertices)} vertices are not finite (NaN/Inf)"
        )
    # Now the clean-up trimesh.load would have done: merge duplicate vertices (an STL stores three
    # per face) while keeping vertices apart where their UVs differ.
    mesh.process()
    return mesh


def read_captions_csv(path: Path) -> tuple[dict[str, list[str]], dict[str, str]]:
    """Captions by id (several rows per id give several captions), and categories where given."""
    if not path.is_file():
        raise ShapekilnError(f"captions CSV not found: {path}")
    with open(path, newline="", encoding="utf-8-sig") as file:
        reader = csv.DictReader(file)
        columns = {name.strip().lower(): name for name in reader.fieldnames or []}
        id_column = next((columns[c] for c in ID_COLUMNS if c in columns), None)
        caption_column = next((columns[c] for c in CAPTION_COLUMNS if c in columns), None)
        if id_column is None or caption_column is None:
            found = ", ".join(reader.fieldnames or []) or "no columns"
            raise ShapekilnError(
                f"captions CSV {path} needs an id column (modelId, uid or id) and a caption column "
                f"(description, caption or text); found: {found}"
            )
        category_column = columns.get("category")
        captions: dict[str, list[str]] = {}
        categories: dict[str, str] = {}
        for row in reader:
            shape_id = (row[id_column] or "").strip()
            caption = " ".join((row[caption_column] or "").split())
            if not shape_id:
                continue
            if caption and caption not in captions.setdefault(shape_id, []):
                captions[shape_id].append(caption)
            if category_column and (row[category_column] or "").strip():
                # Lower case so Text2Shape's "Chair" agrees with the ShapeNet synset name "chair".
                categories[shape_id] = row[category_column].strip().lower()
    return captions, categories


def _scan(root: Path) -> list[FolderItem]:
    """All mesh files under root, sorted by path, with ids made unique."""
    items = []
    for directory, subdirectories, files in os.walk(root):
        # Hidden entries are version control, editor and macOS "._name" litter, never assets.
        subdirectories[:] = [d for d in subdirectories if not d.startswith(".")]
        for file_name in files:
            suffix = Path(file_name).suffix.lower()
            if file_name.startswith(".") or (
                suffix not in MESH_EXTENSIONS and suffix not in UNSUPPORTED_MESH_EXTENSIONS
            ):
                continue
            items.append(_describe(Path(directory, file_name).relative_to(root)))
    items.sort(key=lambda item: item.path)
    # Two files can sanitize to one id ("a/b.obj" and "a/b.ply", one model in two synsets): give
    # each of them a suffix from its path, so ids stay unique and do not depend on what else exists.
    counts = Counter(item.id for item in items)
    return [
        FolderItem(
            f"{item.id}-{hashlib.sha1(item.path.encode()).hexdigest()[:8]}",
            item.path, item.category, item.shapenet,
        )
        if counts[item.id] > 1 else item
        for item in items
    ]


def _describe(relative: Path) -> FolderItem:
    parts = relative.parts
    if relative.name == "model_normalized.obj" and len(parts) >= 4 and parts[-2] == "models":
        synset, model_id = parts[-4], parts[-3]
        return FolderItem(
            _safe_key(model_id), relative.as_posix(), SHAPENET_SYNSETS.get(synset, synset), True
        )
    category = parts[-2] if len(parts) > 1 else "unknown"
    return FolderItem(
        _safe_key("-".join(parts[:-1] + (relative.stem,))), relative.as_posix(), category, False
    )


def _safe_key(text: str) -> str:
    """A webdataset key: letters, digits, '_' and '-' only (a '.' would split the sample)."""
    return _UNSAFE_KEY_CHARS.sub("_", text).strip("_") or "shape"


def _default_caption(item: FolderItem, category: str) -> str:
    """'a chair' from the category for ShapeNet (whose file names say nothing), else from the
    file name."""
    words = category if item.shapenet else Path(item.path).stem
    # Drop numbering ("chair_03" → "chair"); fall back to the category, then to a generic noun.
    phrase = " ".join(w for w in re.split(r"[\s_\-.]+", words) if w and not w.isdigit())
    if not phrase and category != "unknown":
        phrase = category.replace("_", " ")
    phrase = phrase or "3D shape"
    return f"{'an' if phrase[0].lower() in 'aeiou' else 'a'} {phrase}"
