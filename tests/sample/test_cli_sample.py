"""`shapekiln sample` and `shapekiln complete` as a user runs them, including every bad input."""

import numpy as np
import pytest
import torch
import trimesh
from PIL import Image

from ..train.test_train_vqvae import one_error_line, shapekiln
from .conftest import tiny_pipeline
from .test_pipeline import shape_tsdf


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A partial mesh, point cloud and grid in the model's frame, an image, and broken files."""
    root = tmp_path_factory.mktemp("inputs")
    from shapekiln.data_prep.preview import tsdf_to_mesh

    tsdf = shape_tsdf(0)
    np.save(root / "table.npy", tsdf)
    mesh = tsdf_to_mesh(tsdf)
    mesh.export(root / "table.obj")
    np.savetxt(root / "table.xyz", mesh.sample(2000, seed=0) if hasattr(mesh, "sample") else mesh.vertices)
    trimesh.creation.box((0.5, 0.5, 0.5)).apply_scale(8.0).export(root / "huge.obj")
    (root / "empty.obj").write_text("# nothing\n")
    (root / "not_an_image.png").write_bytes(b"plain text, not a PNG")
    Image.fromarray(np.full((40, 40, 3), 200, np.uint8)).save(root / "view.png")
    return root


@pytest.fixture(scope="module")
def text_only_dir(tmp_path_factory):
    return tiny_pipeline(("text",)).save_pretrained(tmp_path_factory.mktemp("text-only") / "pipeline")


def test_sample_writes_meshes_grids_and_a_preview(pipeline_dir, inputs, tmp_path):
    out = tmp_path / "out"
    result = shapekiln("sample", "--ckpt", pipeline_dir, "--text", "a tall table", "--image", inputs / "view.png",
                       "--w-text", 2, "--w-image", 1, "--n", 2, "--steps", 2, "--out", out, "--no-progress")
    assert "2 shapes" in result.stdout
    assert (out / "preview.png").is_file() and (out / "sample_0.npy").is_file() and (out / "sample_1.npy").is_file()
    assert np.load(out / "sample_0.npy").shape == (16, 16, 16)
    assert not list(out.glob(".export-*"))


@pytest.mark.parametrize("source", ["table.obj", "table.xyz", "table.npy"])
def test_complete_takes_a_mesh_a_point_cloud_or_a_grid(pipeline_dir, inputs, tmp_path, source):
    keep = "observed" if source.endswith(".xyz") else "z<0"
    out = tmp_path / "out"
    result = shapekiln("complete", inputs / source, "--ckpt", pipeline_dir, "--keep", keep, "--n", 2, "--steps", 2,
                       "--out", out, "--no-progress")
    assert "2 completions" in result.stdout
    assert (out / "completion_1.npy").is_file() and (out / "preview.png").is_file()


def test_complete_by_inpainting(pipeline_dir, inputs, tmp_path):
    shapekiln("complete", inputs / "table.npy", "--ckpt", pipeline_dir, "--keep", "box:-1,-1,-1,1,1,0", "--mode", "inpaint",
              "--n", 1, "--steps", 2, "--out", tmp_path / "out", "--no-progress")
    assert (tmp_path / "out" / "completion_0.npy").is_file()


@pytest.mark.parametrize(
    "args, expected",
    [
        (["sample", "--text", "a chair", "--steps", -3], "--steps must be at least 1"),
        (["sample", "--text", "a chair", "--n", 0], "--n must be at least 1"),
        (["sample", "--text", " "], "--text is empty"),
        (["sample", "--image", "{inputs}/not_an_image.png"], "is not an image"),
        (["sample", "--image", "{inputs}/missing.png"], "image not found"),
        (["sample", "--text", "a chair", "--w-image", 2], "no image condition"),
        (["sample", "--text", "a chair", "--formats", "obj,fbx"], "unknown format 'fbx'"),
        (["complete", "{inputs}/empty.obj"], "empty.obj"),
        (["complete", "{inputs}/huge.obj"], "outside [-1, 1]³"),
        (["complete", "{inputs}/table.npy", "--keep", "z<-2"], "keeps nothing"),
        (["complete", "{inputs}/table.npy", "--keep", "z<2"], "keeps everything"),
        (["complete", "{inputs}/table.npy", "--keep", "middle"], "--keep 'middle'"),
        (["complete", "{inputs}/table.obj", "--keep", "observed"], "--keep observed is for point clouds"),
        (["complete", "{inputs}/missing.obj"], "partial shape not found"),
        (["complete", "{inputs}/table.npy", "--mode", "inpaint", "--w-partial", 2], "--w-partial applies to --mode learned"),
        (["sample", "--ckpt", "{inputs}", "--text", "a chair"], "not a saved shape pipeline"),
        (["sample", "--text", "a chair", "--device", "gpu7"], "--device 'gpu7' is not a torch device"),
        (["complete", "{inputs}/table.npy", "--device", "cuda:0" if not torch.cuda.is_available() else "nonsense"], "--device"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(pipeline_dir, inputs, tmp_path, args, expected):
    args = [str(arg).replace("{inputs}", str(inputs)) for arg in args]
    if "--ckpt" not in args:
        args += ["--ckpt", pipeline_dir]
    out = tmp_path / "out"
    result = shapekiln(*args, "--steps" if "--steps" not in args else "--seed", 1, "--out", out, "--no-progress", check=False)
    assert expected in one_error_line(result)
    assert not out.exists()


def test_guidance_for_a_modality_the_model_was_not_trained_with(text_only_dir, inputs, tmp_path):
    result = shapekiln("sample", "--ckpt", text_only_dir, "--image", inputs / "view.png", "--steps", 1, "--out", tmp_path / "out",
                       "--no-progress", check=False)
    assert "not trained with image" in one_error_line(result)
    result = shapekiln("complete", inputs / "table.npy", "--ckpt", text_only_dir, "--steps", 1, "--out", tmp_path / "out",
                       "--no-progress", check=False)
    assert "not trained with partial" in one_error_line(result)
    assert not (tmp_path / "out").exists()
