"""TSDF signs and distances on the meshes real assets look like: open, overlapping, inside-out."""

import igl
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


def test_closed_synthetic_meshes_stay_equal_to_the_reference():
    """Closed meshes take their signs from crossing counts alone; the grid must not change."""
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


# ----------------------------------------------------------------------------------------------
# compute_tsdf against tsdf_reference on the meshes its shortcuts are most likely to get wrong


def assert_equal_to_reference(vertices, faces, resolution=R, **kwargs):
    """Same grid as the direct libigl method: no sign differs, no band value differs, nothing else differs."""
    fast = compute_tsdf(vertices, faces, resolution, TAU, **kwargs)
    reference = tsdf_reference(vertices, faces, resolution, TAU)
    band = np.abs(reference) < TAU
    mismatched = int(((fast < 0) != (reference < 0)).sum())
    assert mismatched == 0, f"{mismatched} voxels with the wrong sign"
    assert not band.any() or np.abs(fast - reference)[band].max() == 0.0
    assert np.array_equal(fast, reference)
    return fast


def normalized(vertices: np.ndarray, extent: float = 0.8) -> np.ndarray:
    vertices = np.asarray(vertices, dtype=float)
    vertices = vertices - (vertices.max(axis=0) + vertices.min(axis=0)) / 2.0
    return vertices / np.abs(vertices).max() * extent


def open_cylinder() -> tuple[np.ndarray, np.ndarray]:
    """A tube: the side of a cylinder without its two caps."""
    cylinder = trimesh.creation.cylinder(0.3, 1.0, sections=32)
    side = np.abs(cylinder.face_normals[:, 2]) < 0.5
    return normalized(cylinder.vertices), cylinder.faces[side]


