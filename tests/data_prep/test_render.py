"""Renderer, cameras, TSDF → mesh and contact sheets, checked against geometry we can compute."""
import json

import numpy as np
import pytest
import trimesh
from PIL import Image

from shapekiln.data_prep.preview import contact_sheet, tsdf_to_mesh
from shapekiln.data_prep.render import Camera, look_at_origin, orbit_cameras, render_views


def sphere_tsdf(resolution: int, radius: float, center=(0.0, 0.0, 0.0), tau: float = 0.2) -> np.ndarray:
    """(R, R, R) TSDF of a sphere at voxel centers of [-1, 1]³, indexed [x, y, z], negative inside."""
    coords = (np.arange(resolution) + 0.5) * (2.0 / resolution) - 1.0
    x, y, z = np.meshgrid(coords, coords, coords, indexing="ij")
    distance = np.sqrt((x - center[0]) ** 2 + (y - center[1]) ** 2 + (z - center[2]) ** 2) - radius
    return np.clip(distance, -tau, tau)


def hit_mask(view: np.ndarray) -> np.ndarray:
    return view[..., 3] == 255


def test_orbit_cameras_look_at_the_origin():
    cameras = orbit_cameras(num_views=8, size=64, elevation_deg=(30.0, 15.0))
    for k, camera in enumerate(cameras):
        np.testing.assert_allclose(camera.project(np.zeros((1, 3))), [[32.0, 32.0]], atol=1e-9)
        assert np.linalg.norm(camera.center) == pytest.approx(camera.distance)
        expected_elevation = 30.0 if k % 2 == 0 else 15.0
        expected_height = camera.distance * np.sin(np.radians(expected_elevation))
        assert camera.center[1] == pytest.approx(expected_height)
    azimuths = [camera.azimuth_deg for camera in cameras]
    np.testing.assert_allclose(azimuths, np.arange(8) * 45.0)
    # world +Y must point up in the image: a point above the origin projects to a smaller row.
    above = cameras[0].project(np.array([[0.0, 0.5, 0.0]]))
    assert above[0, 1] < 32.0


def test_box_silhouette_matches_projected_corners():
    box = trimesh.creation.box(extents=(0.4, 0.3, 0.5))
    box.apply_translation((0.3, 0.2, -0.1))
    cameras = orbit_cameras(num_views=4, size=96)
    views = render_views(box, cameras)
    assert views.shape == (4, 96, 96, 4) and views.dtype == np.uint8

    for camera, view in zip(cameras, views):
        rows, cols = np.nonzero(hit_mask(view))
        corners = camera.project(box.vertices)  # (8, 2) as (u, v)
        # A pixel is hit when its center (index + 0.5) falls inside the convex silhouette.
        expected = np.array([
            np.ceil(corners[:, 0].min() - 0.5), np.floor(corners[:, 0].max() - 0.5),
            np.ceil(corners[:, 1].min() - 0.5), np.floor(corners[:, 1].max() - 0.5),
        ])
        np.testing.assert_array_equal([cols.min(), cols.max(), rows.min(), rows.max()], expected)
        # RGB is zero wherever no ray hit.
        assert not view[~hit_mask(view), :3].any()

    # Batching all views into one ray query must not mix them up.
    np.testing.assert_array_equal(render_views(box, [cameras[2]])[0], views[2])


def test_sphere_silhouette_area_matches_projected_disk():
    sphere = trimesh.creation.icosphere(subdivisions=4, radius=1.0)
    camera = orbit_cameras(num_views=1, size=256)[0]
    view = render_views(sphere, [camera])[0]
    focal = camera.K[0, 0]
    half_angle = np.arcsin(1.0 / camera.distance)
    disk_area = np.pi * (focal * np.tan(half_angle)) ** 2
    assert hit_mask(view).sum() == pytest.approx(disk_area, rel=0.02)


def test_vertex_colors_are_rendered():
    sphere = trimesh.creation.icosphere(subdivisions=3, radius=0.7)
    sphere.visual.vertex_colors = np.tile([220, 20, 20, 255], (len(sphere.vertices), 1))
    view = render_views(sphere, orbit_cameras(num_views=1, size=64))[0]
    rgb = view[hit_mask(view), :3].astype(int)
    assert len(rgb) > 500
    assert (rgb[:, 0] > 3 * rgb[:, 1]).all() and (rgb[:, 0] > 3 * rgb[:, 2]).all()


def test_untextured_mesh_is_neutral_gray():
    view = render_views(trimesh.creation.icosphere(radius=0.7), orbit_cameras(num_views=1, size=64))[0]
    rgb = view[hit_mask(view), :3].astype(int)
    assert (np.ptp(rgb, axis=1) == 0).all() and rgb.min() > 50


def textured_quad(texture: Image.Image) -> trimesh.Trimesh:
    """A quad in the z = 0 plane over [-0.5, 0.5]², with uv = (x + 0.5, y + 0.5)."""
    vertices = np.array([[-0.5, -0.5, 0.0], [0.5, -0.5, 0.0], [0.5, 0.5, 0.0], [-0.5, 0.5, 0.0]])
    uv = vertices[:, :2] + 0.5
    visual = trimesh.visual.TextureVisuals(uv=uv, image=texture)
    return trimesh.Trimesh(vertices, [[0, 1, 2], [0, 2, 3]], visual=visual, process=False)


