import io
import json
import pickle
import re

import numpy as np
import pytest
import trimesh
from PIL import Image

from shapekiln.data_prep.sources.folder import FolderSource
from shapekiln.errors import ShapekilnError

CHAIR_ID = "1a6f615e8b1b5ae4dbbc9440457e303e"
TABLE_ID = "1a74a83fa6d24b3cacd67ce2c72c02e"

TEXT2SHAPE_CSV = f"""id,modelId,description,category,topLevelSynsetId,subSynsetId
7,{CHAIR_ID},"A brown wooden chair, with four legs.",Chair,03001627,03001627
8,{CHAIR_ID},a comfy chair with a tall back,Chair,03001627,03001627
9,ffffffffffffffffffffffffffffffff,a chair that is not in the folder,Chair,03001627,03001627
"""


def _write(mesh: trimesh.Trimesh, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    mesh.export(path)


@pytest.fixture
def tree(tmp_path):
    """A small mixed folder: ShapeNet layout, loose meshes in several formats, companions."""
    root = tmp_path / "meshes"
    _write(trimesh.creation.box(), root / "03001627" / CHAIR_ID / "models" / "model_normalized.obj")
    (root / "03001627" / CHAIR_ID / "models" / "model_normalized.json").write_text("{}")
    _write(trimesh.creation.box(), root / "04379243" / TABLE_ID / "models" / "model_normalized.obj")
    _write(trimesh.creation.cylinder(radius=0.3, height=1.0), root / "vases" / "tall vase_02.ply")
    _write(trimesh.creation.cone(radius=0.5, height=1.0), root / "lamps" / "desk.lamp.off")
    _write(trimesh.creation.icosphere(subdivisions=1), root / "vases" / "BOWL.STL")
    ball = trimesh.creation.icosphere(subdivisions=2)
    ball.visual.vertex_colors = np.tile([200, 30, 30, 255], (len(ball.vertices), 1))
    _write(ball, root / "red_ball.glb")
    (root / "README.md").write_text("not a mesh")
    (root / "vases" / "texture.png").write_bytes(b"\x89PNG")
    (root / ".hidden.obj").write_text("junk")
    return root


def _records(source):
    return {item.id: source.load(item) for item in source.items()}


def test_ids_categories_and_default_captions(tree):
    source = FolderSource(tree)
    items = list(source.items())
    assert [item.path for item in items] == sorted(item.path for item in items)
    records = _records(source)
    assert set(records) == {CHAIR_ID, TABLE_ID, "vases-tall_vase_02", "lamps-desk_lamp",
                            "vases-BOWL", "red_ball"}
    assert all(re.fullmatch(r"[A-Za-z0-9_-]+", shape_id) for shape_id in records)
    assert records[CHAIR_ID].category == "chair"
    assert records[TABLE_ID].captions == ["a table"]
    assert records["vases-tall_vase_02"].category == "vases"
    assert records["vases-tall_vase_02"].captions == ["a tall vase"]
    assert records["red_ball"].category == "unknown"
    assert records["red_ball"].captions == ["a red ball"]
    assert all(record.source == "folder" for record in records.values())
    # The STL's three-vertices-per-face soup is merged into a closed sphere.
    assert records["vases-BOWL"].mesh.is_watertight


def test_glb_keeps_vertex_colors(tree):
    source = FolderSource(tree)
    record = source.load(next(item for item in source.items() if item.id == "red_ball"))
    assert record.mesh.visual.kind == "vertex"
    assert np.all(record.mesh.visual.vertex_colors[:, :3] == [200, 30, 30])


def test_textured_scene_is_one_mesh_with_texture(tmp_path, shared_data):
    root = tmp_path / "assets"
    root.mkdir()
    (root / "truck.glb").write_bytes((shared_data / "meshes" / "CesiumMilkTruck.glb").read_bytes())
    source = FolderSource(root)
    record = source.load(next(source.items()))
    assert isinstance(record.mesh, trimesh.Trimesh)
    assert record.mesh.visual.kind == "texture"
    assert record.mesh.visual.uv.shape == (len(record.mesh.vertices), 2)
    # The wheels sit in their own nodes: with node transforms applied the truck is ~4.9 long.
    assert record.mesh.extents.max() == pytest.approx(4.87, abs=0.05)


def test_text2shape_csv_gives_several_captions(tree, tmp_path):
    captions_csv = tmp_path / "captions.tablechair.csv"
    captions_csv.write_text(TEXT2SHAPE_CSV)
    records = _records(FolderSource(tree, captions_csv=captions_csv))
    assert records[CHAIR_ID].captions == [
        "A brown wooden chair, with four legs.", "a comfy chair with a tall back"
    ]
    assert records[CHAIR_ID].category == "chair"
    assert records[TABLE_ID].captions == ["a table"]


def test_csv_may_name_shapes_by_path(tree, tmp_path):
    captions_csv = tmp_path / "captions.csv"
    captions_csv.write_text("uid,caption\nvases/tall vase_02.ply,a slender white vase\n")
    records = _records(FolderSource(tree, captions_csv=captions_csv))
    assert records["vases-tall_vase_02"].captions == ["a slender white vase"]


def test_colliding_ids_are_made_unique(tmp_path):
    _write(trimesh.creation.box(), tmp_path / "a" / "b.obj")
    _write(trimesh.creation.box(), tmp_path / "a" / "b.ply")
    ids = [item.id for item in FolderSource(tmp_path).items()]
    assert len(set(ids)) == 2 and all(re.fullmatch(r"a-b-[0-9a-f]{8}", i) for i in ids)


def test_items_and_source_pickle_for_workers(tree):
    source = pickle.loads(pickle.dumps(FolderSource(tree)))
    item = pickle.loads(pickle.dumps(next(iter(source.items()))))
    assert len(source.load(item).mesh.faces) > 0


@pytest.fixture
def bad_tree(tmp_path):
    root = tmp_path / "bad"
    root.mkdir()
    (root / "corrupt.obj").write_text("v a b c\nf 1 2 3\n")
    (root / "empty.obj").write_text("")
    box = trimesh.creation.box()
    vertices = box.vertices.copy()
    vertices[0] = np.nan
    trimesh.Trimesh(vertices, box.faces, process=False).export(root / "nan.ply")
    (root / "car.fbx").write_bytes(b"Kaydara FBX Binary  \x00")
    return root


@pytest.mark.parametrize(
    "name, reason",
    [
        ("corrupt", r"corrupt\.obj: cannot read mesh \(ValueError: "),
        ("empty", r"empty\.obj: mesh has no faces"),
        ("nan", r"nan\.ply: 1 of 8 vertices are not finite \(NaN/Inf\)"),
        ("car", r"car\.fbx: unsupported extension \.fbx \(supported: \.glb, .*\.stl\)"),
    ],
)
def test_bad_files_fail_one_by_one_with_a_reason(bad_tree, name, reason):
    source = FolderSource(bad_tree)
    item = next(item for item in source.items() if item.id == name)
    with pytest.raises(ShapekilnError, match=reason) as error:
        source.load(item)
    assert "\n" not in str(error.value)


def test_csv_without_caption_column_names_file_and_columns(tree, tmp_path):
    captions_csv = tmp_path / "labels.csv"
    captions_csv.write_text(f"modelId,category\n{CHAIR_ID},Chair\n")
    with pytest.raises(ShapekilnError, match=r"labels\.csv needs .* found: modelId, category"):
        FolderSource(tree, captions_csv=captions_csv)


def test_missing_root_and_missing_csv(tmp_path, tree):
    with pytest.raises(ShapekilnError, match="mesh folder not found: .*nowhere"):
        FolderSource(tmp_path / "nowhere")
    with pytest.raises(ShapekilnError, match="captions CSV not found: .*nope.csv"):
        FolderSource(tree, captions_csv=tmp_path / "nope.csv")


def test_a_textured_mesh_over_the_face_limit_keeps_its_texture_in_the_views(tmp_path, shared_data):
    from shapekiln.config import from_dict
    from shapekiln.data_prep.process import PrepConfig, prepare_sample
    from shapekiln.data_prep.render import orbit_cameras, render_views

    root = tmp_path / "assets"
    root.mkdir()
    (root / "truck.glb").write_bytes((shared_data / "meshes" / "CesiumMilkTruck.glb").read_bytes())
    record = FolderSource(root).load(next(FolderSource(root).items()))
    faces = len(record.mesh.faces)
    cameras = orbit_cameras(num_views=2, size=64)

    def prepared(max_faces):
        config = from_dict(PrepConfig, {"resolution": 16, "views": 2, "view_size": 64, "max_faces": max_faces}, "test")
        sample = prepare_sample(record, config, cameras)
        views = np.stack([np.asarray(Image.open(io.BytesIO(sample[f"view_{k}.png"]))) for k in range(2)])
        return views, json.loads(sample["meta.json"])

    def chroma(views):  # mean (max - min) over RGB of the covered pixels: 0 for a gray render
        covered = views[..., 3] > 0
        rgb = views[..., :3][covered].astype(float)
        return float((rgb.max(axis=1) - rgb.min(axis=1)).mean())

    whole, whole_meta = prepared(faces)
    halved, halved_meta = prepared(faces // 2)
    assert "decimated_from_faces" not in whole_meta["flags"]
    assert halved_meta["flags"]["decimated_from_faces"] == faces and halved_meta["flags"]["views_from"] == "original mesh"
    assert halved_meta["faces"] <= faces // 2
    np.testing.assert_array_equal(halved, whole)  # the views do not depend on the face limit
    # What the views were before: rendered from the decimated mesh, whose visuals decimation dropped.
    decimated = record.mesh.simplify_quadric_decimation(face_count=faces // 2)
    gray, colored = chroma(render_views(decimated, cameras)), chroma(whole)
    assert gray < 1 < 5 < colored
