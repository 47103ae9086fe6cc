"""Shape metrics shared by every evaluation (VQ-VAE reconstruction now, generation and completion later).

Conventions: TSDF grids are (R, R, R) at voxel centers of [-1, 1]³, negative inside. Surface
distances are reported in **unit-cube** units (the grid's cube mapped to [0, 1]³), the convention
of the papers' tables: `surface_points` returns points there.
"""

from __future__ import annotations

import numpy as np
import trimesh
from scipy.spatial import cKDTree

from shapekiln.data_prep.preview import tsdf_to_mesh

# Largest distance inside the unit cube: what an empty surface costs in Chamfer terms.
UNIT_CUBE_DIAGONAL = float(np.sqrt(3.0))


def occupancy_iou(predicted: np.ndarray, target: np.ndarray) -> float:
    """Volumetric IoU of the inside (TSDF < 0) voxels of two grids of the same shape; 1.0 if both are empty."""
    if predicted.shape != target.shape:
        raise ValueError(f"grids differ in shape: {predicted.shape} vs {target.shape}")
    inside_p, inside_t = predicted < 0, target < 0
    union = np.logical_or(inside_p, inside_t).sum()
    return 1.0 if union == 0 else float(np.logical_and(inside_p, inside_t).sum() / union)


def surface_points(shape: np.ndarray | trimesh.Trimesh, count: int, seed: int = 0, level: float = 0.0) -> np.ndarray:
    """`count` points sampled uniformly (by area) on a mesh in [-1, 1]³, or on a TSDF's `level`
    iso-surface, mapped to the unit cube: (count, 3), or (0, 3) when there is no surface."""
    mesh = tsdf_to_mesh(shape, level) if isinstance(shape, np.ndarray) else shape
    if len(mesh.faces) == 0 or mesh.area <= 0:
        return np.zeros((0, 3))
    points, _ = trimesh.sample.sample_surface(mesh, count, seed=seed)
    return (np.asarray(points) + 1.0) / 2.0


