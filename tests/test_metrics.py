"""Shape metrics against values worked out by hand on simple shapes: spheres of known radii, a cube against itself."""

import math

import numpy as np
import pytest
import trimesh

from shapekiln.data_prep.tsdf import grid_points
from shapekiln.metrics import (
    UNIT_CUBE_DIAGONAL,
    chamfer_distance,
    codebook_usage,
    f_score,
    mmd_cov,
    occupancy_iou,
    one_nna,
    pairwise_chamfer,
    reconstruction_metrics,
    surface_points,
    total_mutual_difference,
    unidirectional_hausdorff,
)


def sphere_tsdf(resolution, radius, center=(0.0, 0.0, 0.0), tau=0.2):
    """The exact truncated signed distance to a sphere at the voxel centers of [-1, 1]³, negative inside."""
    distance = np.linalg.norm(grid_points(resolution) - np.asarray(center), axis=1) - radius
    return np.clip(distance, -tau, tau).reshape(resolution, resolution, resolution)


def inside_count(resolution, radius):
    return int((np.linalg.norm(grid_points(resolution), axis=1) < radius).sum())


def sphere_points(radius, count, seed):
    """Points on a fine icosphere (10242 vertices) of `radius` in [-1, 1]³, mapped to the unit cube."""
    return surface_points(trimesh.creation.icosphere(subdivisions=5, radius=radius), count, seed=seed)


def poisson_spacing(count, area):
    """Mean nearest-neighbour distance of `count` uniform random points on a surface of `area`: 1 / (2√density)."""
    return 0.5 / math.sqrt(count / area)


# occupancy_iou


@pytest.mark.parametrize("r1, r2", [(0.4, 0.8), (0.5, 0.7)])
def test_iou_of_concentric_spheres_is_the_ratio_of_their_inside_voxels(r1, r2):
    inner, outer = sphere_tsdf(64, r1), sphere_tsdf(64, r2)
    assert occupancy_iou(inner, outer) == inside_count(64, r1) / inside_count(64, r2)
    assert occupancy_iou(outer, inner) == occupancy_iou(inner, outer)
    # Voxel counting misses the volume ratio only by the lattice error of a ball of ≥ 12 voxels radius
    # (measured below 0.3%); the straddling shell alone would allow ~3·h/r ≈ 20%.
    assert occupancy_iou(inner, outer) == pytest.approx((r1 / r2) ** 3, abs=0.01)


def test_iou_counts_inside_voxels_of_a_hand_made_grid():
    predicted = np.full((2, 2, 2), 0.1)
    target = np.full((2, 2, 2), 0.1)
    predicted[0, 0, :] = -0.1  # inside: (0,0,0) (0,0,1)
    target[0, 0, 1] = target[1, 1, 1] = target[1, 0, 0] = -0.1  # shares (0,0,1) only
    target[0, 1, 0] = 0.0  # on the surface, which is not inside
    assert occupancy_iou(predicted, target) == 1 / 4


def test_iou_of_identical_disjoint_and_empty_grids():
    sphere = sphere_tsdf(32, 0.5)
    assert occupancy_iou(sphere, sphere.copy()) == 1.0
    left, right = sphere_tsdf(32, 0.3, center=(-0.5, 0, 0)), sphere_tsdf(32, 0.3, center=(0.5, 0, 0))
    assert (left < 0).any() and (right < 0).any()
    assert occupancy_iou(left, right) == 0.0
    empty = np.full((32, 32, 32), 0.2)
    assert occupancy_iou(empty, empty) == 1.0
    assert occupancy_iou(empty, sphere) == 0.0


def test_iou_refuses_grids_of_different_shapes():
    with pytest.raises(ValueError, match="differ in shape"):
        occupancy_iou(sphere_tsdf(16, 0.5), sphere_tsdf(32, 0.5))


# surface_points and chamfer_distance


@pytest.mark.parametrize("r1, r2", [(0.4, 0.8), (0.8, 0.5)])
def test_chamfer_of_concentric_spheres_is_half_the_radius_gap(r1, r2):
    """Every nearest neighbour lies straight across the gap: distance |r1 - r2| in [-1, 1]³, half that in the unit cube.

    Tolerance 1e-3: the icosphere's flat facets sit at most ~1.2e-4·r inside the true sphere, and the
    nearest sample beside the radial foot (≤ ~0.02 away at 20000 points) adds at most 0.02² / (2·gap) ≈ 1e-3.
    """
    gap = abs(r1 - r2) / 2
    cd_l1, cd_l2 = chamfer_distance(sphere_points(r1, 20000, seed=0), sphere_points(r2, 20000, seed=1))
    assert cd_l1 == pytest.approx(gap, abs=1e-3)
    assert cd_l2 == pytest.approx(gap**2, abs=2 * gap * 1e-3)


