import pickle
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import trimesh

from shapekiln.data_prep.sources.synthetic import (
    ATTRIBUTES,
    CATEGORIES,
    PALETTE,
    SyntheticSource,
    build_mesh,
    captions_for,
)
from shapekiln.errors import ShapekilnError

REPO = Path(__file__).resolve().parents[2]

N_CAT = len(CATEGORIES)


def _mesh(category, seed=0, **attributes):
    """A shape with the given attributes; the rest take their first allowed value."""
    chosen = {name: values[0] for name, values in ATTRIBUTES[category].items()}
    chosen.update(attributes)
    return build_mesh(category, chosen, np.random.default_rng(seed))


def _radial(vertices):
    return np.hypot(vertices[:, 0], vertices[:, 2])


def test_declared_categories_and_attributes():
    assert len(CATEGORIES) >= 8
    assert {"table", "chair", "stool", "bench", "shelf", "lamp", "vase", "mug"} <= set(CATEGORIES)
    assert set(ATTRIBUTES) == set(CATEGORIES)
    for grid in ATTRIBUTES.values():
        assert grid["color"] == list(PALETTE)
        assert len(grid) >= 3  # color plus at least two geometric attributes
        assert all(len(values) >= 2 for values in grid.values())


def test_items_ids_and_record_fields():
    source = SyntheticSource(5, seed=3)
    assert source.name == "synthetic"
    assert list(source.items()) == [0, 1, 2, 3, 4]
    assert source.item_id(42) == "syn-000042"
    record = source.load(4)
    assert record.id == "syn-000004"
    assert record.source == "synthetic"
    assert (record.category, record.attributes) == source.describe(4)
    # The runner ships the source to worker processes.
    assert pickle.loads(pickle.dumps(source)).load(4).captions == record.captions


def test_bad_arguments_raise_user_errors():
    with pytest.raises(ShapekilnError):
        SyntheticSource(-1)
    with pytest.raises(ShapekilnError):
        SyntheticSource(3).load(3)
    with pytest.raises(ShapekilnError, match="sofa"):
        build_mesh("spaceship", {}, np.random.default_rng(0))
    with pytest.raises(ShapekilnError, match="legs"):
        _mesh("table", legs="five")


def test_same_seed_and_index_give_identical_shapes():
    # Different counts too: a shape must not depend on how many others are generated.
    a, b = SyntheticSource(40, seed=7), SyntheticSource(1000, seed=7)
    for i in (0, 13, 39):
        ra, rb = a.load(i), b.load(i)
        np.testing.assert_array_equal(ra.mesh.vertices, rb.mesh.vertices)
        np.testing.assert_array_equal(ra.mesh.faces, rb.mesh.faces)
        np.testing.assert_array_equal(ra.mesh.visual.vertex_colors, rb.mesh.visual.vertex_colors)
        assert ra.captions == rb.captions
        assert (ra.category, ra.attributes) == (rb.category, rb.attributes)


def test_different_seed_gives_different_shapes():
    a, b = SyntheticSource(20, seed=0), SyntheticSource(20, seed=1)
    differing = 0
    for i in range(20):
        va, vb = a.load(i).mesh.vertices, b.load(i).mesh.vertices
        differing += va.shape != vb.shape or not np.array_equal(va, vb)
    assert differing == 20  # the jitter alone makes every shape differ
    assert [a.describe(i) for i in range(20)] != [b.describe(i) for i in range(20)]


def test_categories_are_balanced():
    source = SyntheticSource(N_CAT * 6)
    counts = Counter(source.describe(i)[0] for i in source.items())
    assert counts == {category: 6 for category in CATEGORIES}
    # Not a fixed cycle: the order within blocks is shuffled.
    first, second = ([source.describe(i)[0] for i in range(b * N_CAT, (b + 1) * N_CAT)] for b in (0, 1))
    assert first != second


def test_every_attribute_value_occurs_in_a_modest_prefix():
    source = SyntheticSource(N_CAT * 40)
    seen = {category: {name: set() for name in grid} for category, grid in ATTRIBUTES.items()}
    for i in source.items():
        category, attributes = source.describe(i)
        assert set(attributes) == set(ATTRIBUTES[category])
        for name, value in attributes.items():
            assert value in ATTRIBUTES[category][name]
            seen[category][name].add(value)
    for category, grid in ATTRIBUTES.items():
        for name, values in grid.items():
            assert seen[category][name] == set(values), (category, name)


