"""Contact sheets for eyeballing prepared samples, and TSDF → mesh by marching cubes.

A sheet has one row per sample, each `cell` pixels high:

    | label (2 cells) | views (views_per_row cells) | XY, ZY, XZ slices | iso-surface |

so the PNG is `(2 + views_per_row + 4) * cell` wide and `len(samples) * cell` high.
"""
from __future__ import annotations

import os
import tempfile
import textwrap
from pathlib import Path

import mcubes
import numpy as np
import trimesh
from PIL import Image, ImageDraw, ImageFont

from shapekiln.data_prep.render import framing_distance, look_at_origin, render_views
from shapekiln.errors import ShapekilnError

LABEL_CELLS = 2
SLICE_CELLS = 3
ISO_CELLS = 1
SLICE_BORDER = 1  # pixels
WHITE = np.array([255.0, 255.0, 255.0])
# Ends of a ColorBrewer RdBu-like diverging map: negative (inside) blue, positive (outside) red.
INSIDE_BLUE = np.array([33.0, 102.0, 172.0])
OUTSIDE_RED = np.array([178.0, 24.0, 43.0])


def tsdf_to_mesh(tsdf: np.ndarray, level: float = 0.0) -> trimesh.Trimesh:
    """The `level` iso-surface of a TSDF grid, in world coordinates, normals pointing outward.

    `tsdf` is (Rx, Ry, Rz), indexed [x, y, z] at voxel centers of [-1, 1]³, negative inside.
    A grid with no sign change gives an empty mesh.
    """
    tsdf = np.asarray(tsdf, dtype=np.float64)  # shards store float16; PyMCubes wants float64
    vertices, faces = mcubes.marching_cubes(tsdf, level)  # vertices in voxel-index units
    if len(faces) == 0:
        return trimesh.Trimesh(np.zeros((0, 3)), np.zeros((0, 3), dtype=np.int64), process=False)
    resolution = np.array(tsdf.shape, dtype=np.float64)
    vertices = -1.0 + (vertices + 0.5) * (2.0 / resolution)
    # PyMCubes winds triangles for fields that are positive inside; ours are negative inside.
    return trimesh.Trimesh(vertices, faces[:, ::-1], process=False)


def contact_sheet(samples: list[dict], path: str | os.PathLike, views_per_row: int = 4,
                  cell: int = 128) -> Path:
    """Write one PNG row per sample (dict with id, caption, views, tsdf); return the path.

    `views` is (K, H, W, 4) uint8 RGBA; the first `views_per_row` are shown over white.
    """
    from shapekiln.metrics import structure

    if not samples:
        raise ShapekilnError("contact_sheet needs at least one sample")
    path = Path(path)
    columns = LABEL_CELLS + views_per_row + SLICE_CELLS + ISO_CELLS
    sheet = Image.new("RGB", (columns * cell, len(samples) * cell), "white")
    iso_camera = look_at_origin(azimuth_deg=45.0, elevation_deg=30.0, distance=framing_distance(40.0),
                                size=cell, fov_deg=40.0)

    for row, sample in enumerate(samples):
        top = row * cell
        pieces = structure(sample["tsdf"])["pieces"]  # a shape in pieces says so beside its caption
        label = f"{sample['id']}: {sample['caption']}" + ("" if pieces == 1 else f" [{pieces} pieces]")
        sheet.paste(_label(label, LABEL_CELLS * cell, cell), (0, top))
        x = LABEL_CELLS * cell
        for view in np.asarray(sample["views"])[:views_per_row]:
            sheet.paste(_over_white(view).resize((cell, cell), Image.BILINEAR), (x, top))
            x += cell
        x = (LABEL_CELLS + views_per_row) * cell
        for tsdf_slice in _middle_slices(np.asarray(sample["tsdf"], dtype=np.float64)):
            # A white border keeps neighboring slices (mostly red) from merging into one block.
            slice_image = _diverging(tsdf_slice).resize((cell - 2 * SLICE_BORDER,) * 2, Image.NEAREST)
            sheet.paste(slice_image, (x + SLICE_BORDER, top + SLICE_BORDER))
            x += cell
        surface = tsdf_to_mesh(sample["tsdf"])
        if len(surface.faces):
            sheet.paste(_over_white(render_views(surface, [iso_camera])[0]), (x, top))

    path.parent.mkdir(parents=True, exist_ok=True)
    # Write beside the target and rename, so a reader never sees a half-written PNG.
    handle, tmp_name = tempfile.mkstemp(suffix=".tmp.png", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as tmp_file:
            sheet.save(tmp_file, format="PNG")
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return path


def _middle_slices(tsdf: np.ndarray) -> list[np.ndarray]:
    """Three orthogonal middle slices as images (rows top to bottom, columns left to right).

    XY (front, +Y up, +X right), ZY (side, +Y up, +Z right) and XZ (top-down, +X right,
    +Z toward the bottom, as seen from above with the front facing down).
    """
    mid_x, mid_y, mid_z = (n // 2 for n in tsdf.shape)
    front = tsdf[:, :, mid_z].T[::-1]  # (Ry, Rx), +Y up
    side = tsdf[mid_x, :, :][::-1]  # (Ry, Rz), +Y up
    top = tsdf[:, mid_y, :].T  # (Rz, Rx), +Z down
    return [front, side, top]


def _diverging(values: np.ndarray) -> Image.Image:
    """Blue inside, red outside, white at the surface; scaled by the truncation ±tau."""
    tau = float(np.abs(values).max()) or 1.0
    t = np.clip(values / tau, -1.0, 1.0)[..., None]  # (A, B, 1)
    rgb = np.where(t < 0, WHITE + (INSIDE_BLUE - WHITE) * -t, WHITE + (OUTSIDE_RED - WHITE) * t)
    return Image.fromarray(np.rint(rgb).astype(np.uint8), "RGB")


def _over_white(view: np.ndarray) -> Image.Image:
    """Composite a (H, W, 4) uint8 RGBA view over white → RGB image."""
    alpha = view[..., 3:4].astype(np.float64) / 255.0
    rgb = view[..., :3] * alpha + WHITE * (1.0 - alpha)
    return Image.fromarray(np.rint(rgb).astype(np.uint8), "RGB")


def _label(text: str, width: int, height: int) -> Image.Image:
    """Text wrapped to the cell, truncated with '...' when it runs out of lines."""
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    margin = 4
    char_width = font.getlength("abcdefghijklmnopqrstuvwxyz") / 26
    line_height = font.getbbox("Ag")[3] + 2
    chars_per_line = max(1, int((width - 2 * margin) / char_width))
    max_lines = max(1, int((height - 2 * margin) / line_height))
    lines = textwrap.wrap(text, chars_per_line) or [""]
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = lines[-1][: max(0, chars_per_line - 3)] + "..."
    for i, line in enumerate(lines):
        draw.text((margin, margin + i * line_height), line, fill="black", font=font)
    return image
