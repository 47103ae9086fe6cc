"""Partial shapes for completion: a mesh, a point cloud or a TSDF grid → (TSDF, known-region mask).

The known region is what the user keeps:
    "z<0", "x>0.1", ...        a half-space (axis, < or >, a coordinate in [-1, 1])
    "box:x0,y0,z0,x1,y1,z1"    the inside of an axis-aligned box
    "observed"                 the voxels near a point cloud's points (point clouds only)

Inputs are taken in the model's frame, [-1, 1]³, as shapekiln writes its own meshes and grids;
`normalize=True` fits a mesh or point cloud into it the way data preparation does. A point cloud
becomes a thin shell: voxels within one voxel of a point are inside, the rest of the observed
band outside, which is what a scan tells about the surface and nothing more.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import trimesh
from scipy.spatial import cKDTree

from shapekiln.data_prep.process import check_mesh, normalize
from shapekiln.data_prep.sources.folder import load_mesh
from shapekiln.data_prep.tsdf import compute_tsdf, grid_points
from shapekiln.errors import ShapekilnError

EXTENT = 0.8  # as data preparation normalizes (configs/data: extent)
POINT_CLOUD_EXTENSIONS = (".xyz", ".ply")


@dataclass
class PartialShape:
    tsdf: np.ndarray  # (R, R, R) float32, negative inside, unknown voxels as computed (they are masked later)
    known: np.ndarray  # (R, R, R) bool


def load_partial(path: str | Path, resolution: int, tau: float, keep: str, normalize_input: bool = False) -> PartialShape:
    path = Path(path)
    if not path.is_file():
        raise ShapekilnError(f"partial shape not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return PartialShape(read_grid(path, resolution), known_region(keep, resolution))
    points = _read_points(path) if suffix in POINT_CLOUD_EXTENSIONS else None
    if points is not None:
        return _from_points(points, resolution, tau, keep, normalize_input)
    return PartialShape(mesh_tsdf(path, resolution, tau, normalize_input), known_region(keep, resolution))


def mesh_tsdf(path: Path, resolution: int, tau: float, normalize_input: bool = False) -> np.ndarray:
    """A mesh file in the model's frame (or fitted into it with `normalize_input`) → its TSDF grid (R, R, R)."""
    mesh = load_mesh(path)
    try:
        check_mesh(mesh)
    except ShapekilnError as error:
        raise ShapekilnError(f"{path}: {error}") from None
    if normalize_input:
        mesh, _ = normalize(mesh, EXTENT)
    _check_inside_cube(mesh.vertices, path)
    return compute_tsdf(mesh.vertices, mesh.faces, resolution, tau)


def known_region(keep: str, resolution: int, points: np.ndarray | None = None) -> np.ndarray:
    """The known-voxel mask (R, R, R) for a --keep expression."""
    centers = grid_points(resolution).reshape(resolution, resolution, resolution, 3)
    keep = keep.strip().replace(" ", "")
    half_space = re.fullmatch(r"([xyz])([<>])(-?\d*\.?\d+)", keep)
    if half_space:
        axis, op, value = "xyz".index(half_space[1]), half_space[2], float(half_space[3])
        return centers[..., axis] < value if op == "<" else centers[..., axis] > value
    if keep.startswith("box:"):
        try:
            low_high = np.array([float(v) for v in keep[4:].split(",")])
        except ValueError:
            low_high = np.zeros(0)
        if low_high.shape != (6,) or (low_high[:3] >= low_high[3:]).any():
            raise ShapekilnError(f"--keep {keep!r}: a box is box:x0,y0,z0,x1,y1,z1 with each low below its high")
        return ((centers >= low_high[:3]) & (centers <= low_high[3:])).all(axis=-1)
    if keep == "observed":
        if points is None:
            raise ShapekilnError("--keep observed is for point clouds; for a mesh or grid give a half-space (z<0) or box:...")
        voxel = 2.0 / resolution
        distance, _ = cKDTree(points).query(centers.reshape(-1, 3))
        return (distance <= 3.0 * voxel).reshape(centers.shape[:3])
    raise ShapekilnError(f"--keep {keep!r}: give a half-space like z<0 or x>0.2, box:x0,y0,z0,x1,y1,z1, or observed")


def read_grid(path: Path, resolution: int | None) -> np.ndarray:
    """A TSDF grid saved as .npy (as `shapekiln sample` writes them) → float32 (R, R, R), checked (any R when `resolution` is None)."""
    try:
        tsdf = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as error:
        raise ShapekilnError(f"{path}: not a readable .npy grid ({error})") from None
    expected = (resolution,) * 3 if resolution is not None else (tsdf.shape[0],) * 3
    if tsdf.shape != expected or not np.issubdtype(tsdf.dtype, np.floating):
        raise ShapekilnError(f"{path}: expected a float {resolution or 'R'}³ TSDF grid, got {tsdf.dtype} {tsdf.shape}")
    if not np.isfinite(tsdf).all():
        raise ShapekilnError(f"{path}: the grid has NaN or infinite values")
    return tsdf.astype(np.float32)


def _read_points(path: Path) -> np.ndarray | None:
    """(N, 3) points of a point cloud file; None for a .ply that holds a mesh (it has faces)."""
    try:
        if path.suffix.lower() == ".xyz":
            points = np.loadtxt(path, ndmin=2)[:, :3]
        else:
            loaded = trimesh.load(path, process=False)
            if isinstance(loaded, trimesh.Trimesh) and len(loaded.faces):
                return None
            points = np.asarray(loaded.vertices)
    except (ValueError, OSError, IndexError) as error:
        raise ShapekilnError(f"{path}: cannot read points ({' '.join(str(error).split())})") from None
    if len(points) == 0 or points.shape[1] != 3:
        raise ShapekilnError(f"{path}: no points")
    if not np.isfinite(points).all():
        raise ShapekilnError(f"{path}: points with NaN or infinite coordinates")
    return points


def _from_points(points: np.ndarray, resolution: int, tau: float, keep: str, normalize_input: bool) -> PartialShape:
    if normalize_input:
        low, high = points.min(axis=0), points.max(axis=0)
        if (high - low).max() <= 0:
            raise ShapekilnError("the point cloud has zero extent")
        points = (points - (low + high) / 2.0) * (2.0 * EXTENT / (high - low).max())
    _check_inside_cube(points, "the point cloud")
    voxel = 2.0 / resolution
    distance, _ = cKDTree(points).query(grid_points(resolution))
    tsdf = np.clip(distance - voxel, -tau, tau).reshape((resolution,) * 3).astype(np.float32)
    return PartialShape(tsdf, known_region(keep, resolution, points))


def _check_inside_cube(vertices: np.ndarray, what: object) -> None:
    if np.abs(vertices).max() > 1.0:
        raise ShapekilnError(f"{what} lies outside [-1, 1]³ (the model's frame); pass --normalize to fit it in")
