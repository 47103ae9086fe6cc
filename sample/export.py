"""Writing samples: meshes (.obj, .glb, .ply through trimesh), TSDF grids (.npy) and a preview PNG.

Everything is written into a temporary folder first and moved into place file by file, so an
interrupted or failed export never leaves a half-written file in the output directory.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import textwrap
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import trimesh
from PIL import Image, ImageDraw, ImageFont

from shapekiln.data_prep.render import framing_distance, look_at_origin, render_views
from shapekiln.errors import ShapekilnError

MESH_FORMATS = ("obj", "glb", "ply")


def render_shape(mesh: trimesh.Trimesh, size: int = 192, azimuth: float = 45.0, elevation: float = 30.0) -> np.ndarray:
    """A shaded render of a mesh in [-1, 1]³ over white: (size, size, 3) uint8 (plain white if empty)."""
    if len(mesh.faces) == 0:
        return np.full((size, size, 3), 255, np.uint8)
    camera = look_at_origin(azimuth, elevation, framing_distance(40.0), size, 40.0)
    view = render_views(mesh, [camera])[0]  # (size, size, 4) RGBA
    alpha = view[..., 3:] / 255.0
    return (view[..., :3] * alpha + 255 * (1 - alpha)).astype(np.uint8)


def write_samples(meshes: Sequence[trimesh.Trimesh], tsdfs: Sequence[np.ndarray], out: str | Path,
                  condition: dict | None = None, formats: Sequence[str] = MESH_FORMATS, prefix: str = "sample",
                  preview: Image.Image | None = None) -> list[Path]:
    """Write `{prefix}_{i}.{obj,glb,ply,npy}` and `preview.png` into `out`; return the paths written.

    `condition` labels the preview's first column: {"text": str, "image": (H, W, 3) uint8,
    "partial": trimesh.Trimesh}, any of them. `preview` replaces the default sheet.
    """
    check_formats(formats)

    def write(staging: Path) -> list[str]:
        names = []
        for index, (mesh, tsdf) in enumerate(zip(meshes, tsdfs)):
            names += write_shape(staging, f"{prefix}_{index}", mesh, tsdf, formats)
        (preview or preview_sheet(meshes, condition)).save(staging / "preview.png")
        return names + ["preview.png"]

    return write_staged(out, write)


def check_formats(formats: Sequence[str]) -> None:
    unknown = set(formats) - set(MESH_FORMATS)
    if unknown:
        raise ShapekilnError(f"unknown mesh format {sorted(unknown)[0]!r} (choose from {', '.join(MESH_FORMATS)})")


def write_shape(folder: Path, stem: str, mesh: trimesh.Trimesh, tsdf: np.ndarray, formats: Sequence[str]) -> list[str]:
    """`stem.npy` (the grid, float32) and `stem.<format>` for each mesh format (none for an empty mesh); the names written."""
    np.save(folder / f"{stem}.npy", np.asarray(tsdf, dtype=np.float32), allow_pickle=False)
    if len(mesh.faces) == 0:
        return [f"{stem}.npy"]  # no surface: the grid alone is written
    for fmt in formats:
        mesh.export(folder / f"{stem}.{fmt}")
    return [f"{stem}.npy"] + [f"{stem}.{fmt}" for fmt in formats]


def write_staged(out: str | Path, write: Callable[[Path], list[str]]) -> list[Path]:
    """Run `write(staging)` in a temporary folder inside `out`, then move the files it names into `out`.

    A failure part-way leaves `out` as it was, apart from files already moved whole.
    """
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".export-", dir=out))
    except OSError as error:
        raise ShapekilnError(f"cannot write to output directory {out}: {error.strerror or error}") from None
    try:
        names = write(staging)
        written = []
        for name in names:
            os.replace(staging / name, out / name)
            written.append(out / name)
        return written
    except OSError as error:
        raise ShapekilnError(f"cannot write to output directory {out}: {error.strerror or error}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def preview_sheet(meshes: Sequence[trimesh.Trimesh], condition: dict | None = None, cell: int = 192,
                  columns: int = 4, labels: Sequence[str] | None = None) -> Image.Image:
    """A grid of shaded renders, the condition (prompt text, image, partial shape) in the first column;
    `labels`, one per mesh (say "3 pieces"), are written in the corner of its render."""
    panels = [condition_panel(condition, cell)] if condition else []
    renders = [Image.fromarray(render_shape(mesh, cell)) for mesh in meshes]
    for render, label in zip(renders, labels or []):
        if label:
            ImageDraw.Draw(render).text((6, 6), label, fill=(200, 30, 30), font=ImageFont.load_default())
    panels += renders
    columns = min(columns + (1 if condition else 0), len(panels))
    rows = -(-len(panels) // columns)
    sheet = Image.new("RGB", (columns * cell, rows * cell), "white")
    for index, panel in enumerate(panels):
        sheet.paste(panel, ((index % columns) * cell, (index // columns) * cell))
    return sheet


def condition_panel(condition: dict, cell: int) -> Image.Image:
    """The condition as one cell: the image or the partial shape's render, with the prompt written below."""
    panel = Image.new("RGB", (cell, cell), (240, 240, 240))
    if condition.get("image") is not None:
        thumbnail = Image.fromarray(np.asarray(condition["image"], dtype=np.uint8)).convert("RGB")
        thumbnail.thumbnail((cell * 3 // 4, cell * 3 // 4))
        panel.paste(thumbnail, ((cell - thumbnail.width) // 2, 4))
    elif condition.get("partial") is not None:
        render = Image.fromarray(render_shape(condition["partial"], cell * 3 // 4))
        panel.paste(render, ((cell - render.width) // 2, 4))
    text = condition.get("text")
    if text:
        draw = ImageDraw.Draw(panel)
        font = ImageFont.load_default()
        top = cell * 3 // 4 + 8 if (condition.get("image") is not None or condition.get("partial") is not None) else 8
        draw.multiline_text((6, top), "\n".join(textwrap.wrap(text, 28)[:6]), fill=(0, 0, 0), font=font)
    return panel
