"""One shape → one training sample: normalize, TSDF grid, rendered views, captions, meta."""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import trimesh
from PIL import Image

from shapekiln.data_prep.render import Camera, orbit_cameras, render_views
from shapekiln.data_prep.sources.base import ShapeRecord
from shapekiln.data_prep.tsdf import add_thin_shell, compute_tsdf, is_closed
from shapekiln.errors import ShapekilnError


@dataclass
class PrepConfig:
    """What a prepared dataset is made of (configs/data/*.yaml); saved in the dataset's dataset.json."""

    resolution: int = 32
    tau: float = 0.2
    extent: float = 0.8  # the longest side spans [-extent, extent] after normalization
    views: int = 8
    view_size: int = 128
    fov_deg: float = 40.0
    shard_size: int = 64
    max_faces: int = 100_000
    over_face_limit: Literal["decimate", "skip"] = "decimate"
    val_fraction: float = 0.05
    test_fraction: float = 0.05
    # Open meshes: surfaces with nothing inside on either side (sheets) get a shell this many voxels
    # thick, so a chair made of single-sided planes keeps its seat and back; 0 turns it off.
    # Closed meshes are never touched.
    thin_shell: float = 1.5

    def validate(self) -> None:
        if self.resolution < 4 or self.resolution % 4:
            raise ValueError(f"resolution must be a multiple of 4 and at least 4, got {self.resolution}")
        if not 0 < self.tau <= 2:
            raise ValueError(f"tau must be in (0, 2], got {self.tau}")
        if not 0 < self.extent <= 1:
            raise ValueError(f"extent must be in (0, 1], got {self.extent}")
        if self.views < 0 or self.view_size < 8 or self.shard_size < 1 or self.max_faces < 4:
            raise ValueError("views >= 0, view_size >= 8, shard_size >= 1 and max_faces >= 4 are required")
        if not 0 <= self.thin_shell <= self.resolution:
            raise ValueError(f"thin_shell must be between 0 and the resolution ({self.resolution}) voxels, got {self.thin_shell}")
        if self.val_fraction < 0 or self.test_fraction < 0 or self.val_fraction + self.test_fraction >= 1:
            raise ValueError("val_fraction and test_fraction must be >= 0 and sum to less than 1")

    def cameras(self) -> list[Camera]:
        return orbit_cameras(self.views, size=self.view_size, fov_deg=self.fov_deg)


def split_of(shape_id: str, config: PrepConfig) -> str:
    """train/val/test from a hash of the id alone, so a shape keeps its split whatever else is in the set."""
    unit = int.from_bytes(hashlib.sha1(shape_id.encode()).digest()[:8], "big") / 2.0**64
    if unit < config.val_fraction:
        return "val"
    if unit < config.val_fraction + config.test_fraction:
        return "test"
    return "train"


def check_mesh(mesh: trimesh.Trimesh, flat_ok: bool = False) -> None:
    """Raise ShapekilnError for a mesh no TSDF can be made of; `flat_ok`: a planar mesh is kept (a thin
    shell gives it volume)."""
    if not isinstance(mesh, trimesh.Trimesh) or len(mesh.faces) == 0 or len(mesh.vertices) == 0:
        raise ShapekilnError("empty mesh (no faces)")
    if not np.isfinite(mesh.vertices).all():
        raise ShapekilnError("mesh has NaN or infinite vertex coordinates")
    extents = mesh.vertices.max(axis=0) - mesh.vertices.min(axis=0)
    if extents.max() <= 0 or mesh.area <= 1e-12 * extents.max() ** 2:
        raise ShapekilnError("degenerate mesh (zero extent or zero surface area)")
    if not flat_ok and extents.min() <= 1e-6 * extents.max():
        raise ShapekilnError("zero-volume mesh (all vertices lie in one plane; thin_shell > 0 gives a sheet volume)")


def normalize(mesh: trimesh.Trimesh, extent: float) -> tuple[trimesh.Trimesh, np.ndarray]:
    """Center on the bounding-box center and scale so the longest side spans [-extent, extent].

    Returns the normalized copy and the 4x4 transform from original to normalized coordinates.
    """
    low, high = mesh.vertices.min(axis=0), mesh.vertices.max(axis=0)
    scale = 2.0 * extent / float((high - low).max())
    transform = np.eye(4)
    transform[:3, :3] *= scale
    transform[:3, 3] = -scale * (low + high) / 2.0
    normalized = mesh.copy()
    normalized.apply_transform(transform)
    return normalized, transform


def prepare_sample(record: ShapeRecord, config: PrepConfig, cameras: list[Camera]) -> dict[str, Any]:
    """A webdataset sample (key → bytes) for one shape; ShapekilnError says why a shape is unusable."""
    check_mesh(record.mesh, flat_ok=config.thin_shell > 0)
    flags: dict[str, Any] = {}
    # The views are rendered from the mesh as given (its texture or colors); a mesh over the face limit is
    # decimated for the distance field alone, since decimation drops the visuals.
    shown, transform = normalize(record.mesh, config.extent)
    mesh = shown
    if len(mesh.faces) > config.max_faces:
        if config.over_face_limit == "skip":
            raise ShapekilnError(f"{len(mesh.faces)} faces is over the limit of {config.max_faces} (over_face_limit: skip)")
        flags["decimated_from_faces"] = int(len(mesh.faces))
        flags["views_from"] = "original mesh"
        mesh = _decimate(mesh, config.max_faces)
    flags["watertight"] = bool(mesh.is_watertight)

    tsdf = compute_tsdf(mesh.vertices, mesh.faces, config.resolution, config.tau)
    if config.thin_shell > 0 and not is_closed(mesh.vertices, mesh.faces):
        voxel = 2.0 / config.resolution
        tsdf, sheets = add_thin_shell(mesh.vertices, mesh.faces, tsdf, config.thin_shell * voxel, config.tau)
        if sheets:
            flags["thin_shell"] = {"sheet_faces": sheets, "voxels": config.thin_shell}
    if not (tsdf < 0).any():
        raise ShapekilnError(f"no voxel lies inside the surface at {config.resolution}³ (an open sheet with thin_shell 0, or thinner than a voxel)")
    views = render_views(shown, cameras) if cameras else np.zeros((0, 1, 1, 4), np.uint8)

    captions = [caption.strip() for caption in record.captions if caption and caption.strip()]
    if not captions:
        raise ShapekilnError("no caption")
    meta = {
        "source": record.source,
        "id": record.id,
        "category": record.category,
        "attributes": record.attributes,
        "transform": transform.tolist(),
        "flags": flags,
        "resolution": config.resolution,
        "tau": config.tau,
        "faces": int(len(mesh.faces)),
    }
    sample = {
        "__key__": record.id,
        "sdf.npy": npy_bytes(tsdf.astype(np.float16)),
        "cameras.json": _json_bytes([camera.to_json() for camera in cameras]),
        "caption.txt": "\n".join(captions).encode(),
        "meta.json": _json_bytes(meta),
    }
    for k, view in enumerate(views):
        sample[f"view_{k}.png"] = _png_bytes(view)
    return sample


def _decimate(mesh: trimesh.Trimesh, max_faces: int) -> trimesh.Trimesh:
    try:
        return mesh.simplify_quadric_decimation(face_count=max_faces)
    except Exception as error:  # fast_simplification rejects some inputs; say so rather than crash the run
        raise ShapekilnError(f"could not decimate {len(mesh.faces)} faces to {max_faces}: {error}") from None


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def _json_bytes(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()
