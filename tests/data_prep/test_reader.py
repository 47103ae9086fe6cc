"""Reading shards back: tensors and dtypes, splitting by rank and worker, partial-shape masks."""

import numpy as np
import pytest
import torch
import trimesh

from shapekiln.config import from_dict
from shapekiln.data_prep.process import PrepConfig
from shapekiln.data_prep.reader import PartialSpec, ShapeShards, check_dataset, collate, list_shards, make_loader, random_known_mask
from shapekiln.data_prep.shards import run_prep
from shapekiln.data_prep.sources.base import ShapeRecord
from shapekiln.errors import ShapekilnError

R = 16


class Boxes:
    name = "boxes"

    def __init__(self, count):
        self.count = count

    def items(self):
        return iter(range(self.count))

    def item_id(self, item):
        return f"box-{item:03d}"

    def load(self, item):
        mesh = trimesh.creation.box(extents=(1.0, 0.4 + 0.05 * item, 0.6))
        return ShapeRecord(self.item_id(item), mesh, [f"box {item}", f"a box numbered {item}"], category="box", source="boxes")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    config = from_dict(PrepConfig, {"resolution": R, "views": 3, "view_size": 24, "shard_size": 3, "val_fraction": 0.0, "test_fraction": 0.0}, "test")
    run_prep(Boxes(10), config, out, progress=False)
    return out


def ids_of(dataset):
    return [sample["id"] for sample in dataset]


def test_batches_have_the_documented_shapes_and_dtypes(shards):
    dataset = ShapeShards(list_shards(shards), views=True, partial=PartialSpec(), resolution=R)
    batch = next(iter(make_loader(dataset, batch_size=4)))
    assert batch["tsdf"].shape == (4, 1, R, R, R) and batch["tsdf"].dtype == torch.float32
    assert batch["views"].shape == (4, 3, 4, 24, 24) and batch["views"].dtype == torch.uint8
    assert batch["intrinsics"].shape == (4, 3, 3, 3) and batch["world_to_camera"].shape == (4, 3, 4, 4)
    assert batch["known_mask"].shape == (4, 1, R, R, R) and batch["known_mask"].dtype == torch.bool
    assert batch["partial"].shape == (4, 1, R, R, R)
    assert batch["id"] == ["box-000", "box-001", "box-002", "box-003"]
    assert batch["caption"][0] in ("box 0", "a box numbered 0") and batch["category"] == ["box"] * 4
    assert batch["tsdf"].abs().max() <= 0.2 + 1e-3 and (batch["tsdf"] < 0).any()
    # Views: the box covers some pixels (alpha 255), the background is transparent.
    alpha = batch["views"][:, :, 3]
    assert (alpha == 255).any() and (alpha == 0).any()


def test_partial_is_the_shape_where_known_and_empty_elsewhere(shards):
    sample = next(iter(ShapeShards(list_shards(shards), partial=PartialSpec())))
    known, partial, tsdf = sample["known_mask"], sample["partial"], sample["tsdf"]
    assert known.any() and not known.all()
    assert torch.equal(partial[known], tsdf[known])
    assert torch.allclose(partial[~known], torch.tensor(0.2))


@pytest.mark.parametrize("world_size,workers", [(2, 0), (2, 2), (3, 1), (8, 1)])
def test_ranks_and_workers_see_disjoint_data_that_covers_the_set(shards, world_size, workers):
    """4 shards: by shard when there are enough, by sample otherwise (8 ranks > 4 shards)."""
    everything = ids_of(ShapeShards(list_shards(shards)))
    assert len(everything) == 10
    seen = []
    for rank in range(world_size):
        dataset = ShapeShards(list_shards(shards), rank=rank, world_size=world_size)
        loader = make_loader(dataset, batch_size=1, num_workers=workers)
        mine = [i for batch in loader for i in batch["id"]]
        assert mine, f"rank {rank} got no data"
        seen.extend(mine)
    assert sorted(seen) == sorted(everything)


def test_shuffling_is_seeded_and_repeat_goes_on(shards):
    first = ids_of(ShapeShards(list_shards(shards), shuffle_buffer=5, seed=1))
    again = ids_of(ShapeShards(list_shards(shards), shuffle_buffer=5, seed=1))
    other = ids_of(ShapeShards(list_shards(shards), shuffle_buffer=5, seed=2))
    assert first == again and sorted(first) == sorted(other) and first != other
    endless = iter(ShapeShards(list_shards(shards), repeat=True))
    assert len([next(endless) for _ in range(25)]) == 25