def test_surface_points_of_a_mesh_lie_on_it_in_unit_cube_coordinates():
    points = sphere_points(0.6, 5000, seed=3)
    assert points.shape == (5000, 3)
    radii = np.linalg.norm(points - 0.5, axis=1)
    assert np.abs(radii - 0.3).max() < 1e-4
    assert np.abs(points.mean(axis=0) - 0.5).max() < 0.01  # spread over the whole sphere, not one patch


def test_chamfer_of_a_cube_against_itself():
    cube = trimesh.creation.box(extents=(1.0, 1.0, 1.0))  # side 0.5 and area 1.5 in the unit cube
    same = surface_points(cube, 4096, seed=7)
    assert np.array_equal(same, surface_points(cube, 4096, seed=7))
    assert chamfer_distance(same, surface_points(cube, 4096, seed=7)) == (0.0, 0.0)

    cd_l1, cd_l2 = chamfer_distance(same, surface_points(cube, 4096, seed=8))
    spacing = poisson_spacing(4096, 1.5)  # ≈ 0.0096
    assert 0.5 * spacing < cd_l1 < 1.5 * spacing
    assert 0.0 < cd_l2 < (3 * spacing) ** 2


def test_an_empty_surface_costs_the_unit_cube_diagonal():
    points = sphere_points(0.5, 100, seed=0)
    nothing = np.zeros((0, 3))
    assert UNIT_CUBE_DIAGONAL == pytest.approx(math.sqrt(3))
    assert chamfer_distance(nothing, points) == pytest.approx((math.sqrt(3), 3.0))
    assert chamfer_distance(points, nothing) == pytest.approx((math.sqrt(3), 3.0))
    assert chamfer_distance(nothing, nothing) == (0.0, 0.0)
    assert surface_points(np.full((16, 16, 16), 0.2), 100).shape == (0, 3)


@pytest.mark.parametrize("radius", [0.3, 0.7])
def test_surface_points_of_a_tsdf_lie_on_its_zero_level_set(radius):
    """Marching cubes' flat triangles span at most a voxel diagonal √3·h (h = 2/32), so they dip under the
    sphere by about (√3·h)² / (8·r) in [-1, 1]³, half that in the unit cube (measured: 0.0023 at r = 0.3);
    1.5× that allows for the vertices' own linear-interpolation error."""
    points = surface_points(sphere_tsdf(32, radius), 4000, seed=0)
    assert points.shape == (4000, 3)
    radii = np.linalg.norm(points - 0.5, axis=1)
    bound = 1.5 * 3 * (2 / 32) ** 2 / (8 * radius) / 2
    assert np.all(radii > radius / 2 - bound) and np.all(radii < radius / 2 + 1e-3)
    assert np.abs(points.mean(axis=0) - 0.5).max() < 0.01


# f_score


def test_f_score_of_a_surface_against_itself_is_one():
    points = sphere_points(0.5, 2000, seed=0)
    assert f_score(points, points.copy()) == 1.0


def test_f_score_is_zero_when_the_gap_exceeds_the_threshold():
    inner, outer = sphere_points(0.4, 4000, seed=0), sphere_points(0.5, 4000, seed=1)  # gap 0.05 in the unit cube
    assert f_score(inner, outer, threshold=0.01) == 0.0
    assert f_score(inner, outer, threshold=0.06) == 1.0  # every nearest neighbour is just across the gap


def test_f_score_is_the_harmonic_mean_of_precision_and_recall():
    corners = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=float)  # ≥ 1 apart
    # A subset: precision 1 (both predicted points are on target), recall 2/4.
    assert f_score(corners[:2], corners, threshold=0.01) == pytest.approx(2 * 1 * 0.5 / (1 + 0.5))
    # Two target points found nearly exactly plus one stray: precision 2/3, recall 2/4.
    predicted = np.array([[0.001, 0, 0], [1, 0, 0.002], [0.5, 0.5, 0.5]])
    precision, recall = 2 / 3, 2 / 4
    assert f_score(predicted, corners, threshold=0.01) == pytest.approx(2 * precision * recall / (precision + recall))
    assert f_score(corners, predicted, threshold=0.01) == pytest.approx(4 / 7)  # symmetric in the roles