def test_full_attribute_grid_is_covered_once_per_cycle():
    grid = ATTRIBUTES["mug"]
    size = int(np.prod([len(v) for v in grid.values()]))
    source = SyntheticSource(N_CAT * size, seed=5)
    combos = [tuple(a.values()) for c, a in map(source.describe, source.items()) if c == "mug"]
    assert len(combos) == size and len(set(combos)) == size


def test_meshes_are_closed_finite_colored_and_modest():
    source = SyntheticSource(N_CAT * 3, seed=2)
    for i in source.items():
        record = source.load(i)
        mesh = record.mesh
        assert 12 <= len(mesh.faces) <= 5000
        assert np.isfinite(mesh.vertices).all()
        assert mesh.is_watertight and mesh.is_winding_consistent
        # Every part is closed and outward-facing (the TSDF's winding numbers rely on it).
        parts = mesh.split(only_watertight=False)
        assert len(parts) >= 1 and all(part.volume > 0 for part in parts), record.category
        colors = mesh.visual.vertex_colors
        assert colors.dtype == np.uint8 and colors.shape == (len(mesh.vertices), 4)
        assert (colors == [*PALETTE[record.attributes["color"]], 255]).all()
        low, high = mesh.bounds
        assert -0.01 <= low[1] <= 0.03, record.category  # stands on the floor, +Y up
        assert 0.3 <= (high - low).max() <= 2.5


@pytest.mark.parametrize("category", CATEGORIES)
def test_every_attribute_changes_the_geometry(category):
    base = {name: values[0] for name, values in ATTRIBUTES[category].items()}
    reference = _mesh(category, seed=4, **base).vertices
    for name, values in ATTRIBUTES[category].items():
        if name == "color":
            continue
        for value in values[1:]:
            changed = _mesh(category, seed=4, **{**base, name: value}).vertices
            assert changed.shape != reference.shape or not np.allclose(changed, reference), (name, value)


@pytest.mark.parametrize("category", ["table", "stool", "lamp", "vase", "mug"])
def test_tall_and_short_differ_clearly_in_proportions(category):
    for seed in range(5):
        tall, short = _mesh(category, seed, height="tall"), _mesh(category, seed, height="short")
        aspect_tall = tall.extents[1] / tall.extents[[0, 2]].max()
        aspect_short = short.extents[1] / short.extents[[0, 2]].max()
        assert aspect_tall > 1.4 * aspect_short


def test_pedestal_has_a_central_column_and_legs_do_not():
    for category in ("table", "stool"):
        for seed in range(3):
            for legs in ("pedestal", "three", "four"):
                mesh = _mesh(category, seed, legs=legs)
                height = mesh.bounds[1, 1]
                # Surface samples, since a cylinder has vertices only at its ends.
                points, _ = trimesh.sample.sample_surface(mesh, 4000, seed=0)
                middle = points[(points[:, 1] > 0.3 * height) & (points[:, 1] < 0.6 * height)]
                assert len(middle) > 20
                if legs == "pedestal":
                    assert _radial(middle).max() < 0.1
                else:
                    assert _radial(middle).min() > 0.08
                    # A top plus one part per leg (and a stool's footrest when tall).
                    footrest = category == "stool"  # _mesh's default height is tall
                    expected = 1 + {"three": 3, "four": 4}[legs] + footrest
                    assert len(mesh.split(only_watertight=False)) == expected


def test_handles_stick_out():
    for seed in range(5):
        with_handle, without = _mesh("mug", seed, handle="yes"), _mesh("mug", seed, handle="no")
        assert with_handle.bounds[1, 0] - without.bounds[1, 0] > 0.1
        np.testing.assert_allclose(with_handle.bounds[0, 0], without.bounds[0, 0])  # only on +X
        two, none = _mesh("vase", seed, handles="yes"), _mesh("vase", seed, handles="no")
        assert two.extents[0] - none.extents[0] > 0.1
        assert two.bounds[0, 0] < none.bounds[0, 0] - 0.05 and two.bounds[1, 0] > none.bounds[1, 0] + 0.05


