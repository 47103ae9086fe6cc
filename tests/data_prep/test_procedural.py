"""The procedural corpus (the general autoencoder's data): determinism, every family, one closed piece, signs."""

import json
import subprocess
import sys

import numpy as np
import pytest

from shapekiln.data_prep.process import normalize
from shapekiln.data_prep.sources.procedural import CAPTIONS, FAMILIES, ProceduralSource, min_voxels
from shapekiln.data_prep.tsdf import compute_tsdf
from shapekiln.errors import ShapekilnError
from shapekiln.metrics import structure

COUNT = 2 * len(FAMILIES)


@pytest.fixture(scope="module")
def records():
    source = ProceduralSource(COUNT, seed=3)
    return source, [source.load(i) for i in source.items()]


def test_the_same_seed_and_index_give_the_same_mesh_and_other_seeds_do_not():
    a, b, c = ProceduralSource(8, seed=1), ProceduralSource(8, seed=1), ProceduralSource(8, seed=2)
    for i in (0, 4):
        first, again, other = a.load(i).mesh, b.load(i).mesh, c.load(i).mesh
        assert first.vertices.tobytes() == again.vertices.tobytes() and first.faces.tobytes() == again.faces.tobytes()
        assert first.vertices.shape != other.vertices.shape or not np.allclose(first.vertices, other.vertices)
    # An item does not depend on how many come before or after it.
    assert ProceduralSource(100, seed=1).load(4).mesh.vertices.tobytes() == a.load(4).mesh.vertices.tobytes()


def test_every_family_is_present_and_each_shape_is_one_closed_outward_piece(records):
    source, loaded = records
    assert {record.category for record in loaded} == set(FAMILIES)
    assert [record.id for record in loaded] == [f"proc-{i:06d}" for i in range(COUNT)]
    for record in loaded:
        mesh = record.mesh
        assert mesh.is_watertight and mesh.is_winding_consistent, record.id
        assert mesh.body_count == 1, record.id
        assert mesh.volume > 0, record.id
        assert record.captions == [CAPTIONS[record.category]] and record.attributes == {"family": record.category}
    # Varied: not all the same size or the same complexity.
    volumes = [record.mesh.volume for record in loaded]
    assert np.std(volumes) > 0.2 * np.mean(volumes)


def test_prepared_at_32_each_shape_is_one_piece_with_the_signs_of_its_solid(records):
    """Prep's TSDF (libigl distances, winding-number signs) agrees with the implicit solid it was meshed from."""
    source, loaded = records
    resolution = 32
    assert min_voxels(resolution) >= 1.5
    centers = (np.arange(resolution) + 0.5) / resolution * 2 - 1
    grid = np.stack(np.meshgrid(centers, centers, centers, indexing="ij"), axis=-1).reshape(-1, 3)
    for i, record in enumerate(loaded):
        mesh, transform = normalize(record.mesh, 0.8)
        tsdf = compute_tsdf(mesh.vertices, mesh.faces, resolution, 0.2)
        assert structure(tsdf)["pieces"] == 1, record.id
        # The solid's value at each voxel center, in the frame the shape was built in.
        back = (grid - transform[:3, 3]) / transform[0, 0]
        solid = source.field(i)(back)
        clear = np.abs(solid) > 2.5 * (2 / resolution) / transform[0, 0]  # voxels well away from the surface
        agree = (tsdf.reshape(-1)[clear] < 0) == (solid[clear] < 0)
        assert agree.mean() > 0.995, (record.id, agree.mean())


def test_bad_arguments_are_refused():
    with pytest.raises(ShapekilnError, match="count >= 0"):
        ProceduralSource(-1)
    with pytest.raises(ShapekilnError, match="detail"):
        ProceduralSource(4, detail=8)
    with pytest.raises(ShapekilnError, match="out of range"):
        ProceduralSource(4).load(4)
    assert ProceduralSource.from_args(ProceduralSource(5, seed=2, detail=48).args()).args() == {"count": 5, "seed": 2, "detail": 48}


def test_prep_procedural_writes_shards_and_records_its_source(tmp_path):
    out = tmp_path / "corpus"
    result = subprocess.run([sys.executable, "-m", "shapekiln.cli", "prep", "procedural", "--count", "6", "--seed", "5",
                             "--config", "tiny", "--views", "1", "--out", str(out), "--no-progress"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    description = json.loads((out / "dataset.json").read_text())
    assert description["source"] == "procedural" and description["source_args"] == {"count": 6, "seed": 5, "detail": 64}
    assert "6 shapes written" in result.stdout and "0 skipped" in result.stdout
