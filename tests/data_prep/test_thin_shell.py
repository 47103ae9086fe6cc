"""Prep's thin-shell rule: open sheets get volume; closed meshes keep every sign."""

import io
import json
import subprocess
import sys

import numpy as np
import pytest
import trimesh

from shapekiln.config import load_config
from shapekiln.data_prep.process import PrepConfig, prepare_sample
from shapekiln.data_prep.sources.base import ShapeRecord
from shapekiln.data_prep.sources.synthetic import SyntheticSource
from shapekiln.data_prep.tsdf import add_thin_shell, sheet_faces
from shapekiln.errors import ShapekilnError
from shapekiln.metrics import structure

from ..conftest import REPO


def quad(a, b, c, d):
    return trimesh.Trimesh([a, b, c, d], [[0, 1, 2], [0, 2, 3]], process=False)


def sheet_chair():
    """A chair of single-sided planes, as many real models are: seat and back quads, each leg two crossed strips."""
    parts = [quad([-.25, .45, -.25], [.25, .45, -.25], [.25, .45, .25], [-.25, .45, .25]),
             quad([-.25, .45, -.25], [.25, .45, -.25], [.25, 1.0, -.25], [-.25, 1.0, -.25])]
    for x in (-.22, .22):
        for z in (-.22, .22):
            parts.append(quad([x - .02, 0, z], [x + .02, 0, z], [x + .02, .45, z], [x - .02, .45, z]))
            parts.append(quad([x, 0, z - .02], [x, 0, z + .02], [x, .45, z + .02], [x, .45, z - .02]))
    return trimesh.util.concatenate(parts)


def prepare(mesh, **config):
    sample = prepare_sample(ShapeRecord("shape", mesh, ["a shape"]), PrepConfig(views=0, **config), [])
    return np.load(io.BytesIO(sample["sdf.npy"])).astype(np.float32), json.loads(sample["meta.json"])["flags"]


def test_an_open_sheet_is_skipped_without_the_shell_and_kept_as_a_slab_with_it():
    sheet = quad([-.5, 0, -.5], [.5, 0, -.5], [.5, 0, .5], [-.5, 0, .5])
    sheet.vertices[:, 1] += 0.013  # off the voxel centers' planes, so no center lies on it
    with pytest.raises(ShapekilnError, match="zero-volume mesh"):
        prepare(sheet, resolution=32, thin_shell=0)
    tsdf, flags = prepare(sheet, resolution=32, thin_shell=1.5)
    assert flags["thin_shell"] == {"sheet_faces": 2, "voxels": 1.5}
    inside = tsdf < 0
    assert structure(tsdf)["pieces"] == 1
    layers = np.flatnonzero(inside.any(axis=(0, 2)))  # y layers with inside voxels
    assert 1 <= len(layers) <= 2  # 1.5 voxels thick: one or two layers of centers
    # The slab spans the sheet: 0.8 of the grid after normalization, every center inside that square.
    assert inside[:, layers[0], :].sum() == pytest.approx((0.8 * 32) ** 2, rel=0.15)


def test_a_chair_of_single_sided_sheets_is_one_piece_with_its_legs():
    without, _ = prepare(sheet_chair(), resolution=32, thin_shell=0)
    tsdf, flags = prepare(sheet_chair(), resolution=32, thin_shell=1.5)
    assert flags["thin_shell"]["sheet_faces"] == 20  # every face
    assert structure(without)["pieces"] != 1  # winding numbers alone give only a wedge between seat and back
    assert structure(tsdf) == {"pieces": 1, "floaters": 0.0}
    inside = tsdf < 0
    assert inside[:, :4, :].any(axis=1).sum() >= 4  # legs reach the floor
    assert inside.sum() > (without < 0).sum()  # the shell only adds inside voxels


@pytest.mark.parametrize("index", range(4))
def test_closed_meshes_keep_every_sign(index):
    mesh = SyntheticSource(4, seed=1, resolution=32).load(index).mesh
    assert prepare(mesh, resolution=32, thin_shell=1.5)[0].tobytes() == prepare(mesh, resolution=32, thin_shell=0)[0].tobytes()


def test_the_faces_of_a_closed_box_are_not_sheets_and_the_shell_leaves_its_grid_alone():
    box = trimesh.creation.box(extents=[1.0, 0.6, 0.8])
    assert not sheet_faces(box.vertices, box.faces, offset=0.02).any()
    tsdf = np.full((16, 16, 16), 0.2, dtype=np.float32)
    same, count = add_thin_shell(box.vertices, box.faces, tsdf, thickness=0.2, tau=0.2)
    assert count == 0 and same is tsdf


def test_an_open_box_keeps_its_inside_and_gains_no_shell():
    # A box missing its top is open, but each face still shuts in one side from most directions.
    box = trimesh.creation.box(extents=[1.0, 1.0, 1.0])
    keep = box.face_normals[:, 1] < 0.5
    open_box = trimesh.Trimesh(box.vertices, box.faces[keep], process=False)
    sheets = sheet_faces(open_box.vertices, open_box.faces, offset=0.02)
    assert sheets.mean() < 0.5


@pytest.mark.parametrize("value", [-1, 33])
def test_a_thickness_that_is_negative_or_larger_than_the_grid_is_refused(tmp_path, value):
    path = tmp_path / "data.yaml"
    tiny = (REPO / "configs" / "data" / "tiny.yaml").read_text()
    path.write_text(tiny.replace("thin_shell: 1.5", f"thin_shell: {value}").replace("resolution: 16", "resolution: 32"))
    with pytest.raises(ShapekilnError, match="thin_shell"):
        load_config(PrepConfig, str(path), "data")
    result = subprocess.run([sys.executable, "-m", "shapekiln.cli", "prep", "synthetic", "--count", "2", "--config", "tiny",
                             "--thin-shell", str(value), "--out", str(tmp_path / "out")], capture_output=True, text=True)
    assert result.returncode == 2 and "thin_shell" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