def test_shape_attributes_read_in_the_geometry():
    for seed in range(5):
        high, low = _mesh("chair", seed, back="high"), _mesh("chair", seed, back="low")
        assert high.bounds[1, 1] - low.bounds[1, 1] > 0.2
        bulbous = _mesh("vase", seed, shape="bulbous", handles="no")
        slender = _mesh("vase", seed, shape="slender", handles="no")
        assert _radial(bulbous.vertices).max() > 1.8 * _radial(slender.vertices).max()
        cone, cyl = _mesh("lamp", seed, shade="cone"), _mesh("lamp", seed, shade="cylinder")
        top = lambda m: _radial(m.vertices[m.vertices[:, 1] > m.bounds[1, 1] - 1e-6]).max()  # noqa: E731
        assert top(cone) < 0.6 * top(cyl)
        two, three = _mesh("sofa", seed, seats="two"), _mesh("sofa", seed, seats="three")
        assert three.extents[0] > 1.3 * two.extents[0]
        single, double = _mesh("bed", seed, size="single"), _mesh("bed", seed, size="double")
        assert double.extents[0] > 1.4 * single.extents[0]
        long, short = _mesh("bench", seed, length="long"), _mesh("bench", seed, length="short")
        assert long.extents[0] > 1.4 * short.extents[0]
        wide, narrow = _mesh("shelf", seed, width="wide"), _mesh("shelf", seed, width="narrow")
        assert wide.extents[0] > 1.6 * narrow.extents[0]


def test_shelf_levels_add_boards():
    parts = [
        len(_mesh("shelf", 0, levels=n, back="no").split(only_watertight=False))
        for n in ATTRIBUTES["shelf"]["levels"]
    ]
    assert parts == [2 + 3, 2 + 4, 2 + 5, 2 + 6]  # two sides and levels + 1 boards


CAPTION_EXAMPLES = [
    ("table", {"height": "tall", "top": "round", "legs": "four", "color": "red"},
     "a tall round red table with four legs"),
    ("chair", {"back": "high", "arms": "yes", "legs": "pedestal", "color": "blue"},
     "a blue chair with a high back and arms, on a pedestal"),
    ("stool", {"height": "short", "seat": "square", "legs": "three", "color": "gray"},
     "a short square gray stool with three legs"),
    ("bench", {"length": "long", "back": "no", "legs": "slab", "color": "brown"},
     "a long brown bench with slab legs, without a backrest"),
    ("shelf", {"width": "wide", "levels": "four", "back": "yes", "color": "white"},
     "a wide white shelf with four levels and a back panel"),
    ("lamp", {"height": "short", "shade": "cylinder", "base": "square", "color": "yellow"},
     "a short yellow lamp with a cylindrical shade and a square base"),
    ("vase", {"height": "tall", "shape": "bulbous", "handles": "yes", "color": "green"},
     "a tall bulbous green vase with two handles"),
    ("mug", {"height": "short", "handle": "no", "color": "black"},
     "a short black mug without a handle"),
    ("sofa", {"seats": "three", "arms": "yes", "color": "red"},
     "a three-seat red sofa with arms"),
    ("bed", {"size": "double", "headboard": "yes", "footboard": "no", "color": "blue"},
     "a double blue bed with a headboard, without a footboard"),
]


@pytest.mark.parametrize("category, attributes, expected", CAPTION_EXAMPLES)
def test_caption_examples(category, attributes, expected):
    captions = captions_for(category, attributes)
    assert captions[0] == expected
    assert captions[-1] == f"a {attributes['color']} {category}"


def test_captions_name_category_and_color():
    source = SyntheticSource(N_CAT * 5, seed=1)
    for i in source.items():
        record = source.load(i)
        assert len(set(record.captions)) >= 3
        for caption in record.captions:
            words = caption.replace(",", "").split()
            assert record.category in words and record.attributes["color"] in words, caption


@pytest.mark.parametrize("category", CATEGORIES)
def test_every_full_caption_says_every_attribute(category):
    # Changing any one attribute must change each of the three full captions.
    base = {name: values[0] for name, values in ATTRIBUTES[category].items()}
    reference = captions_for(category, base)
    for name, values in ATTRIBUTES[category].items():
        for value in values[1:]:
            changed = captions_for(category, {**base, name: value})
            assert all(c != r for c, r in zip(changed[:3], reference[:3])), (name, value)


# ---------------------------------------------------------------- thin parts kept at the grid they are built for