RED, BLUE = [255, 0, 0], [0, 0, 255]


@pytest.mark.parametrize("layout, texels", [
    ("left-right", [[RED, BLUE]]),  # 2 wide, 1 high
    ("top-bottom", [[RED], [BLUE]]),  # 1 wide, 2 high
])
def test_texture_follows_uv_layout(layout, texels):
    texture = Image.fromarray(np.array(texels, dtype=np.uint8), "RGB")
    # Straight on from +Z: image right is world +X (u grows), image up is world +Y (v grows).
    camera = look_at_origin(azimuth_deg=0.0, elevation_deg=0.0, distance=3.0, size=64, fov_deg=40.0)
    view = render_views(textured_quad(texture), [camera])[0]
    rows, cols = np.nonzero(hit_mask(view))
    along = (cols if layout == "left-right" else rows).astype(float)
    first = along < np.median(along) - 2  # left columns, or top rows
    second = along > np.median(along) + 2
    rgb = view[rows, cols, :3].astype(int)
    # Left (u < 0.5) samples texel column 0; top (v > 0.5) samples image row 0, since v is flipped.
    assert first.sum() > 100 and second.sum() > 100
    assert (rgb[first, 0] > 150).all() and (rgb[first, 2] == 0).all()
    assert (rgb[second, 2] > 150).all() and (rgb[second, 0] == 0).all()


def test_empty_mesh_renders_transparent():
    views = render_views(trimesh.Trimesh(), orbit_cameras(num_views=3, size=32))
    assert views.shape == (3, 32, 32, 4)
    assert not views.any()


def test_camera_json_round_trip():
    camera = orbit_cameras(num_views=8, size=128)[3]
    payload = json.loads(json.dumps(camera.to_json()))
    assert payload["convention"] == "opencv" and payload["world_up"] == "+y"
    restored = Camera.from_json(payload)
    np.testing.assert_array_equal(restored.K, camera.K)
    np.testing.assert_array_equal(restored.world_to_camera, camera.world_to_camera)
    assert (restored.width, restored.height) == (camera.width, camera.height)
    assert (restored.azimuth_deg, restored.elevation_deg, restored.distance, restored.fov_deg) == (
        camera.azimuth_deg, camera.elevation_deg, camera.distance, camera.fov_deg)


def test_tsdf_to_mesh_sphere_radius_and_orientation():
    resolution, radius = 32, 0.6
    mesh = tsdf_to_mesh(sphere_tsdf(resolution, radius).astype(np.float16))
    voxel = 2.0 / resolution
    radii = np.linalg.norm(mesh.vertices, axis=1)
    assert np.abs(radii - radius).max() < voxel
    assert mesh.volume > 0  # outward normals
    assert mesh.volume == pytest.approx(4.0 / 3.0 * np.pi * radius**3, rel=0.05)
    assert len(tsdf_to_mesh(np.full((8, 8, 8), 0.2)).faces) == 0


def test_contact_sheet_layout_and_empty_surface(tmp_path):
    cell, views_per_row = 64, 3
    sphere = trimesh.creation.icosphere(subdivisions=3, radius=0.5)
    views = render_views(sphere, orbit_cameras(num_views=4, size=96))
    samples = [
        # The sphere sits above the origin so the slices show whether +Y is up.
        {"id": "ball", "caption": "a ball floating above the floor " * 8, "views": views,
         "tsdf": sphere_tsdf(32, 0.4, center=(0.0, 0.4, 0.0))},
        {"id": "nothing", "caption": "empty", "views": views[:1], "tsdf": np.full((32, 32, 32), 0.2)},
    ]
    path = contact_sheet(samples, tmp_path / "sheet.png", views_per_row=views_per_row, cell=cell)
    assert path == tmp_path / "sheet.png"
    assert [p.name for p in tmp_path.iterdir()] == ["sheet.png"]  # no temporary file left behind

    sheet = np.asarray(Image.open(path).convert("RGB")).astype(int)
    assert sheet.shape == (2 * cell, (2 + views_per_row + 4) * cell, 3)

    def cell_pixels(row, column):
        return sheet[row * cell:(row + 1) * cell, column * cell:(column + 1) * cell]

    first_slice, iso = 2 + views_per_row, 2 + views_per_row + 3
    front = cell_pixels(0, first_slice)
    blue = (front[..., 2] > front[..., 0] + 60)
    assert blue[: cell // 2].sum() > 5 * blue[cell // 2:].sum()  # inside is in the upper half
    assert front[-3, 2, 0] > front[-3, 2, 2] + 60  # the bottom-left corner is outside: red
    assert (cell_pixels(0, iso) < 250).any()  # the ball's surface was rendered
    assert (cell_pixels(1, iso) == 255).all()  # no surface → blank cell
    assert (cell_pixels(1, 2 + 1) == 255).all()  # only one view given → the rest stays white
