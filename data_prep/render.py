"""CPU renderer for normalized meshes: orbit cameras and RGBA views by embree ray casting.

Meshes are expected in [-1, 1]³ with world +Y up. Cameras follow the OpenCV convention
(camera +x right, +y down, +z forward) and pixel coordinates put the center of pixel
(row i, column j) at (j + 0.5, i + 0.5): the image spans [0, W] × [0, H] and a projected
point lands in pixel (floor(v), floor(u)).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import trimesh
from trimesh.ray.ray_pyembree import RayMeshIntersector

from shapekiln.errors import ShapekilnError

# Radius of the sphere a default orbit camera keeps in view: the [-1, 1]³ cube's meshes are
# normalized to a fraction of it, and 1.15 leaves a margin around a unit-radius shape.
FRAME_RADIUS = 1.15
AMBIENT = 0.35
NEUTRAL_GRAY = np.array([200, 200, 200], dtype=np.float64)


@dataclass
class Camera:
    """A pinhole camera: OpenCV intrinsics/extrinsics plus the orbit parameters it came from."""

    K: np.ndarray  # (3, 3) intrinsics, pixel centers at +0.5
    world_to_camera: np.ndarray  # (4, 4) rigid transform, OpenCV axes
    width: int
    height: int
    azimuth_deg: float
    elevation_deg: float
    distance: float
    fov_deg: float  # vertical field of view

    @property
    def camera_to_world(self) -> np.ndarray:
        return np.linalg.inv(self.world_to_camera)

    @property
    def center(self) -> np.ndarray:
        """Camera position in world coordinates, (3,)."""
        return self.camera_to_world[:3, 3]

    def project(self, points: np.ndarray) -> np.ndarray:
        """World points (N, 3) → pixel coordinates (N, 2) as (u, v) = (column, row)."""
        points = np.asarray(points, dtype=np.float64).reshape(-1, 3)
        in_camera = points @ self.world_to_camera[:3, :3].T + self.world_to_camera[:3, 3]
        homogeneous = in_camera @ self.K.T  # (N, 3)
        return homogeneous[:, :2] / homogeneous[:, 2:3]

    def to_json(self) -> dict:
        return {
            "convention": "opencv",
            "world_up": "+y",
            "pixel_center": 0.5,
            "K": np.asarray(self.K, dtype=float).tolist(),
            "world_to_camera": np.asarray(self.world_to_camera, dtype=float).tolist(),
            "width": int(self.width),
            "height": int(self.height),
            "azimuth_deg": float(self.azimuth_deg),
            "elevation_deg": float(self.elevation_deg),
            "distance": float(self.distance),
            "fov_deg": float(self.fov_deg),
        }

    @classmethod
    def from_json(cls, d: dict) -> "Camera":
        if d.get("convention", "opencv") != "opencv" or d.get("world_up", "+y") != "+y":
            raise ShapekilnError(
                f"camera uses convention={d.get('convention')!r}, world_up={d.get('world_up')!r}; "
                "expected 'opencv' and '+y'"
            )
        return cls(
            K=np.array(d["K"], dtype=np.float64),
            world_to_camera=np.array(d["world_to_camera"], dtype=np.float64),
            width=int(d["width"]),
            height=int(d["height"]),
            azimuth_deg=float(d["azimuth_deg"]),
            elevation_deg=float(d["elevation_deg"]),
            distance=float(d["distance"]),
            fov_deg=float(d["fov_deg"]),
        )


def look_at_origin(azimuth_deg: float, elevation_deg: float, distance: float,
                   size: int, fov_deg: float) -> Camera:
    """A square camera on the sphere of radius `distance`, looking at the origin with +Y up.

    Azimuth 0 is on +Z and grows towards +X; elevation is the angle above the XZ plane.
    """
    if not abs(elevation_deg) < 90.0:
        raise ShapekilnError(
            f"elevation must lie strictly between -90 and 90 degrees, got {elevation_deg}")
    azimuth, elevation = np.radians(azimuth_deg), np.radians(elevation_deg)
    center = distance * np.array([
        np.cos(elevation) * np.sin(azimuth),
        np.sin(elevation),
        np.cos(elevation) * np.cos(azimuth),
    ])
    forward = -center / np.linalg.norm(center)
    right = np.cross(forward, [0.0, 1.0, 0.0])
    right /= np.linalg.norm(right)
    down = np.cross(forward, right)  # OpenCV: x × y = z, so y = z × x

    rotation = np.stack([right, down, forward])  # rows are the camera axes in world coordinates
    world_to_camera = np.eye(4)
    world_to_camera[:3, :3] = rotation
    world_to_camera[:3, 3] = -rotation @ center

    focal = 0.5 * size / np.tan(np.radians(fov_deg) / 2.0)
    K = np.array([[focal, 0.0, size / 2.0], [0.0, focal, size / 2.0], [0.0, 0.0, 1.0]])
    return Camera(K=K, world_to_camera=world_to_camera, width=size, height=size,
                  azimuth_deg=float(azimuth_deg), elevation_deg=float(elevation_deg),
                  distance=float(distance), fov_deg=float(fov_deg))


def framing_distance(fov_deg: float, radius: float = FRAME_RADIUS) -> float:
    """Distance at which a sphere of `radius` around the origin just fits the field of view."""
    return float(radius / np.sin(np.radians(fov_deg) / 2.0))


def orbit_cameras(num_views: int = 8, size: int = 256, fov_deg: float = 40.0,
                  distance: float | None = None,
                  elevation_deg: float | tuple[float, ...] = (30.0, 15.0)) -> list[Camera]:
    """`num_views` cameras at evenly spaced azimuths around +Y, all looking at the origin.

    Elevations cycle through `elevation_deg` (a single float gives one ring); the default
    distance is `framing_distance(fov_deg)`.
    """
    if distance is None:
        distance = framing_distance(fov_deg)
    elevations = np.atleast_1d(np.asarray(elevation_deg, dtype=np.float64))
    return [
        look_at_origin(360.0 * k / num_views, elevations[k % len(elevations)], distance, size, fov_deg)
        for k in range(num_views)
    ]


def camera_rays(camera: Camera) -> tuple[np.ndarray, np.ndarray]:
    """One ray per pixel through its center, row-major: origins and unit directions, (H*W, 3) each."""
    rows, cols = np.mgrid[0:camera.height, 0:camera.width]
    pixels = np.stack([cols.ravel() + 0.5, rows.ravel() + 0.5, np.ones(rows.size)], axis=1)  # (H*W, 3)
    directions_camera = pixels @ np.linalg.inv(camera.K).T
    camera_to_world = camera.camera_to_world
    directions = directions_camera @ camera_to_world[:3, :3].T
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    origins = np.broadcast_to(camera_to_world[:3, 3], directions.shape)
    return origins, directions


def render_views(mesh: trimesh.Trimesh, cameras: list[Camera]) -> np.ndarray:
    """Render `mesh` from every camera → (K, H, W, 4) uint8 RGBA, alpha 255 on the mesh.

    All rays of all views go through one embree query. Shading is a two-sided Lambert term
    from a headlight plus ambient, on flat face normals, over the mesh's own colors (texture,
    vertex colors or face colors, in that order) or a neutral gray when it has none.
    """
    hits = _cast_rays(mesh, cameras, "render_views")
    height, width = cameras[0].height, cameras[0].width
    image = np.zeros((len(cameras) * height * width, 4), dtype=np.uint8)  # (K*H*W, 4)
    if hits is not None:
        directions, hit_faces, hit_rays, locations = hits
        barycentric = trimesh.triangles.points_to_barycentric(mesh.triangles[hit_faces], locations)  # (M, 3)
        base = _base_color(mesh, hit_faces, barycentric)  # (M, 3) in [0, 255]
        facing = np.abs(np.einsum("ij,ij->i", mesh.face_normals[hit_faces], directions[hit_rays]))
        shaded = base * (AMBIENT + (1.0 - AMBIENT) * facing)[:, None]
        image[hit_rays, :3] = np.clip(np.rint(shaded), 0, 255).astype(np.uint8)
        image[hit_rays, 3] = 255
    return image.reshape(len(cameras), height, width, 4)


def render_normals(mesh: trimesh.Trimesh, cameras: list[Camera]) -> tuple[np.ndarray, np.ndarray]:
    """World-space flat face normals seen by each pixel, turned towards the camera, and the hit mask.

    Returns (K, H, W, 3) float64 unit normals (0 where no ray hit) and (K, H, W) bool: the
    same rays and hits as `render_views`, for checking other renderers' normals against.
    """
    hits = _cast_rays(mesh, cameras, "render_normals")
    height, width = cameras[0].height, cameras[0].width
    normals = np.zeros((len(cameras) * height * width, 3))  # (K*H*W, 3)
    mask = np.zeros(len(cameras) * height * width, dtype=bool)
    if hits is not None:
        directions, hit_faces, hit_rays, _ = hits
        face_normals = mesh.face_normals[hit_faces]  # (M, 3)
        towards = np.einsum("ij,ij->i", face_normals, directions[hit_rays]) > 0  # facing away: flip
        normals[hit_rays] = np.where(towards[:, None], -face_normals, face_normals)
        mask[hit_rays] = True
    return normals.reshape(len(cameras), height, width, 3), mask.reshape(len(cameras), height, width)


def _cast_rays(mesh: trimesh.Trimesh, cameras: list[Camera], caller: str):
    """One embree query for every pixel of every camera (first hits only).

    Returns None for a mesh without faces, else (directions (K*H*W, 3), hit_faces (M,),
    hit_rays (M,) row-major pixel indices over all views, locations (M, 3)).
    """
    if not cameras:
        raise ShapekilnError(f"{caller} needs at least one camera")
    height, width = cameras[0].height, cameras[0].width
    if any((c.height, c.width) != (height, width) for c in cameras):
        raise ShapekilnError(f"{caller} needs cameras that share one image size")
    if len(mesh.faces) == 0:
        return None

    rays = [camera_rays(c) for c in cameras]
    origins = np.concatenate([o for o, _ in rays])  # (K*H*W, 3)
    directions = np.concatenate([d for _, d in rays])
    intersector = RayMeshIntersector(mesh)
    hit_faces, hit_rays, locations = intersector.intersects_id(
        origins, directions, multiple_hits=False, return_locations=True)
    return directions, hit_faces, hit_rays, locations


def _base_color(mesh: trimesh.Trimesh, faces: np.ndarray, barycentric: np.ndarray) -> np.ndarray:
    """Unshaded RGB at the hit points, (M, 3) float in [0, 255]."""
    visual = mesh.visual
    if visual.kind == "texture" and visual.material is not None:
        texture, factor = _texture_and_factor(visual.material)
        if texture is None or visual.uv is None or len(visual.uv) != len(mesh.vertices):
            return np.broadcast_to(factor, (len(faces), 3))
        uv = np.einsum("mk,mkc->mc", barycentric, visual.uv[mesh.faces[faces]])  # (M, 2)
        return _sample_texture(np.asarray(texture.convert("RGB")), uv) * (factor / 255.0)
    if visual.kind == "vertex":
        vertex_colors = visual.vertex_colors[:, :3].astype(np.float64)
        return np.einsum("mk,mkc->mc", barycentric, vertex_colors[mesh.faces[faces]])
    if visual.kind == "face":
        return visual.face_colors[faces, :3].astype(np.float64)
    return np.broadcast_to(NEUTRAL_GRAY, (len(faces), 3))


def _texture_and_factor(material) -> tuple:
    """A material's base color image (or None) and the RGB factor in [0, 255] it is multiplied by."""
    main_color = np.asarray(material.main_color[:3], dtype=np.float64)
    if isinstance(material, trimesh.visual.material.PBRMaterial):
        # glTF: base color = factor × texture.
        return material.baseColorTexture, main_color
    # OBJ/MTL as trimesh loads it: an image stands alone (the diffuse color beside it is often
    # trimesh's default gray, not a tint); without an image the diffuse color is the color.
    if material.image is not None:
        return material.image, np.full(3, 255.0)
    return None, main_color


def _sample_texture(texture: np.ndarray, uv: np.ndarray) -> np.ndarray:
    """Nearest-texel lookup with wrap; (H_t, W_t, 3) texture, (M, 2) uv → (M, 3) float.

    v = 0 is the bottom row of the image (OBJ/glTF-as-loaded-by-trimesh convention, the same
    flip as trimesh's `uv_to_color`); texel (row r, column c) covers [c, c+1)/W × [r, r+1)/H.
    """
    tex_height, tex_width = texture.shape[:2]
    columns = np.floor(uv[:, 0] * tex_width).astype(np.int64) % tex_width
    rows = np.floor((1.0 - uv[:, 1]) * tex_height).astype(np.int64) % tex_height
    return texture[rows, columns].astype(np.float64)