def _thin_masks(source, item, transform, resolution):
    from shapekiln.data_prep.sources.synthetic import THIN_PARTS
    from shapekiln.metrics import part_voxels

    return [part_voxels(part.copy().apply_transform(transform), resolution)
            for name, part in source.parts(item) if name in THIN_PARTS]


@pytest.mark.parametrize("resolution", [16, 32])
def test_shapes_built_for_a_grid_are_one_piece_with_every_thin_part_there(resolution):
    from shapekiln.data_prep.process import normalize
    from shapekiln.data_prep.tsdf import compute_tsdf
    from shapekiln.metrics import parts_present, structure

    source = SyntheticSource(N_CAT * 3, seed=4, resolution=resolution)
    thin_parts = 0
    for i in source.items():
        mesh, transform = normalize(source.load(i).mesh, 0.8)
        tsdf = compute_tsdf(mesh.vertices, mesh.faces, resolution, 0.2)
        assert structure(tsdf)["pieces"] == 1, source.describe(i)
        masks = _thin_masks(source, i, transform, resolution)
        assert all(parts_present(masks, tsdf, tolerance=0)), source.describe(i)
        thin_parts += len(masks)
    assert thin_parts >= 2 * N_CAT  # legs, poles, handles, arms, spokes: the check had parts to check


def test_the_nominal_shapes_lose_thin_parts_at_16_cubed():
    # The reason for building shapes for their grid: the same shapes at their nominal proportions break.
    from shapekiln.data_prep.process import normalize
    from shapekiln.data_prep.tsdf import compute_tsdf
    from shapekiln.metrics import parts_present

    source = SyntheticSource(N_CAT * 2, seed=4)
    present = []
    for i in source.items():
        mesh, transform = normalize(source.load(i).mesh, 0.8)
        present += parts_present(_thin_masks(source, i, transform, 16), compute_tsdf(mesh.vertices, mesh.faces, 16, 0.2), tolerance=0)
    assert np.mean(present) < 0.6


def test_thin_parts_are_at_least_the_asked_width_and_the_jitter_is_kept():
    nominal, built = SyntheticSource(N_CAT, seed=9), SyntheticSource(N_CAT, seed=9, resolution=32)
    assert built.min_width == pytest.approx(2.5 / (0.8 * 32))
    for i in nominal.items():
        assert nominal.describe(i) == built.describe(i)
        thin_parts = [(name, part) for name, part in built.parts(i) if name in ("leg", "pole", "spoke", "handle")]
        longest = np.ptp(built.load(i).mesh.vertices, axis=0).max()
        for name, part in thin_parts:
            # A rod's width across its flats: cos(π/8) of its diameter for the 8-sided spokes.
            obb = part.bounding_box_oriented.primitive.extents
            assert np.sort(obb)[0] >= 0.92 * built.min_width * longest, (built.describe(i), name)
        # Same draws: the overall size moves only by the thicker parts.
        assert np.ptp(nominal.load(i).mesh.vertices, axis=0).max() == pytest.approx(longest, rel=0.1)


def test_a_grid_too_coarse_for_thin_parts_is_refused():
    with pytest.raises(ShapekilnError, match="resolution >= 16"):
        SyntheticSource(4, resolution=8)
    with pytest.raises(ShapekilnError, match="part_voxels"):
        SyntheticSource(4, resolution=32, part_voxels=-1)
    with pytest.raises(ShapekilnError, match="min_width"):
        build_mesh("mug", {"height": "tall", "handle": "yes", "color": "red"}, np.random.default_rng(0), min_width=0.5)
    rebuilt = SyntheticSource.from_args(SyntheticSource(4, seed=2, resolution=32).args())
    assert rebuilt.args() == {"count": 4, "seed": 2, "resolution": 32, "part_voxels": 2.5}


def test_prep_at_a_grid_too_coarse_for_thin_parts_is_one_error_line(tmp_path):
    config = tmp_path / "data.yaml"
    config.write_text((REPO / "configs" / "data" / "tiny.yaml").read_text().replace("resolution: 16", "resolution: 8"))
    result = subprocess.run([sys.executable, "-m", "shapekiln.cli", "prep", "synthetic", "--count", "2",
                             "--config", str(config), "--out", str(tmp_path / "out")], capture_output=True, text=True)
    assert result.returncode == 2 and "resolution >= 16, got 8" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()
