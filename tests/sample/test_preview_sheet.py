"""The preview sheet marks a sample that is not one piece (the quickstart's overview)."""

import numpy as np
import trimesh

from shapekiln.sample.export import preview_sheet


def test_labels_are_written_on_their_own_render_only():
    meshes = [trimesh.creation.box(extents=(1.0, 1.0, 1.0)), trimesh.creation.icosphere()]
    sheet = np.asarray(preview_sheet(meshes, {"text": "a box"}, cell=96, columns=2, labels=["3 pieces", ""]))
    assert sheet.shape == (96, 3 * 96, 3)
    red = (sheet[..., 0] > 150) & (sheet[..., 1] < 80) & (sheet[..., 2] < 80)
    corner = lambda column: red[:20, column * 96:column * 96 + 80]  # noqa: E731
    assert corner(1).sum() > 10 and corner(2).sum() == 0 and corner(0).sum() == 0
    plain = np.asarray(preview_sheet(meshes, {"text": "a box"}, cell=96, columns=2))
    assert np.array_equal(plain[:, 2 * 96:], sheet[:, 2 * 96:]) and not np.array_equal(plain[:, 96:192], sheet[:, 96:192])
