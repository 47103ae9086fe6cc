"""TSDF signs and distances on the meshes real assets look like: open, overlapping, inside-out."""

import numpy as np
import pytest
import trimesh

from shapekiln.data_prep.tsdf import compute_tsdf, grid_points, tsdf_reference

R, TAU = 32, 0.2


def brute_force_distance(mesh: trimesh.Trimesh, points: np.ndarray) -> np.ndarray:
    """Exact unsigned distance: the closest point on every triangle, minimum over triangles."""
    triangles = mesh.triangles  # (F, 3, 3)
    distances = []
    for point in points:
        closest = trimesh.triangles.closest_point(triangles, np.repeat(point[None], len(triangles), axis=0))
        distances.append(np.linalg.norm(closest - point, axis=1).min())
    return np.array(distances)


def open_box() -> trimesh.Trimesh:
    """A [-0.5, 0.5]³ box with its +z face removed: not watertight."""
    box = trimesh.creation.box(extents=(1.0, 1.0, 1.0))
    keep = ~np.isclose(box.triangles_center[:, 2], 0.5)
    return trimesh.Trimesh(box.vertices, box.faces[keep], process=False)


def two_boxes() -> trimesh.Trimesh:
    """Two closed boxes that intersect: the union is inside, the overlap is covered twice."""
    a = trimesh.creation.box(extents=(1.0, 0.6, 0.6))
    b = trimesh.creation.box(extents=(0.6, 1.0, 0.6), transform=trimesh.transformations.translation_matrix((0.3, 0.2, 0.0)))
    return trimesh.util.concatenate([a, b])


def inside_two_boxes(points: np.ndarray) -> np.ndarray:
    in_a = (np.abs(points) < (0.5, 0.3, 0.3)).all(axis=1)
    in_b = (np.abs(points - (0.3, 0.2, 0.0)) < (0.3, 0.5, 0.3)).all(axis=1)
    return in_a | in_b


def inside_unit_box(points: np.ndarray) -> np.ndarray:
    return (np.abs(points) < 0.5).all(axis=1)


def flipped_box() -> trimesh.Trimesh:
    box = trimesh.creation.box(extents=(1.0, 1.0, 1.0))
    box.invert()  # every face points inward
    return box


CASES = {
    "open box": (open_box, inside_unit_box),
    "intersecting boxes": (two_boxes, inside_two_boxes),
    "flipped normals": (flipped_box, inside_unit_box),
}


@pytest.mark.parametrize("name", CASES)
def test_signs_and_distances_match_brute_force(name):
    make, inside = CASES[name]
    mesh = make()
    tsdf = compute_tsdf(mesh.vertices, mesh.faces, R, TAU)
    assert tsdf.shape == (R, R, R) and tsdf.dtype == np.float32
    points = grid_points(R)
    flat = tsdf.reshape(-1)
    # Signs everywhere: inside is negative, outside positive (voxel centers never lie on these faces).
    assert np.array_equal(flat < 0, inside(points)), f"{name}: wrong inside/outside"
    # Distances on a sample of voxels inside the band, against the brute-force reference.
    rng = np.random.default_rng(0)
    band = np.flatnonzero(np.abs(flat) < TAU)
    picked = rng.choice(band, size=60, replace=False)
    expected = np.minimum(brute_force_distance(mesh, points[picked]), TAU)
    np.testing.assert_allclose(np.abs(flat[picked]), expected, atol=1e-5)


def test_open_box_mouth_is_inside_up_to_the_opening():
    """Just below the missing face is inside; just above it is outside (ray parity would fail here)."""
    mesh = open_box()
    tsdf = compute_tsdf(mesh.vertices, mesh.faces, R, TAU)
    axis = -1.0 + (np.arange(R) + 0.5) * 2.0 / R
    centre = np.searchsorted(axis, 0.0)
    below, above = np.searchsorted(axis, 0.45), np.searchsorted(axis, 0.55)
    assert tsdf[centre, centre, below] < 0
    assert tsdf[centre, centre, above] > 0


def test_equal_to_the_direct_libigl_grid(shared_data):
    """The narrow band changes only which voxels are queried, never a value."""
    mesh = trimesh.load(shared_data / "meshes" / "teapot.obj", force="mesh")
    vertices = mesh.vertices - mesh.bounds.mean(axis=0)
    vertices = vertices / np.ptp(vertices, axis=0).max() * 1.6
    for resolution in (16, 32):
        fast = compute_tsdf(vertices, mesh.faces, resolution, TAU)
        reference = tsdf_reference(vertices, mesh.faces, resolution, TAU)
        assert np.array_equal(fast, reference)
    assert (fast < 0).any() and (fast > 0).any()


def test_truncation_and_far_field():
    sphere = trimesh.creation.icosphere(subdivisions=3, radius=0.4)
    tsdf = compute_tsdf(sphere.vertices, sphere.faces, R, TAU)
    assert tsdf.min() == pytest.approx(-TAU) and tsdf.max() == pytest.approx(TAU)
    radius = np.linalg.norm(grid_points(R), axis=1).reshape(R, R, R)
    near = np.abs(radius - 0.4) < 0.1
    # A subdivided icosphere is within 0.003 of the true sphere.
    np.testing.assert_allclose(tsdf[near], (radius - 0.4)[near], atol=5e-3)


def test_closed_meshes_take_the_region_shortcut_and_stay_equal_to_the_reference():
    """Closed meshes query winding numbers only near the surface; the grid must not change."""
    from shapekiln.data_prep.sources.synthetic import SyntheticSource
    from shapekiln.data_prep.tsdf import is_closed

    source = SyntheticSource(20, seed=3)
    for item in source.items():
        mesh = source.load(item).mesh
        vertices = (mesh.vertices - mesh.bounds.mean(axis=0)) / np.ptp(mesh.vertices, axis=0).max() * 1.6
        assert is_closed(vertices, mesh.faces)
        assert np.array_equal(compute_tsdf(vertices, mesh.faces, R, TAU), tsdf_reference(vertices, mesh.faces, R, TAU))


def test_closedness_check():
    from shapekiln.data_prep.tsdf import is_closed

    box = trimesh.creation.box()
    assert is_closed(box.vertices, box.faces)
    assert is_closed(two_boxes().vertices, two_boxes().faces)  # overlapping closed parts
    assert not is_closed(open_box().vertices, open_box().faces)
    flipped_one = box.faces.copy()
    flipped_one[0] = flipped_one[0, ::-1]  # one face wound the other way
    assert not is_closed(box.vertices, flipped_one)
    split = trimesh.Trimesh(box.triangles.reshape(-1, 3), np.arange(36).reshape(-1, 3), process=False)
    assert is_closed(split.vertices, split.faces)  # a triangle soup of a closed box, as STL stores it
