"""`evaluate_ldm` end to end on a tiny untrained pipeline and a tiny synthetic dataset built here: every
part runs, every figure is finite and in its range; parts the pipeline cannot run are skipped with a note."""

import math

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from shapekiln.config import load_config
from shapekiln.data_prep.process import PrepConfig
from shapekiln.data_prep.reader import ShapeShards, list_shards
from shapekiln.data_prep.shards import run_prep
from shapekiln.data_prep.sources.synthetic import CATEGORIES, PALETTE, SyntheticSource, captions_for
from shapekiln.evaluate import _text_diversity, evaluate_ldm, format_metrics, kept_points, text_attribute_prompts
from shapekiln.metrics import occupancy_iou, surface_points, total_mutual_difference
from shapekiln.models.attributes import GEOMETRIC_ATTRIBUTES, train_attribute_classifier
from shapekiln.models.vqvae import VQVAE
from shapekiln.sample.pipeline import PipelineConfig, ShapePipeline
from shapekiln.train.ldm import LDMConfig, build_models


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """16 shapes at 16³ with two 64² views each; half held out as the test split."""
    out = tmp_path_factory.mktemp("synthetic")
    config = load_config(PrepConfig, "tiny", "data", {"test_fraction": 0.5, "val_fraction": 0.0})
    run_prep(SyntheticSource(16), config, out, workers=1, progress=False, source_args={"count": 16, "seed": 0})
    return out


def make_pipeline(path, modalities=("text", "image", "partial")):
    """An untrained pipeline as train/ldm.py assembles one (tiny config), its zero-initialized layers
    filled with small noise so that the conditions reach the output."""
    torch.manual_seed(0)
    config = load_config(LDMConfig, "tiny", "ldm")
    config.conditioning.modalities = tuple(modalities)
    config.conditioning.latent_heads = tuple(name for name in config.conditioning.latent_heads if name in modalities)
    vqvae = VQVAE(resolution=16, base_channels=8, channel_mult=(1, 2, 4), codebook_size=32, norm_groups=4)
    unet, conditioning = build_models(config, vqvae)
    with torch.no_grad():
        for parameter in unet.parameters():
            if not parameter.any():
                parameter.normal_(0.0, 0.02)
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    channels = vqvae.config.latent_channels
    pipeline_config = PipelineConfig(latent_mean=[0.0] * channels, latent_std=[1.0] * channels, resolution=16, tau=0.2, steps=2)
    return ShapePipeline(unet, conditioning, vqvae, scheduler, pipeline_config).save_pretrained(path)


@pytest.fixture(scope="module")
def classifier(data, tmp_path_factory):
    return train_attribute_classifier(data, tmp_path_factory.mktemp("classifier") / "model", steps=2, batch_size=4,
                                      progress=False, base_channels=4)


def test_evaluate_ldm_scores_every_part(data, classifier, tmp_path):
    pipeline = make_pipeline(tmp_path / "pipeline")
    metrics = evaluate_ldm(pipeline, data, classifier, split="test", count=4, prompts=2, samples_per_prompt=2,
                           completion_count=1, completions=2, image_count=1, points=256, steps=2, seed=0, progress=False)
    assert metrics["generation"] == "text" and metrics["generation_shapes"] == 4
    assert metrics["mmd_cd"] >= 0 and 0 < metrics["cov_cd"] <= 1 and 0 <= metrics["1nna_cd"] <= 1
    assert metrics["text_samples"] == 4
    assert metrics["text_tmd"] >= 0.0 and 0 <= metrics["text_data_tmd_prompts"] <= 2
    for key in ("text_category_accuracy", "text_attribute_accuracy", "text_all_correct_accuracy",
                "classifier_category_accuracy", "classifier_attribute_accuracy", "classifier_all_correct_accuracy"):
        assert 0.0 <= metrics[key] <= 1.0, key
    assert metrics["classifier_shapes"] >= 3
    # The shapes are centered, so keeping x < 0 keeps whole latent cells holding part of the shape.
    assert metrics["completion_shapes"] == 1 and metrics["completion_skipped"] == 0
    for mode in ("learned", "inpaint"):
        assert 0.0 <= metrics[f"completion_{mode}_uhd"] <= math.sqrt(3)
        assert metrics[f"completion_{mode}_tmd"] >= 0.0
    assert 0.0 <= metrics["image_iou"] <= 1.0 and 0.0 <= metrics["image_chamfer_l1"] <= math.sqrt(3)
    # The VQ-VAE's ceiling: the same test shapes encoded and decoded, without any sampling.
    for key in ("round_trip_category_accuracy", "round_trip_attribute_accuracy", "round_trip_all_correct_accuracy"):
        assert 0.0 <= metrics[key] <= 1.0, key
    loaded = ShapePipeline.from_pretrained(pipeline)
    truth = next(iter(ShapeShards(list_shards(data, "test"))))["tsdf"][None]  # (1, 1, R, R, R), the image shape
    with torch.no_grad():
        decoded = loaded.vqvae.decode(loaded.vqvae.encode(truth)).clamp(-0.2, 0.2)
    assert metrics["round_trip_iou"] == pytest.approx(occupancy_iou(decoded[0, 0].numpy(), truth[0, 0].numpy()))
    # Structure of the raw samples beside the references' (the 4th is a chair, with legs); this data is the
    # nominal generator at 16³, whose thinnest parts fall between voxel centers, so some are never present.
    for key in ("generation_one_piece", "reference_one_piece", "text_one_piece", "reference_thin_parts_present",
                "generation_floaters_mean"):
        assert 0.0 <= metrics[key] <= 1.0, key
    assert metrics["reference_thin_parts"] > 0 and metrics["reference_thin_parts_present"] < 1.0
    assert metrics["generation_pieces_mean"] >= 0
    # Each sample is checked for the thin parts of a reference with its caption's attributes: as many as some references have.
    assert 0 <= metrics["generation_thin_parts"] <= 4 * max(len(parts) for parts in _thin_parts_of_test_split(data))
    assert 0.0 <= metrics.get("generation_thin_parts_present", 0.0) <= 1.0
    assert metrics["sampled_shapes"] == 4 + 2 * 2 + 2 * 2 + 1
    assert metrics["seconds_per_shape"] > 0
    numbers = [value for value in metrics.values() if isinstance(value, (int, float))]
    assert all(math.isfinite(value) for value in numbers)
    assert "1nna_cd" in format_metrics(metrics)