def bowl(flip: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The lower half of a sphere: one big hole."""
    sphere = trimesh.creation.icosphere(subdivisions=3)
    faces = sphere.faces[sphere.triangles_center[:, 2] < 0.05]
    return normalized(sphere.vertices), faces[:, ::-1] if flip else faces


def holed_sphere(seed: int, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """An icosphere with a random `fraction` of its faces removed: holes of every size."""
    sphere = trimesh.creation.icosphere(subdivisions=3)
    keep = np.random.default_rng(seed).random(len(sphere.faces)) >= fraction
    return normalized(sphere.vertices), sphere.faces[keep]


def box_missing_faces(seed: int) -> tuple[np.ndarray, np.ndarray]:
    box = trimesh.creation.box()
    rng = np.random.default_rng(seed)
    keep = np.ones(12, dtype=bool)
    keep[rng.choice(12, size=rng.integers(1, 4), replace=False)] = False
    return normalized(box.vertices, rng.uniform(0.3, 0.9)), box.faces[keep]


def random_triangles(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A soup of unconnected, intersecting triangles."""
    rng = np.random.default_rng(seed)
    count = int(rng.integers(5, 60))
    return rng.uniform(-0.9, 0.9, size=(3 * count, 3)), np.arange(3 * count).reshape(-1, 3)


def randomly_flipped(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A closed sphere with 10% of its faces wound the wrong way: closed, but not consistently."""
    sphere = trimesh.creation.icosphere(subdivisions=2)
    faces = sphere.faces.copy()
    flip = np.random.default_rng(seed).random(len(faces)) < 0.1
    faces[flip] = faces[flip][:, ::-1]
    return normalized(sphere.vertices), faces


def two_open_spheres() -> tuple[np.ndarray, np.ndarray]:
    """Two overlapping spheres, each cut open: holes inside the other part."""
    a = trimesh.creation.icosphere(subdivisions=2, radius=0.5)
    b = trimesh.creation.icosphere(subdivisions=2, radius=0.4)
    b.apply_translation((0.3, 0.1, 0.0))
    parts = [trimesh.Trimesh(a.vertices, a.faces[a.triangles_center[:, 0] < 0.3]),
             trimesh.Trimesh(b.vertices, b.faces[b.triangles_center[:, 1] > 0.0])]
    mesh = trimesh.util.concatenate(parts)
    return normalized(mesh.vertices), mesh.faces


def seam_split_sphere() -> tuple[np.ndarray, np.ndarray]:
    """A closed sphere stored as a triangle soup (every face with its own vertices, as STL does)."""
    sphere = trimesh.creation.icosphere(subdivisions=2)
    return normalized(sphere.triangles.reshape(-1, 3)), np.arange(3 * len(sphere.faces)).reshape(-1, 3)


def past_the_grid(closed: bool) -> tuple[np.ndarray, np.ndarray]:
    """A sphere of radius 1.1: it leaves the [-1, 1]³ grid."""
    sphere = trimesh.creation.icosphere(subdivisions=3, radius=1.1)
    return sphere.vertices, sphere.faces if closed else sphere.faces[sphere.triangles_center[:, 2] < 0.5]


def degenerate_faces() -> tuple[np.ndarray, np.ndarray]:
    """A closed sphere plus collapsed and duplicated faces."""
    sphere = trimesh.creation.icosphere(subdivisions=2)
    faces = np.concatenate([sphere.faces, [[0, 0, 1], [2, 3, 2]], sphere.faces[:5]])
    return normalized(sphere.vertices), faces


OPEN_CASES = {
    "open box": lambda: (open_box().vertices, open_box().faces),
    "open cylinder": open_cylinder,
    "bowl": bowl,
    "bowl wound inward": lambda: bowl(flip=True),
    **{f"sphere, {fraction:.0%} of faces removed, seed {seed}": (lambda s=seed, f=fraction: holed_sphere(s, f))
       for seed, fraction in [(0, 0.01), (1, 0.05), (2, 0.2), (3, 0.5)]},
    **{f"box missing faces, seed {seed}": (lambda s=seed: box_missing_faces(s)) for seed in range(3)},
    **{f"random triangles, seed {seed}": (lambda s=seed: random_triangles(s)) for seed in range(3)},
    "randomly flipped faces": lambda: randomly_flipped(0),
    "two overlapping open spheres": two_open_spheres,
    "single triangle": lambda: (np.array([[-0.7, -0.6, 0.1], [0.8, -0.5, -0.2], [0.0, 0.7, 0.3]]), np.array([[0, 1, 2]])),
    "open sphere past the grid": lambda: past_the_grid(closed=False),
}

CLOSED_CASES = {
    "seam-split sphere": seam_split_sphere,
    "closed sphere past the grid": lambda: past_the_grid(closed=True),
    "collapsed and duplicated faces": degenerate_faces,
    "intersecting boxes": lambda: (two_boxes().vertices, two_boxes().faces),
    "flipped box": lambda: (flipped_box().vertices, flipped_box().faces),
}


@pytest.mark.parametrize("name", OPEN_CASES)
def test_open_and_inconsistent_meshes_equal_the_reference(name):
    vertices, faces = OPEN_CASES[name]()
    assert_equal_to_reference(vertices, faces)


@pytest.mark.parametrize("name", CLOSED_CASES)
def test_awkward_closed_meshes_equal_the_reference(name):
    vertices, faces = CLOSED_CASES[name]()
    assert_equal_to_reference(vertices, faces)


def on_voxel_lattice(value_index: int, resolution: int = 64) -> float:
    return -1.0 + (value_index + 0.5) * 2.0 / resolution


@pytest.mark.parametrize("layout", ["corners on columns", "corners on voxel centers", "rotated 45°", "octahedron on columns"])
def test_rays_through_edges_and_vertices_equal_the_reference(layout):
    """Meshes whose edges and vertices lie exactly on the scanline rays (and on voxel centers)."""
    box = trimesh.creation.box()
    c = on_voxel_lattice(48)  # a voxel-center coordinate at R = 64
    if layout == "corners on columns":
        fine = box.subdivide().subdivide()
        vertices, faces = fine.vertices * (2 * c, 2 * c, 0.77), fine.faces
    elif layout == "corners on voxel centers":
        vertices, faces = box.vertices * 2 * c, box.faces
    elif layout == "rotated 45°":
        rotated = trimesh.creation.box((1.0, 1.0, 0.77))
        rotated.apply_transform(trimesh.transformations.rotation_matrix(np.pi / 4, (0, 0, 1)))
        rotated = rotated.subdivide().subdivide()
        vertices, faces = rotated.vertices, rotated.faces
    else:
        a, m, b = on_voxel_lattice(16), on_voxel_lattice(32), on_voxel_lattice(48)
        vertices = np.array([[b, m, 0.01], [a, m, 0.01], [m, b, 0.01], [m, a, 0.01], [m, m, 0.7], [m, m, -0.7]])
        faces = np.array([[0, 2, 4], [2, 1, 4], [1, 3, 4], [3, 0, 4], [2, 0, 5], [1, 2, 5], [3, 1, 5], [0, 3, 5]])
    assert_equal_to_reference(vertices, faces, resolution=64)


def test_crossing_counts_are_the_exact_winding_number_where_trusted():
    """The scanline pass against libigl's exact winding number, on closed meshes with rays through edges."""
    from shapekiln.data_prep.tsdf import _crossing_counts

    rotated = trimesh.creation.box((1.0, 1.0, 0.77))
    rotated.apply_transform(trimesh.transformations.rotation_matrix(np.pi / 4, (0, 0, 1)))
    for mesh in (rotated.subdivide(), two_boxes(), flipped_box(), trimesh.creation.icosphere(3, 0.7)):
        counts, reliable = _crossing_counts(np.asarray(mesh.vertices, float), np.asarray(mesh.faces, np.int64), R)
        exact = np.rint(igl.winding_number(np.asarray(mesh.vertices, float), np.asarray(mesh.faces, np.int64), grid_points(R)))
        assert reliable.mean() > 0.95
        assert np.array_equal(counts[reliable], exact.reshape(R, R, R)[reliable])


@pytest.mark.parametrize("resolution, coarsest", [(30, 16), (33, 16), (48, 8), (32, 12), (32, 1)])
def test_any_resolution_and_block_size(resolution, coarsest):
    vertices, faces = holed_sphere(4, 0.05)
    assert_equal_to_reference(vertices, faces, resolution=resolution, coarsest=coarsest)


def count_winding_queries(monkeypatch) -> list[int]:
    from shapekiln.data_prep import tsdf

    sizes: list[int] = []
    original = tsdf._FastWinding.__call__

    def counting(self, points):
        sizes.append(len(points))
        return original(self, points)

    monkeypatch.setattr(tsdf._FastWinding, "__call__", counting)
    return sizes


def test_closed_meshes_need_no_winding_queries(monkeypatch):
    sizes = count_winding_queries(monkeypatch)
    sphere = trimesh.creation.icosphere(subdivisions=3, radius=0.7)
    assert_equal_to_reference(sphere.vertices, sphere.faces, resolution=48)
    assert sum(sizes) == 0


def test_open_meshes_query_few_winding_numbers(monkeypatch):
    """A sphere with a small hole: the caps and Biot-Savart bounds settle almost every voxel."""
    sizes = count_winding_queries(monkeypatch)
    sphere = trimesh.creation.icosphere(subdivisions=4, radius=0.7)
    keep = sphere.triangles_center[:, 2] < 0.65  # a hole of radius ~0.25 at the top
    assert_equal_to_reference(sphere.vertices, sphere.faces[keep], resolution=48)
    assert 0 < sum(sizes) < 0.1 * 48**3


def test_distance_queries_stay_near_the_band(monkeypatch):
    """Every voxel is queried at most once, and few voxels beyond the band are."""
    from shapekiln.data_prep import tsdf

    queried: list[int] = []
    original = tsdf._distances

    def counting(vertices, faces, points, cap):
        queried.append(len(points))
        return original(vertices, faces, points, cap)

    monkeypatch.setattr(tsdf, "_distances", counting)
    sphere = trimesh.creation.icosphere(subdivisions=3, radius=0.5)
    fast = assert_equal_to_reference(sphere.vertices, sphere.faces, resolution=64)
    band = int((np.abs(fast) < TAU).sum())
    assert len(queried) == 2 and queried[0] == 17**3  # the coarse lattice, then the band
    assert band <= queried[1] < 1.25 * band