def test_f_score_with_empty_point_sets():
    points = sphere_points(0.5, 10, seed=0)
    assert f_score(np.zeros((0, 3)), points) == 0.0
    assert f_score(points, np.zeros((0, 3))) == 0.0
    assert f_score(np.zeros((0, 3)), np.zeros((0, 3))) == 1.0


# codebook_usage


def test_codebook_usage_and_perplexity_by_hand():
    assert codebook_usage(np.array([0, 0, 1, 1]), 4) == pytest.approx((0.5, 2.0))
    assert codebook_usage(np.arange(8), 8) == pytest.approx((1.0, 8.0))
    # p = (3/4, 1/4): perplexity = exp(-Σ p log p) = (3/4)^(-3/4) · (1/4)^(-1/4) ≈ 1.755
    assert codebook_usage(np.array([[2, 2], [2, 5]]), 10) == pytest.approx((0.2, 0.75**-0.75 * 0.25**-0.25))
    assert codebook_usage(np.array([], dtype=np.int64), 4) == (0.0, 0.0)


def test_codebook_usage_counts_indices_of_whole_latent_grids():
    indices = np.zeros((2, 4, 4, 4), dtype=np.int64)  # (B, r, r, r)
    indices[1] = 3
    usage, perplexity = codebook_usage(indices, 16)
    assert usage == 2 / 16 and perplexity == pytest.approx(2.0)


# reconstruction_metrics


def test_reconstruction_of_an_identical_tsdf_is_perfect_up_to_sampling():
    """The two surfaces are sampled with different seeds, so Chamfer is the sampling spacing, not 0;
    the threshold 0.05 sits above the largest nearest-neighbour gap of 4096 points (≈ 0.023)."""
    sphere = sphere_tsdf(32, 0.5)
    metrics = reconstruction_metrics(sphere, sphere.copy(), points=4096, threshold=0.05)
    assert metrics["iou"] == 1.0 and metrics["f_score"] == 1.0
    spacing = poisson_spacing(4096, 4 * math.pi * 0.25**2)  # ≈ 0.0069
    assert 0.0 < metrics["chamfer_l1"] < 1.5 * spacing
    assert 0.0 < metrics["chamfer_l2"] < (3 * spacing) ** 2


def test_reconstruction_of_a_smaller_sphere():
    inner, outer = sphere_tsdf(32, 0.4), sphere_tsdf(32, 0.6)
    metrics = reconstruction_metrics(inner, outer)
    assert metrics["iou"] == occupancy_iou(inner, outer)
    assert metrics["chamfer_l1"] == pytest.approx(0.1, abs=0.005)  # half the radius gap, as above
    assert metrics["f_score"] == 0.0  # gap 0.1 ≫ threshold 0.01


# set metrics: pairwise_chamfer, mmd_cov, one_nna, unidirectional_hausdorff, total_mutual_difference
#
# Mostly on one-point "shapes" on the x axis, where the Chamfer-L1 of two of them is just the gap |x1 - x2|.


def dots(*xs):
    return [np.array([[x, 0.0, 0.0]]) for x in xs]


def test_pairwise_chamfer_by_hand_and_against_chamfer_distance():
    two = np.array([[0.0, 0, 0], [1.0, 0, 0]])
    origin = np.array([[0.0, 0, 0]])
    # two → origin: (0 + 1) / 2; origin → two: 0; Chamfer-L1 is the mean of the two directions.
    assert pairwise_chamfer([two], [origin]) == pytest.approx(np.array([[0.25]]))
    assert pairwise_chamfer([origin], [np.array([[0.3, 0.4, 0.0]])]) == pytest.approx(np.array([[0.5]]))
    clouds = [sphere_points(r, 300, seed=k) for k, r in enumerate((0.3, 0.5, 0.6))]
    matrix = pairwise_chamfer(clouds, clouds)
    assert matrix.shape == (3, 3) and np.array_equal(matrix, matrix.T) and np.all(np.diag(matrix) == 0)
    other = pairwise_chamfer(clouds[:2], clouds)  # not the same list object: every entry computed
    for i in range(2):
        for j in range(3):
            assert other[i, j] == pytest.approx(chamfer_distance(clouds[i], clouds[j])[0])
            assert matrix[i, j] == pytest.approx(other[i, j])
    # The empty-surface convention of chamfer_distance holds here too.
    assert pairwise_chamfer([np.zeros((0, 3))], [origin, np.zeros((0, 3))]) == pytest.approx(np.array([[math.sqrt(3), 0.0]]))


