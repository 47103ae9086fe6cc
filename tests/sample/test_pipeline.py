"""ShapePipeline: guidance, every modality, completion, save/load, exports, bad inputs."""

import numpy as np
import pytest
import torch
import trimesh

from shapekiln.data_prep.process import normalize
from shapekiln.data_prep.sources.synthetic import SyntheticSource
from shapekiln.data_prep.tsdf import compute_tsdf
from shapekiln.errors import ShapekilnError
from shapekiln.models.conditioning import MODALITIES, Conditions
from shapekiln.sample.export import write_samples
from shapekiln.sample.partial import known_region
from shapekiln.sample.pipeline import ShapePipeline

from .conftest import tiny_pipeline

R = 16


def shape_tsdf(index: int = 0) -> np.ndarray:
    mesh, _ = normalize(SyntheticSource(10).load(index).mesh, 0.8)
    return compute_tsdf(mesh.vertices, mesh.faces, R, 0.2)


def image() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(48, 48, 4), dtype=np.uint8)


def test_guidance_equals_the_direct_formula_and_batching_changes_nothing(pipeline):
    known = known_region("z<0", R)
    conditions = pipeline._conditions("a tall round table", image(), shape_tsdf(), known, 2)
    latent = torch.randn(2, *pipeline.vqvae.latent_shape, generator=torch.Generator().manual_seed(0))
    weights = {"text": 2.0, "image": 1.5, "partial": 0.5}
    t = torch.tensor(500)
    batched = pipeline.guided_prediction(latent, t, conditions, weights, batched=True)
    looped = pipeline.guided_prediction(latent, t, conditions, weights, batched=False)
    assert torch.allclose(batched, looped, rtol=1e-4, atol=1e-4)  # batch size changes the float32 kernels, not the result

    def alone(keep):
        drop = {name: torch.full((2,), name != keep) for name in MODALITIES}
        return pipeline.model(latent, torch.full((2,), 500), Conditions(conditions.text, conditions.image, conditions.partial, drop))

    empty = alone(None)
    expected = empty + sum(weight * (alone(name) - empty) for name, weight in weights.items())
    assert torch.allclose(batched, expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(alone("text"), empty)  # the condition matters, so the check can fail


def test_each_modality_alone_and_all_together_give_shapes(pipeline):
    tsdf, known = shape_tsdf(), known_region("x<0", R)
    runs = {
        "none": pipeline(num_samples=1, steps=2, progress=False),
        "text": pipeline(text="a short stool", num_samples=2, steps=2, progress=False),
        "image": pipeline(image=image(), num_samples=1, steps=2, progress=False),
        "partial": pipeline(partial=tsdf, known_mask=known, num_samples=1, steps=2, progress=False),
        "all": pipeline(text="a table", image=image(), partial=tsdf, known_mask=known, guidance={"text": 2.0, "image": 1.0, "partial": 1.0},
                        num_samples=2, steps=2, scheduler="dpm++", progress=False),
    }
    for name, output in runs.items():
        assert output.latents.shape[1:] == pipeline.vqvae.latent_shape, name
        for shape in output.shapes:
            assert shape.tsdf.shape == (R, R, R) and shape.tsdf.dtype == np.float32
            assert np.abs(shape.tsdf).max() <= 0.2 + 1e-6
            assert isinstance(shape.mesh, trimesh.Trimesh)
    assert not torch.allclose(runs["none"].latents[0], runs["text"].latents[0])


def test_samplers_do_not_clip_unit_variance_latents(pipeline):
    """diffusers clips predicted clean samples to [-1, 1] by default, which collapses normalized latents."""
    for name in ("ddim", "ddpm"):
        assert pipeline.sampler(name).config.clip_sample is False
    assert pipeline.sampler("dpm++").config.thresholding is False


@pytest.mark.parametrize("name, steps", [("dpm++", 20), ("ddim", 50), ("ddim", 7)])
def test_ode_samplers_start_from_the_last_training_timestep(pipeline, name, steps):
    """The samplers start from pure noise, which belongs at the last training timestep; with the training schedule's
    "leading" spacing, 20 DPM-Solver++ steps would start at t = 940 and 50 DDIM steps at t = 980."""
    sampler = pipeline.sampler(name)
    sampler.set_timesteps(steps)
    timesteps = [int(t) for t in sampler.timesteps]
    assert timesteps[0] == pipeline.scheduler.config.num_train_timesteps - 1
    assert len(timesteps) == steps and timesteps == sorted(set(timesteps), reverse=True)


def test_same_seed_same_shapes_other_seed_other_shapes(pipeline):
    first = pipeline(text="a lamp", steps=3, seed=7, progress=False).latents
    assert torch.equal(first, pipeline(text="a lamp", steps=3, seed=7, progress=False).latents)
    assert not torch.equal(first, pipeline(text="a lamp", steps=3, seed=8, progress=False).latents)


def test_nothing_of_the_removed_region_reaches_a_completion(pipeline):
    """Two shapes equal on the kept half, different elsewhere, condition identically (SDFusion's leak, fixed)."""
    known = known_region("z<0", R)
    table = shape_tsdf(0)
    other = np.where(known, table, shape_tsdf(3))
    assert not np.array_equal(table, other)
    for mode in ("learned", "inpaint"):
        a = pipeline(partial=table, known_mask=known, steps=3, completion=mode, progress=False)
        b = pipeline(partial=other, known_mask=known, steps=3, completion=mode, progress=False)
        assert torch.equal(a.latents, b.latents), mode
        changed_known = pipeline(partial=shape_tsdf(3), known_mask=known, steps=3, completion=mode, progress=False)
        assert not torch.equal(a.latents, changed_known.latents), mode  # the kept part does reach it


def test_inpainting_keeps_the_known_latent_cells(pipeline):
    known = known_region("z<0", R)
    condition = pipeline._partial_condition(shape_tsdf(), known)
    cells = condition[0, -1].bool()
    assert cells.any() and not cells.all()
    output = pipeline(partial=shape_tsdf(), known_mask=known, steps=3, completion="inpaint", progress=False)
    final = pipeline.normalize(output.latents)[0]
    assert torch.allclose(final[:, cells], condition[0, :-1][:, cells], atol=1e-5)
    assert not torch.allclose(final[:, ~cells], torch.zeros_like(final[:, ~cells]))


def test_save_and_load_give_the_same_samples(pipeline, pipeline_dir):
    loaded = ShapePipeline.from_pretrained(pipeline_dir)
    assert loaded.modalities == pipeline.modalities
    for kwargs in ({"text": "a bed"}, {"image": image()}):
        expected = pipeline(steps=2, progress=False, **kwargs).latents
        assert torch.equal(loaded(steps=2, progress=False, **kwargs).latents, expected)


def test_exports_load_back_in_trimesh(tmp_path):
    meshes = [trimesh.creation.box((0.5, 0.5, 0.5)), trimesh.creation.icosphere(2, 0.4)]
    grids = [np.zeros((4, 4, 4), np.float32)] * 2
    written = write_samples(meshes, grids, tmp_path / "out", {"text": "two shapes"})
    names = {path.name for path in written}
    assert names == {f"sample_{i}.{ext}" for i in range(2) for ext in ("obj", "glb", "ply", "npy")} | {"preview.png"}
    for index, mesh in enumerate(meshes):
        for ext in ("obj", "glb", "ply"):
            loaded = trimesh.load(tmp_path / "out" / f"sample_{index}.{ext}", force="mesh")
            assert len(loaded.faces) == len(mesh.faces), ext
            assert np.allclose(loaded.bounds, mesh.bounds, atol=1e-5), ext
    assert not list((tmp_path / "out").glob(".export-*"))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"steps": -1}, "steps must be at least 1"),
        ({"num_samples": 0}, "number of samples"),
        ({"text": "  "}, "prompt is empty"),
        ({"guidance": {"text": 2.0}}, "no text condition"),
        ({"guidance": {"color": 2.0}}, "unknown guidance modality"),
        ({"image": np.zeros((8, 8), np.uint8)}, "an image must be"),
        ({"partial": np.zeros((R, R, R)), "known_mask": np.zeros((R, R, R), bool)}, "keeps nothing"),
        ({"partial": np.zeros((R, R, R)), "known_mask": np.ones((R, R, R), bool)}, "keeps everything"),
        ({"partial": np.full((R, R, R), 0.2), "known_mask": known_region("z<0", R)}, "holds no part of the shape"),
        ({"partial": np.zeros((8, 8, 8)), "known_mask": np.ones((8, 8, 8), bool)}, "must be 16³ grids"),
        ({"completion": "inpaint"}, "needs a partial shape"),
    ],
)
def test_bad_arguments_are_shapekiln_errors(pipeline, kwargs, message):
    with pytest.raises(ShapekilnError, match=message):
        pipeline(progress=False, steps=kwargs.pop("steps", 2), **kwargs)


def test_a_modality_the_model_was_not_trained_with_is_refused():
    text_only = tiny_pipeline(("text",))
    with pytest.raises(ShapekilnError, match="not trained with image"):
        text_only(image=image(), steps=1, progress=False)
    with pytest.raises(ShapekilnError, match="not trained with partial"):
        text_only(text="a mug", guidance={"partial": 1.0}, steps=1, progress=False)
    no_text = tiny_pipeline(("image", "partial"))
    with pytest.raises(ShapekilnError, match="not trained with text"):
        no_text(text="a mug", steps=1, progress=False)
