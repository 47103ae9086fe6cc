"""The attribute classifier on a tiny synthetic dataset built in the test: trains, saves and loads, reads
every geometric attribute of the predicted category, scores predictions as worked out by hand."""

import json

import pytest
import torch

from shapekiln.config import load_config
from shapekiln.data_prep.process import PrepConfig
from shapekiln.data_prep.reader import ShapeShards, list_shards
from shapekiln.data_prep.shards import run_prep
from shapekiln.data_prep.sources.synthetic import ATTRIBUTES, CATEGORIES, SyntheticSource
from shapekiln.errors import ShapekilnError
from shapekiln.models.attributes import (
    GEOMETRIC_ATTRIBUTES,
    AttributeClassifier,
    attribute_scores,
    classifier_accuracy,
    classify,
    load_attribute_classifier,
    train_attribute_classifier,
)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """60 shapes at 16³ (the tiny data config), without views: the classifier reads TSDFs only."""
    out = tmp_path_factory.mktemp("synthetic")
    config = load_config(PrepConfig, "tiny", "data", {"views": 0})
    run_prep(SyntheticSource(60), config, out, workers=1, progress=False, source_args={"count": 60, "seed": 0})
    return out


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("classifier") / "model"
    return train_attribute_classifier(data, out, resolution=16, steps=3, batch_size=8, seed=0, progress=False, base_channels=4)


def tsdfs(data, split):
    return torch.stack([sample["tsdf"] for sample in ShapeShards(list_shards(data, split))])  # (N, 1, R, R, R)


def test_reader_exposes_each_shape_s_attributes(data):
    sample = next(iter(ShapeShards(list_shards(data, "train"))))
    assert set(sample["attributes"]) == set(ATTRIBUTES[sample["category"]])


def test_geometric_attributes_are_all_but_color():
    assert list(GEOMETRIC_ATTRIBUTES) == CATEGORIES
    for category, names in ATTRIBUTES.items():
        assert GEOMETRIC_ATTRIBUTES[category] == {name: values for name, values in names.items() if name != "color"}


def test_saved_classifier_loads_with_identical_predictions(trained, data):
    assert (trained / "config.json").is_file() and list(trained.glob("*.safetensors"))
    model, loaded = load_attribute_classifier(trained), load_attribute_classifier(trained)
    fresh = AttributeClassifier(resolution=16, base_channels=4)
    assert loaded.heads == fresh.heads  # the order of the logits survives diffusers' sorted config keys
    grids = tsdfs(data, "train")[:8]
    noise = 0.2 * torch.rand(4, 1, 16, 16, 16) * 2 - 0.2  # other inputs than the ground truth, too
    for batch in (grids, noise):
        assert torch.equal(model(batch), loaded(batch))
        assert classify(model, batch) == classify(loaded, batch)
    summary = json.loads((trained / "accuracy.json").read_text())
    assert summary["steps"] == 3 and summary["val"]["split"] == "val"


def test_classify_names_every_geometric_attribute_of_the_predicted_category(trained, data):
    model = load_attribute_classifier(trained)
    grids = torch.cat([tsdfs(data, "train")[:6], 0.4 * torch.rand(6, 1, 16, 16, 16) - 0.2])
    predictions = classify(model, grids[:, 0].numpy())  # (B, R, R, R) numpy works as (B, 1, R, R, R)
    assert len(predictions) == 12
    for prediction in predictions:
        category = prediction.pop("category")
        assert category in CATEGORIES
        assert prediction.keys() == GEOMETRIC_ATTRIBUTES[category].keys()
        assert all(value in GEOMETRIC_ATTRIBUTES[category][name] for name, value in prediction.items())
    with pytest.raises(ShapekilnError, match="16³"):
        classify(model, torch.zeros(2, 1, 8, 8, 8))