def _thin_parts_of_test_split(data):
    from shapekiln.evaluate import DatasetParts

    parts = DatasetParts.for_data(data)
    return [parts.masks(sample["id"]) for sample in ShapeShards(list_shards(data, "test"))]


def test_parts_the_pipeline_cannot_run_are_skipped_with_a_note(data, tmp_path):
    pipeline = make_pipeline(tmp_path / "pipeline", modalities=("text",))
    metrics = evaluate_ldm(pipeline, data, None, count=2, prompts=2, completion_count=1, completions=2, image_count=2,
                           points=128, steps=1, generation="unconditional", progress=False)
    assert metrics["generation"] == "unconditional" and 0 <= metrics["1nna_cd"] <= 1
    assert not any(key.startswith(("text_", "classifier_", "image_", "completion_learned")) for key in metrics)
    assert "completion_inpaint_uhd" in metrics  # training-free inpainting needs no partial conditioning
    notes = " ".join(metrics["notes"])
    assert "no attribute classifier" in notes and "no image conditioning" in notes and "no partial-shape conditioning" in notes


def test_text_attribute_prompts_take_categories_in_turn():
    pairs = text_attribute_prompts(GEOMETRIC_ATTRIBUTES, 25, seed=0)
    assert [target["category"] for _, target in pairs[:10]] == CATEGORIES
    for prompt, target in pairs:
        category = target["category"]
        assert target.keys() - {"category"} == GEOMETRIC_ATTRIBUTES[category].keys()
        assert any(prompt == captions_for(category, {**target, "color": color})[0] for color in PALETTE)  # colors are not scored
    # A category's combinations are distinct until its grid is used up (mugs have 2 × 2).
    mugs = [tuple(target.items()) for _, target in text_attribute_prompts(GEOMETRIC_ATTRIBUTES, 40)[7::10]]
    assert len(set(mugs)) == 4
    assert text_attribute_prompts(GEOMETRIC_ATTRIBUTES, 5, seed=1) != text_attribute_prompts(GEOMETRIC_ATTRIBUTES, 5, seed=2)


def test_kept_points_are_the_surface_points_in_known_voxels():
    known = np.zeros((4, 4, 4), dtype=bool)
    known[:2] = True  # x < 0 in [-1, 1]³, x < 0.5 in the unit cube
    surface = np.array([[0.1, 0.5, 0.5], [0.49, 0.9, 0.1], [0.51, 0.5, 0.5], [1.0, 0.0, 0.0]])
    assert np.array_equal(kept_points(surface, known), surface[:2])


def test_text_diversity_of_the_data_takes_the_shapes_sharing_a_prompts_attributes(data):
    shapes = [sample for split in ("train", "test") for sample in ShapeShards(list_shards(data, split))]
    category = next(c for c in sorted({s["category"] for s in shapes}) if sum(s["category"] == c for s in shapes) >= 2)
    same = [s for s in shapes if s["category"] == category]
    name, value = next(iter(same[0]["attributes"].items()))
    target = {"category": category, name: value}
    # By category alone (no attribute names), then also by the value of one attribute.
    for attributes, wanted in (({category: {}}, same), ({category: {name: []}}, [s for s in same if s["attributes"][name] == value])):
        result = _text_diversity([0.1, 0.3], data, [target], attributes, 2, 128, 16)
        assert result["text_tmd"] == pytest.approx(0.2)
        if len(wanted) < 2:
            assert result["text_data_tmd_prompts"] == 0 and "text_data_tmd" not in result
            continue
        clouds = [surface_points(s["tsdf"][0].numpy(), 128, seed=j) for j, s in enumerate(wanted[:2])]
        assert result["text_data_tmd_prompts"] == 1
        assert result["text_data_tmd"] == pytest.approx(total_mutual_difference(clouds))