def nearest_distances(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each point of a, the distance to the nearest point of b; and the same from b to a."""
    return cKDTree(b).query(a)[0], cKDTree(a).query(b)[0]


def chamfer_distance(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(Chamfer-L1, Chamfer-L2) between point sets (N, 3) and (M, 3).

    L1: mean of the two directed mean nearest distances; L2: the same with squared distances.
    An empty set against a non-empty one costs the unit cube's diagonal.
    """
    if len(a) == 0 or len(b) == 0:
        worst = 0.0 if len(a) == len(b) else UNIT_CUBE_DIAGONAL
        return worst, worst**2
    a_to_b, b_to_a = nearest_distances(a, b)
    return float((a_to_b.mean() + b_to_a.mean()) / 2.0), float(((a_to_b**2).mean() + (b_to_a**2).mean()) / 2.0)


def f_score(predicted: np.ndarray, target: np.ndarray, threshold: float = 0.01) -> float:
    """F-score at `threshold`: harmonic mean of precision (predicted points within it of the target)
    and recall (target points within it of the prediction)."""
    if len(predicted) == 0 or len(target) == 0:
        return float(len(predicted) == len(target))
    p_to_t, t_to_p = nearest_distances(predicted, target)
    precision, recall = float((p_to_t < threshold).mean()), float((t_to_p < threshold).mean())
    return 0.0 if precision + recall == 0 else 2.0 * precision * recall / (precision + recall)


def codebook_usage(indices: np.ndarray, codebook_size: int) -> tuple[float, float]:
    """(fraction of the codebook used, perplexity) of code indices gathered over a dataset."""
    counts = np.bincount(np.asarray(indices).reshape(-1), minlength=codebook_size).astype(np.float64)
    if counts.sum() == 0:
        return 0.0, 0.0
    probs = counts / counts.sum()
    entropy = -(probs[probs > 0] * np.log(probs[probs > 0])).sum()
    return float((counts > 0).mean()), float(np.exp(entropy))


def reconstruction_metrics(predicted: np.ndarray, target: np.ndarray, points: int = 32768, seed: int = 0,
                           threshold: float = 0.01) -> dict[str, float]:
    """IoU, Chamfer-L1/L2 and F-score between a reconstructed TSDF and its target TSDF.

    The two surfaces are sampled independently, so even identical ones score a Chamfer-L1 of
    about the sample spacing: 32768 points keep that near 0.002 and F-score@0.01 at 1.0, where
    4096 points would floor Chamfer-L1 near 0.007 and cap a perfect F-score near 0.8.
    """
    predicted_points = surface_points(predicted, points, seed)
    target_points = surface_points(target, points, seed + 1)
    cd_l1, cd_l2 = chamfer_distance(predicted_points, target_points)
    return {
        "iou": occupancy_iou(predicted, target),
        "chamfer_l1": cd_l1,
        "chamfer_l2": cd_l2,
        "f_score": f_score(predicted_points, target_points, threshold),
    }


# ---------------------------------------------------------------- sets of shapes (generation and completion)
#
# The standard set metrics of PointFlow (Yang et al. 2019), SDFusion and MPC (Wu et al. 2020), all
# with the Chamfer-L1 of `chamfer_distance` between point sets in the unit cube.


def pairwise_chamfer(a: list[np.ndarray], b: list[np.ndarray]) -> np.ndarray:
    """(len(a), len(b)) matrix of Chamfer-L1 (as `chamfer_distance`) between every cloud of a and of b.

    Each cloud's KD-tree is built once. When `b is a` only one triangle is computed (the matrix is
    symmetric with a zero diagonal).
    """
    symmetric = b is a
    trees_a = [cKDTree(points) if len(points) else None for points in a]
    trees_b = trees_a if symmetric else [cKDTree(points) if len(points) else None for points in b]
    matrix = np.zeros((len(a), len(b)))
    for i, (points_a, tree_a) in enumerate(zip(a, trees_a)):
        for j in range(i + 1 if symmetric else 0, len(b)):
            points_b, tree_b = b[j], trees_b[j]
            if tree_a is None or tree_b is None:
                matrix[i, j] = chamfer_distance(points_a, points_b)[0]  # the empty-set convention
            else:
                matrix[i, j] = (tree_b.query(points_a)[0].mean() + tree_a.query(points_b)[0].mean()) / 2.0
    if symmetric:
        matrix += matrix.T
    return matrix


def mmd_cov(generated: list[np.ndarray], reference: list[np.ndarray]) -> tuple[float, float]:
    """(MMD-CD, COV-CD) of generated point clouds against reference ones.

    MMD: the mean over reference shapes of the distance to their closest generated shape (fidelity).
    COV: the fraction of reference shapes that are the closest reference of at least one generated
    shape (coverage; a tie goes to the first reference).
    """
    if not generated or not reference:
        raise ValueError("MMD and COV need at least one generated and one reference shape")
    distances = pairwise_chamfer(generated, reference)  # (G, R)
    mmd = float(distances.min(axis=0).mean())
    covered = np.unique(distances.argmin(axis=1))
    return mmd, float(len(covered) / len(reference))


def one_nna(generated: list[np.ndarray], reference: list[np.ndarray]) -> float:
    """1-NNA-CD: leave-one-out accuracy of the 1-nearest-neighbour classifier telling generated from
    reference shapes over their union. 0.5 is ideal (indistinguishable); 1.0 is worst (two separate
    clusters); below 0.5 means each shape's nearest neighbour is in the other set (copies of it).

    Ties: a shape whose nearest same-set and nearest other-set distances are equal counts as half
    right, so sets of identical shapes score 0.5, and a set against an exact copy of itself (distinct
    shapes) scores 0.0.
    """
    if len(generated) + len(reference) < 3 or not generated or not reference:
        raise ValueError("1-NNA needs shapes in both sets and at least three in all")
    union = list(generated) + list(reference)
    distances = pairwise_chamfer(union, union)
    np.fill_diagonal(distances, np.inf)
    is_generated = np.arange(len(union)) < len(generated)
    correct = 0.0
    for i in range(len(union)):
        same = distances[i, is_generated == is_generated[i]].min()
        other = distances[i, is_generated != is_generated[i]].min()
        correct += 1.0 if same < other else 0.5 if same == other else 0.0
    return correct / len(union)


def unidirectional_hausdorff(partial_points: np.ndarray, completion_points: np.ndarray) -> float:
    """UHD (fidelity of a completion): the largest distance from a point of the partial input to the
    completion. 0 when the completion contains the input; an empty completion costs the unit-cube
    diagonal, an empty input nothing."""
    if len(partial_points) == 0:
        return 0.0
    if len(completion_points) == 0:
        return UNIT_CUBE_DIAGONAL
    return float(cKDTree(completion_points).query(partial_points)[0].max())


def total_mutual_difference(completions: list[np.ndarray]) -> float:
    """TMD (diversity of completions of one input, MPC): for each completion, the mean Chamfer-L1
    to the other ones; summed over the completions. 0 when all are the same."""
    if len(completions) < 2:
        raise ValueError("TMD needs at least two completions")
    distances = pairwise_chamfer(completions, completions)
    return float((distances.sum(axis=1) / (len(completions) - 1)).sum())


# ---------------------------------------------------------------- structure (does a shape hold together?)
#
# What a person sees first in a sample is whether it is one object: a lamp whose shade floats above its
# base, a table with legs in pieces. IoU and Chamfer barely charge for a missing pole; these count it.

_NEIGHBOURS_26 = np.ones((3, 3, 3), dtype=bool)


def inside_pieces(tsdf: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """26-connected pieces of the inside (TSDF < 0) voxels: labels (R, R, R) int (0 outside, 1..n) and
    the voxel count of each piece (n,), largest first (label 1 is the largest)."""
    from scipy import ndimage

    labels, count = ndimage.label(np.asarray(tsdf) < 0, structure=_NEIGHBOURS_26)
    sizes = np.bincount(labels.reshape(-1), minlength=count + 1)[1:]
    order = np.argsort(-sizes, kind="stable")  # relabel so 1 is the largest piece
    relabel = np.zeros(count + 1, dtype=labels.dtype)
    relabel[order + 1] = np.arange(1, count + 1)
    return relabel[labels], sizes[order]


def structure(tsdf: np.ndarray) -> dict[str, float]:
    """`pieces`: how many 26-connected pieces the inside has (0 when empty); `floaters`: the share of
    the inside voxels outside the largest piece (0 for one piece or none)."""
    _, sizes = inside_pieces(tsdf)
    total = int(sizes.sum())
    return {"pieces": int(len(sizes)), "floaters": 0.0 if total == 0 else float(1.0 - sizes[0] / total)}


def structure_summary(grids: list[np.ndarray], parts: list[list[np.ndarray]] | None = None,
                      tolerance: int = 1) -> dict[str, float]:
    """Over a set of TSDF grids: `one_piece` (the fraction whose inside is exactly one piece), the mean
    number of pieces and the mean floater share. With `parts` (for each grid, the voxel masks of the thin
    parts it should have): `thin_parts` (how many were checked) and `thin_parts_present` (the fraction
    that `parts_present` finds, with `tolerance`; absent when there are none)."""
    if not grids:
        raise ValueError("a structure summary needs at least one grid")
    if parts is not None and len(parts) != len(grids):
        raise ValueError(f"{len(parts)} part lists for {len(grids)} grids")
    rows = [structure(grid) for grid in grids]
    summary = {
        "one_piece": float(np.mean([row["pieces"] == 1 for row in rows])),
        "pieces_mean": float(np.mean([row["pieces"] for row in rows])),
        "floaters_mean": float(np.mean([row["floaters"] for row in rows])),
    }
    if parts is not None:
        present = [found for grid, masks in zip(grids, parts) for found in parts_present(masks, grid, tolerance)]
        summary["thin_parts"] = len(present)
        if present:  # absent when no shape has thin parts (vases, shelves)
            summary["thin_parts_present"] = float(np.mean(present))
    return summary


def part_voxels(part: trimesh.Trimesh, resolution: int) -> np.ndarray:
    """The voxels whose centers lie inside a closed part mesh (already in the grid's [-1, 1]³): (R, R, R) bool.

    Empty when the part falls between voxel centers: at that resolution it cannot be present at all.
    """
    from shapekiln.data_prep.tsdf import grid_points, inside_mask

    inside = inside_mask(np.asarray(part.vertices, dtype=np.float64), np.asarray(part.faces, dtype=np.int64),
                         grid_points(resolution))
    return inside.reshape((resolution,) * 3)


# A part is present when this share of its voxels lies in (or within `tolerance` voxels of) the
# largest piece: broken-off fragments are at least 2 voxels (26-connectivity) from it, so they miss.
PART_COVERAGE = 0.75


def parts_present(parts: list[np.ndarray], tsdf: np.ndarray, tolerance: int = 1) -> list[bool]:
    """For each part's voxel mask (R, R, R) bool, whether the shape has it: at least PART_COVERAGE of its
    voxels in the inside's largest piece dilated by `tolerance` voxels (a part that lies a voxel off, as
    a sample's leg may against a reference's, still counts; a missing, broken or floating one does not).
    A part with no voxels is never present."""
    from scipy import ndimage

    labels, sizes = inside_pieces(tsdf)
    largest = labels == 1
    if tolerance > 0 and len(sizes):
        largest = ndimage.binary_dilation(largest, structure=_NEIGHBOURS_26, iterations=tolerance)
    present = []
    for mask in parts:
        if mask.shape != largest.shape:
            raise ValueError(f"part mask {mask.shape} and grid {largest.shape} differ in shape")
        count = int(mask.sum())
        present.append(count > 0 and len(sizes) > 0 and float(largest[mask].sum()) >= PART_COVERAGE * count)
    return present