def test_classifier_accuracy_reports_fractions(trained, data):
    accuracy = classifier_accuracy(load_attribute_classifier(trained), data, "test")
    assert accuracy["split"] == "test" and accuracy["shapes"] == len(tsdfs(data, "test")) > 0
    for key in ("category_accuracy", "attribute_accuracy", "all_correct_accuracy"):
        assert 0.0 <= accuracy[key] <= 1.0
    assert accuracy["all_correct_accuracy"] <= min(accuracy["category_accuracy"], accuracy["attribute_accuracy"])
    assert all(0.0 <= value <= 1.0 for value in accuracy["per_attribute"].values())
    assert all(key.split(".")[0] in CATEGORIES for key in accuracy["per_attribute"])


def test_classifier_accuracy_scores_the_transformed_shapes(trained, data):
    """With a transform (the evaluation passes a VQ-VAE round trip) the classifier reads the transformed grids."""
    model = load_attribute_classifier(trained)
    flipped = classifier_accuracy(model, data, "test", transform=lambda tsdf: tsdf.flip(-1))
    targets = [{"category": s["category"], **s["attributes"]} for s in ShapeShards(list_shards(data, "test"))]
    by_hand = attribute_scores(classify(model, tsdfs(data, "test").flip(-1)), targets, model.attributes)
    assert flipped["attribute_accuracy"] == by_hand["attribute_accuracy"]
    assert flipped["per_attribute"] == by_hand["per_attribute"]
    empty = classifier_accuracy(model, data, "test", transform=lambda tsdf: torch.full_like(tsdf, 0.2))
    nothing = classify(model, torch.full((1, 1, 16, 16, 16), 0.2))[0]  # every shape becomes the same empty grid
    assert empty["category_accuracy"] == pytest.approx(sum(t["category"] == nothing["category"] for t in targets) / len(targets))


def test_attribute_scores_by_hand():
    targets = [
        {"category": "mug", "height": "tall", "handle": "yes", "color": "red"},  # color is not scored
        {"category": "mug", "height": "short", "handle": "no"},
        {"category": "sofa", "seats": "two", "arms": "yes"},
    ]
    predictions = [
        {"category": "mug", "height": "tall", "handle": "yes"},  # all right
        {"category": "mug", "height": "short", "handle": "yes"},  # one of two attributes right
        {"category": "bed", "size": "single", "headboard": "yes", "footboard": "no"},  # wrong category: its attributes count wrong
    ]
    scores = attribute_scores(predictions, targets)
    assert scores["category_accuracy"] == pytest.approx(2 / 3)
    assert scores["attribute_accuracy"] == pytest.approx(3 / 6)
    assert scores["all_correct_accuracy"] == pytest.approx(1 / 3)
    assert scores["per_attribute"] == {"mug.handle": 0.5, "mug.height": 1.0, "sofa.arms": 0.0, "sofa.seats": 0.0}


def test_training_needs_synthetic_data(tmp_path):
    (tmp_path / "dataset.json").write_text(json.dumps({"source": "folder", "config": {"resolution": 16, "tau": 0.2}}))
    with pytest.raises(ShapekilnError, match="synthetic"):
        train_attribute_classifier(tmp_path, tmp_path / "out", steps=1, progress=False)
    with pytest.raises(ShapekilnError, match="dataset"):
        train_attribute_classifier(tmp_path / "nothing", tmp_path / "out", steps=1, progress=False)


@pytest.mark.slow
def test_a_trained_classifier_beats_chance_on_its_training_shapes(data, tmp_path):
    """Chance is 1/10 for the category and at most 1/2 for each attribute; 300 steps fit 48 shapes well above it."""
    out = train_attribute_classifier(data, tmp_path / "model", steps=300, batch_size=16, progress=False, base_channels=8)
    accuracy = classifier_accuracy(load_attribute_classifier(out), data, "train")
    assert accuracy["category_accuracy"] > 0.8 and accuracy["attribute_accuracy"] > 0.7