def test_mmd_and_cov_of_a_set_against_itself():
    clouds = [sphere_points(r, 200, seed=k) for k, r in enumerate((0.3, 0.5, 0.7))]
    assert mmd_cov(clouds, clouds) == (0.0, 1.0)


def test_mmd_and_cov_by_hand():
    # Reference at 0, 1, 2; generated at 0.1, 0.2. Each reference's closest generated shape is 0.1, 0.8
    # and 1.8 away: MMD 0.9. Both generated shapes are closest to reference 0: COV 1/3.
    mmd, cov = mmd_cov(dots(0.1, 0.2), dots(0.0, 1.0, 2.0))
    assert mmd == pytest.approx(0.9) and cov == pytest.approx(1 / 3)
    # Mode collapse onto one reference shape lowers COV but not that shape's MMD term.
    assert mmd_cov(dots(1.0, 1.0, 1.0), dots(0.0, 1.0, 2.0)) == pytest.approx((2 / 3, 1 / 3))


def test_one_nna_of_well_separated_sets_is_one():
    assert one_nna(dots(0.0, 0.1, 0.2), dots(10.0, 10.1, 10.2)) == 1.0


def test_one_nna_by_hand():
    # gen 0, 0.1: nearest is the other generated one (0.1) → right; gen 5: ref 5.3 is nearer → wrong;
    # ref 0.5: gen 0.1 is nearer → wrong; ref 5.3, 5.4: each other (0.1) → right. 4 of 6.
    assert one_nna(dots(0.0, 0.1, 5.0), dots(0.5, 5.3, 5.4)) == pytest.approx(4 / 6)


def test_one_nna_ties_count_half():
    # gen 0: gen 2 (2) beats ref 4 → right. gen 2: gen 0 and ref 4 both 2 away → tie, half.
    # ref 4: gen 2 (2) beats ref 10 (6) → wrong. ref 10: ref 4 (6) beats gen 2 (8) → right.
    assert one_nna(dots(0.0, 2.0), dots(4.0, 10.0)) == pytest.approx((1 + 0.5 + 0 + 1) / 4)
    # A copy of the reference set (distinct shapes): every nearest neighbour is the twin in the other set.
    assert one_nna(dots(0.0, 1.0, 3.0), dots(0.0, 1.0, 3.0)) == 0.0
    # All shapes the same: every shape ties, so the classifier is right half of the time: the ideal 0.5.
    assert one_nna(dots(1.0, 1.0), dots(1.0, 1.0)) == 0.5


def test_one_nna_needs_both_sets():
    with pytest.raises(ValueError):
        one_nna(dots(0.0, 1.0), [])


def test_unidirectional_hausdorff_by_hand():
    partial = np.array([[0.0, 0, 0], [1.0, 0, 0]])
    assert unidirectional_hausdorff(partial, np.array([[0.0, 0, 0], [1.0, 0, 0], [5.0, 5, 5]])) == 0.0  # a superset
    assert unidirectional_hausdorff(partial, np.array([[0.0, 0, 0]])) == 1.0  # (1, 0, 0) is 1 from the completion
    assert unidirectional_hausdorff(partial, np.array([[0.0, 0, 0], [0.5, 0, 0]])) == 0.5
    # Only from the partial input to the completion: extra completed parts cost nothing.
    assert unidirectional_hausdorff(np.array([[0.0, 0, 0]]), partial) == 0.0
    assert unidirectional_hausdorff(partial, np.zeros((0, 3))) == pytest.approx(math.sqrt(3))
    assert unidirectional_hausdorff(np.zeros((0, 3)), partial) == 0.0


def test_unidirectional_hausdorff_of_a_kept_half_is_zero():
    sphere = sphere_points(0.6, 3000, seed=0)
    kept_half = sphere[sphere[:, 2] < 0.5]
    assert 0 < len(kept_half) < len(sphere)
    assert unidirectional_hausdorff(kept_half, sphere) == 0.0


def test_total_mutual_difference_by_hand():
    cloud = sphere_points(0.5, 300, seed=0)
    assert total_mutual_difference([cloud, cloud.copy(), cloud.copy()]) == 0.0
    assert total_mutual_difference(dots(0.0, 0.3)) == pytest.approx(0.6)  # each is 0.3 from the other
    # 0, 1, 3: mean gap to the others 2, 1.5 and 2.5.
    assert total_mutual_difference(dots(0.0, 1.0, 3.0)) == pytest.approx(6.0)
    with pytest.raises(ValueError):
        total_mutual_difference(dots(0.0))
