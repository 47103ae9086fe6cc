"""The structure metric (pieces, floaters, thin parts) on hand-built grids whose answer is known."""

import numpy as np
import pytest

from shapekiln.metrics import inside_pieces, part_voxels, parts_present, structure, structure_summary

R = 16


def grid(*boxes):
    """A TSDF-like grid (−1 inside, +1 outside) with the given voxel boxes inside: ((x0, x1), (y0, y1), (z0, z1))."""
    tsdf = np.ones((R, R, R), dtype=np.float32)
    for (x0, x1), (y0, y1), (z0, z1) in boxes:
        tsdf[x0:x1, y0:y1, z0:z1] = -1.0
    return tsdf


TOP = ((2, 14), (10, 12), (2, 14))  # a table top, 12 × 2 × 12 voxels
LEG = ((3, 4), (2, 10), (3, 4))  # a one-voxel-thick leg under it, touching it


def test_two_disjoint_boxes_are_two_pieces():
    tsdf = grid(((1, 4), (1, 4), (1, 4)), ((8, 12), (8, 12), (8, 12)))
    labels, sizes = inside_pieces(tsdf)
    assert sizes.tolist() == [64, 27]  # largest first
    assert (labels == 1).sum() == 64 and structure(tsdf)["pieces"] == 2


def test_a_box_with_a_one_voxel_leg_is_one_piece_and_the_leg_is_present():
    tsdf = grid(TOP, LEG)
    assert structure(tsdf) == {"pieces": 1, "floaters": 0.0}
    leg = grid(LEG) < 0
    assert parts_present([leg], tsdf, tolerance=0) == [True]


def test_voxels_touching_only_at_a_corner_are_26_connected():
    tsdf = grid(((4, 5), (4, 5), (4, 5)), ((5, 6), (5, 6), (5, 6)))
    assert structure(tsdf)["pieces"] == 1


def test_a_floater_of_known_volume():
    floater = ((6, 8), (2, 4), (6, 8))  # 8 voxels, two voxels below the top
    tsdf = grid(TOP, floater)
    row = structure(tsdf)
    assert row["pieces"] == 2
    assert row["floaters"] == pytest.approx(8 / (12 * 2 * 12 + 8))


def test_an_empty_grid_has_no_pieces():
    assert structure(np.ones((R, R, R))) == {"pieces": 0, "floaters": 0.0}
    assert parts_present([grid(LEG) < 0], np.ones((R, R, R))) == [False]


def test_summary_over_a_set():
    one, two = grid(TOP, LEG), grid(TOP, ((6, 8), (2, 4), (6, 8)))
    summary = structure_summary([one, one, two, np.ones((R, R, R))])
    assert summary["one_piece"] == 0.5
    assert summary["pieces_mean"] == pytest.approx((1 + 1 + 2 + 0) / 4)
    with pytest.raises(ValueError):
        structure_summary([])


def test_a_missing_broken_or_floating_leg_is_absent():
    leg = grid(LEG) < 0
    assert parts_present([leg], grid(TOP)) == [False]  # missing
    broken = grid(TOP, ((3, 4), (7, 10), (3, 4)), ((3, 4), (2, 5), (3, 4)))  # a gap at y = 5, 6
    assert parts_present([leg], broken) == [False]  # 3 of 8 voxels attached: under PART_COVERAGE
    floating = grid(TOP, ((3, 4), (2, 8), (3, 4)))  # two voxels short of the top
    assert structure(floating)["pieces"] == 2
    assert parts_present([leg], floating) == [False]


def test_tolerance_accepts_a_part_one_voxel_off_and_no_more():
    leg = grid(LEG) < 0
    shifted = grid(TOP, ((4, 5), (2, 10), (3, 4)))  # the same leg one voxel along x
    assert parts_present([leg], shifted, tolerance=0) == [False]
    assert parts_present([leg], shifted, tolerance=1) == [True]
    far = grid(TOP, ((5, 6), (2, 10), (3, 4)))
    assert parts_present([leg], far, tolerance=1) == [False]


def test_a_part_between_voxel_centers_is_never_present():
    import trimesh

    sliver = trimesh.creation.box(bounds=[[-0.5, -0.5, -0.01], [0.5, 0.5, 0.01]])  # 0.02 thick, the voxels are 0.125
    mask = part_voxels(sliver, R)
    assert not mask.any()
    assert parts_present([mask], grid(TOP)) == [False]
    slab = part_voxels(trimesh.creation.box(bounds=[[-0.5, -0.5, -0.1], [0.5, 0.5, 0.1]]), R)
    assert slab.sum() == 8 * 8 * 2  # centers at ±0.0625 along z, 8 along x and y
    with pytest.raises(ValueError):
        parts_present([np.zeros((8, 8, 8), dtype=bool)], grid(TOP))


def test_dataset_parts_are_rebuilt_where_prep_put_the_shapes(tmp_path):
    from shapekiln.config import load_config
    from shapekiln.data_prep.process import PrepConfig
    from shapekiln.data_prep.reader import ShapeShards, list_shards
    from shapekiln.data_prep.shards import run_prep
    from shapekiln.data_prep.sources.synthetic import SyntheticSource
    from shapekiln.evaluate import DatasetParts

    config = load_config(PrepConfig, "tiny", "data", {"test_fraction": 0.0, "val_fraction": 0.0})
    source = SyntheticSource.for_config(12, config, seed=3)
    run_prep(source, config, tmp_path / "data", workers=1, progress=False, source_args=source.args())
    parts = DatasetParts.for_data(tmp_path / "data")
    checked, misfits = 0, 0
    samples = list(ShapeShards(list_shards(tmp_path / "data", "train")))
    for sample, other in zip(samples, samples[1:] + samples[:1]):
        inside = sample["tsdf"][0].numpy() < 0
        for mask in parts.masks(sample["id"]):
            assert mask.any() and not (mask & ~inside).any(), sample["id"]  # every part voxel is inside the TSDF
            checked += 1
        # The check can fail: another shape's parts do not lie inside this one.
        misfits += any((mask & ~inside).any() for mask in parts.masks(other["id"]))
    assert checked >= 12 and misfits >= len(samples) // 2
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "dataset.json").write_text('{"source": "folder", "source_args": {}, "config": {}}')
    assert DatasetParts.for_data(tmp_path / "real") is None