def test_wrong_resolution_and_missing_shards_are_clear_errors(shards, tmp_path):
    with pytest.raises(ShapekilnError, match="holds 16³ grids but 32³ was expected"):
        next(iter(ShapeShards(list_shards(shards), resolution=32)))
    with pytest.raises(ShapekilnError, match="no shards found"):
        list_shards(tmp_path)
    with pytest.raises(ShapekilnError, match="no shards found"):
        list_shards(shards, split="val")


def test_joined_splits_list_each_splits_shards_in_the_order_given(tmp_path):
    for name in ("train-000000", "test-000001", "test-000000", "val-000000"):
        (tmp_path / f"{name}.tar").touch()
    names = lambda split: [path.rsplit("/", 1)[-1] for path in list_shards(tmp_path, split)]
    assert names("test+val") == ["test-000000.tar", "test-000001.tar", "val-000000.tar"]
    assert names("val+test") == ["val-000000.tar", "test-000000.tar", "test-000001.tar"]
    assert names("test") == ["test-000000.tar", "test-000001.tar"]


def test_datasets_joined_by_commas_are_read_together_and_each_is_checked(shards, tmp_path):
    """Training mixes datasets as "A,B" (the general VQ-VAE: the procedural corpus and the synthetic set)."""
    other = tmp_path / "other"
    config = from_dict(PrepConfig, {"resolution": R, "views": 0, "shard_size": 2, "val_fraction": 0.0, "test_fraction": 0.0}, "test")
    run_prep(Boxes(4), config, other, progress=False)
    joined = list_shards(f"{shards}, {other}")
    assert joined == list_shards(shards) + list_shards(other)
    assert len(list(ShapeShards(joined))) == 14
    check_dataset(f"{shards},{other}", R, 0.2)
    coarse = tmp_path / "coarse"
    run_prep(Boxes(2), from_dict(PrepConfig, {**vars(config), "resolution": 32}, "test"), coarse, progress=False)
    with pytest.raises(ShapekilnError, match=f"{coarse} holds 32³ grids but the model expects 16³"):
        check_dataset(f"{shards},{coarse}", R, 0.2)
    with pytest.raises(ShapekilnError, match="no dataset named"):
        list_shards(" , ")

def grid(resolution=32):
    axis = -1.0 + (np.arange(resolution) + 0.5) * 2.0 / resolution
    return np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), axis=-1)


def test_half_space_masks_are_half_spaces():
    rng = np.random.default_rng(0)
    for _ in range(20):
        known = random_known_mask(32, rng, ["half"])
        # Known along exactly one axis: constant over the other two, monotone along it.
        varying = [axis for axis in range(3) if not (known == known.take([0], axis=axis)).all()]
        assert len(varying) == 1
        profile = known.take(0, axis=(varying[0] + 1) % 3).take(0, axis=(varying[0] + 1) % 2 if varying[0] == 2 else 1 if varying[0] == 0 else 0)
        assert np.all(np.diff(profile.astype(int)) >= 0) or np.all(np.diff(profile.astype(int)) <= 0)
        assert 0.15 < known.mean() < 0.85


def test_box_masks_hide_one_box_and_octants_are_octants():
    rng = np.random.default_rng(1)
    points = grid()
    for _ in range(20):
        unknown = ~random_known_mask(32, rng, ["box"])
        low, high = points[unknown].min(axis=0), points[unknown].max(axis=0)
        inside_box = ((points >= low) & (points <= high)).all(axis=-1)
        assert np.array_equal(unknown, inside_box)
    edge = 1 - 1 / 32
    for _ in range(20):
        known = random_known_mask(32, rng, ["octant"])
        octant = known if known.mean() < 0.5 else ~known  # an octant around |center| <= 0.2 is < 22% of the cube
        low, high = points[octant].min(axis=0), points[octant].max(axis=0)
        assert np.array_equal(octant, ((points >= low) & (points <= high)).all(axis=-1))
        # A box that reaches exactly one side of the cube along each axis: an octant.
        assert (np.isclose(low, -edge) ^ np.isclose(high, edge)).all()


def test_masks_are_whole_writable_arrays_and_an_unknown_kind_is_refused():
    rng = np.random.default_rng(2)
    for kind in ("half", "octant", "box"):
        known = random_known_mask(16, rng, [kind])
        assert known.shape == (16, 16, 16) and known.dtype == bool and known.flags.c_contiguous and known.flags.writeable
    with pytest.raises(ShapekilnError, match="unknown partial-shape kind 'cone'"):
        random_known_mask(16, rng, ["cone"])


def test_collate_keeps_strings_as_lists():
    batch = collate([{"id": "a", "tsdf": torch.zeros(1, 2, 2, 2)}, {"id": "b", "tsdf": torch.ones(1, 2, 2, 2)}])
    assert batch["id"] == ["a", "b"] and batch["tsdf"].shape == (2, 1, 2, 2, 2)
