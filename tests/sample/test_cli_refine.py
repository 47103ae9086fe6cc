"""`shapekiln refine` and `shapekiln sample --refine-steps` as a user runs them, with every bad input."""

import json

import numpy as np
import pytest
import torch
import trimesh
from safetensors.torch import load_file, save_file

from ..models.test_priors import tiny_view_prior
from ..train.test_train_vqvae import one_error_line, shapekiln
from .test_refine import sphere


@pytest.fixture(scope="module")
def priors(tmp_path_factory):
    root = tmp_path_factory.mktemp("priors")
    tiny_view_prior().save_pretrained(root / "text")
    tiny_view_prior(text=None).save_pretrained(root / "no-text")
    # A prior whose weights are NaN: every SDS gradient is NaN.
    broken = root / "nan"
    tiny_view_prior().save_pretrained(broken)
    weights = broken / "unet" / "diffusion_pytorch_model.safetensors"
    save_file({name: torch.full_like(value, float("nan")) for name, value in load_file(weights).items()}, weights)
    # A Stable Diffusion folder with only its index.
    (root / "sd").mkdir()
    (root / "sd" / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    return root


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    np.save(root / "ball.npy", sphere(0.4, 16))
    trimesh.creation.icosphere(subdivisions=2, radius=0.5).export(root / "ball.obj")
    (root / "notes.txt").write_text("not a shape\n")
    return root


def test_refine_writes_meshes_grid_preview_and_a_loss_curve(priors, inputs, tmp_path):
    out = tmp_path / "out"
    result = shapekiln("refine", inputs / "ball.obj", "--text", "a red ball", "--prior", priors / "text", "--steps", 2,
                       "--negative-text", "a blue ball", "--resolution", 16, "--out", out, "--no-progress")
    assert "refine: 2 steps of the grid (anchor 0.3)" in result.stdout  # no VQ-VAE given: a residual grid
    names = sorted(p.name for p in out.iterdir())
    assert names == ["logs", "preview.png", "refined.glb", "refined.npy", "refined.obj", "refined.ply", "refined_colors.npy"]
    assert np.load(out / "refined.npy").shape == (16, 16, 16)
    assert list((out / "logs").glob("events.out.tfevents.*"))


def test_refine_optimizes_the_latent_of_a_pipeline_vqvae(priors, inputs, pipeline_dir, tmp_path):
    out = tmp_path / "out"
    shapekiln("refine", inputs / "ball.npy", "--text", "a ball", "--prior", priors / "text", "--ckpt", pipeline_dir,
              "--target", "latent", "--steps", 1, "--out", out, "--no-progress")
    refined = np.load(out / "refined.npy")
    assert refined.shape == (16, 16, 16) and not np.allclose(refined, sphere(0.4, 16), atol=1e-3)


def test_refine_with_a_pipeline_optimizes_its_latent_by_default(priors, inputs, pipeline_dir, tmp_path):
    out = tmp_path / "out"
    result = shapekiln("refine", inputs / "ball.npy", "--text", "a ball", "--prior", priors / "text", "--ckpt", pipeline_dir,
                       "--steps", 1, "--out", out, "--no-progress")
    assert "refine: 1 steps of the latent (anchor 0.03)" in result.stdout
    forced = shapekiln("refine", inputs / "ball.npy", "--text", "a ball", "--prior", priors / "text", "--ckpt", pipeline_dir,
                       "--target", "grid", "--anchor", "0.5", "--steps", 1, "--out", tmp_path / "grid", "--no-progress")
    assert "refine: 1 steps of the grid (anchor 0.5)" in forced.stdout


def test_sample_with_refine_steps_refines_every_shape(priors, pipeline_dir, tmp_path):
    out = tmp_path / "out"
    result = shapekiln("sample", "--ckpt", pipeline_dir, "--text", "a tall table", "--n", 2, "--steps", 2,
                       "--refine-steps", 1, "--prior", priors / "text", "--out", out, "--no-progress")
    assert "2 shapes" in result.stdout and (out / "sample_1.npy").is_file() and (out / "preview.png").is_file()


def test_sample_passes_a_negative_prompt_to_its_refinement(priors, pipeline_dir, tmp_path):
    """With the prompt as its own negative, guided ε̂ = ε(n) + s·(ε(c) − ε(n)) = ε(c) whatever s: runs at guidance 20 and 5
    agree, while without it they differ. (Guidance 1 itself takes a one-branch shortcut, whose rounding differs.)"""
    from shapekiln.sample.pipeline import ShapePipeline
    from shapekiln.sample.refine import RefineConfig

    def refined(guidance, negative=None):
        # The grid target: Adam's first steps on a latent barely depend on the gradient's scale, so guidance would hardly show there.
        config = RefineConfig(steps=2, guidance=guidance, target="grid")
        pipeline = ShapePipeline.from_pretrained(pipeline_dir, refine=config, prior=priors / "text")
        output = pipeline(text="a tall table", num_samples=1, steps=2, seed=3, progress=False, negative_text=negative)
        return output.shapes[0].tsdf

    assert np.allclose(refined(20.0, negative="a tall table"), refined(5.0, negative="a tall table"), atol=1e-6)
    assert np.abs(refined(20.0) - refined(5.0)).max() > 1e-3
    out = tmp_path / "out"
    result = shapekiln("sample", "--ckpt", pipeline_dir, "--text", "a tall table", "--negative-text", "a short table", "--n", 1,
                       "--steps", 2, "--refine-steps", 1, "--prior", priors / "text", "--out", out, "--no-progress")
    assert "1 shapes" in result.stdout and (out / "sample_0.npy").is_file()


@pytest.mark.parametrize("extra", [[], ["--refine-steps", 1, "--negative-text", " "]], ids=["without-refine-steps", "empty"])
def test_a_negative_prompt_without_refinement_is_one_line(extra, priors, pipeline_dir, tmp_path):
    out = tmp_path / "out"
    args = extra or ["--negative-text", "a short table"]
    line = one_error_line(shapekiln("sample", "--ckpt", pipeline_dir, "--text", "a tall table", *args, "--prior", priors / "text",
                                    "--out", out, "--no-progress", check=False))
    assert "--negative-text" in line and not out.exists()


def test_nan_gradients_stop_with_one_line_and_keep_the_last_finite_state(priors, inputs, tmp_path):
    out = tmp_path / "out"
    line = one_error_line(shapekiln("refine", inputs / "ball.npy", "--text", "a ball", "--prior", priors / "nan", "--steps", 3,
                                    "--out", out, "--no-progress", check=False))
    assert "NaN" in line and "step 1" in line
    assert np.array_equal(np.load(out / "refined.npy"), sphere(0.4, 16))  # nothing was applied: the start is the best so far
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("case, match", [
    ("not-a-shape", "notes.txt"),
    ("missing-input", "not found"),
    ("missing-prior", "prior not found"),
    ("text-on-text-less", "without text"),
    ("sd-missing-parts", "unet"),
    ("no-prior", "--prior"),
    ("zero-steps", "--steps"),
    ("empty-negative", "--negative-text"),
])
def test_bad_refine_inputs_are_one_line_and_write_nothing(case, match, priors, inputs, tmp_path):
    out = tmp_path / "out"
    args = {
        "not-a-shape": [inputs / "notes.txt", "--prior", priors / "text"],
        "missing-input": [inputs / "nowhere.obj", "--prior", priors / "text"],
        "missing-prior": [inputs / "ball.npy", "--prior", tmp_path / "nowhere"],
        "text-on-text-less": [inputs / "ball.npy", "--prior", priors / "no-text"],
        "sd-missing-parts": [inputs / "ball.npy", "--prior", priors / "sd"],
        "no-prior": [inputs / "ball.npy"],
        "zero-steps": [inputs / "ball.npy", "--prior", priors / "text", "--steps", 0],
        "empty-negative": [inputs / "ball.npy", "--prior", priors / "text", "--negative-text", " "],
    }[case]
    line = one_error_line(shapekiln("refine", *args, "--text", "a ball", "--out", out, "--no-progress", check=False))
    assert match in line
    assert not out.exists() or not any(out.iterdir())
