"""Attribute classifier: a small 3D CNN that reads a synthetic shape's category and geometric attributes
from its TSDF, to score text-conditioned generations ("a tall round table with four legs" → is it?).

    convs:  strided Conv3d → R/2; 2 × [strided Conv3d (halves the grid), Conv3d]; GroupNorm + SiLU
            after each. The TSDF is smooth, so a stride-2 first layer still sees parts a voxel wide,
            at an eighth of the cost of a full-resolution one (this runs on CPUs).
    head:   flatten (R/8)³ × 4c → Linear → SiLU → Dropout → one Linear holding every head's logits:
            the category (one logit per category), then one head per (category, attribute)

The grid is flattened rather than pooled because where a part is tells what it is (a headboard
sits at the pillows' end, a back panel behind the shelves). Attributes are read with the heads of
the predicted category; "color" is not geometric and has no head. It is trained on the ground-truth
shapes of the synthetic set (`train_attribute_classifier`) and its own accuracy on held-out ground
truth (`classifier_accuracy`) is reported beside any accuracy it gives generated shapes.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn
from tqdm import tqdm

from shapekiln.data_prep.reader import ShapeShards, list_shards, make_loader
from shapekiln.data_prep.sources.synthetic import ATTRIBUTES
from shapekiln.errors import ShapekilnError
from shapekiln.models.io import load_pretrained
from shapekiln.models.vqvae import group_norm

NOT_GEOMETRIC = ("color",)  # said in captions, invisible in a TSDF
GEOMETRIC_ATTRIBUTES: dict[str, dict[str, list[str]]] = {
    category: {name: values for name, values in attributes.items() if name not in NOT_GEOMETRIC}
    for category, attributes in ATTRIBUTES.items()
}


def conv_block(in_channels: int, out_channels: int, stride: int, groups: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv3d(in_channels, out_channels, 3, stride=stride, padding=1), group_norm(out_channels, groups), nn.SiLU())


class AttributeClassifier(ModelMixin, ConfigMixin):
    """TSDF (B, 1, R, R, R) → logits of the category and of every (category, attribute) head."""

    @register_to_config
    def __init__(
        self,
        resolution: int = 32,
        tau: float = 0.2,
        base_channels: int = 16,
        hidden: int = 256,
        dropout: float = 0.2,
        norm_groups: int = 8,
        categories: list[str] | None = None,
        heads: list[list] | None = None,  # [category, attribute, [values]] per head
    ):
        super().__init__()
        if resolution <= 0 or resolution % 8:
            raise ValueError(f"resolution must be a positive multiple of 8, got {resolution}")
        if categories is None or heads is None:
            # Lists, not a dict: diffusers sorts dict keys when it saves a config, and the logits' order must survive.
            categories = list(GEOMETRIC_ATTRIBUTES)
            heads = [[category, name, values] for category, names in GEOMETRIC_ATTRIBUTES.items() for name, values in names.items()]
            self.register_to_config(categories=categories, heads=heads)
        self.categories = list(categories)
        self.attributes: dict[str, dict[str, list[str]]] = {category: {} for category in self.categories}
        # (category, attribute, values, first logit) of every head, in the order of the logits.
        self.heads: list[tuple[str, str, list[str], int]] = []
        offset = len(self.categories)
        for category, name, values in heads:
            if category not in self.attributes:
                raise ValueError(f"a head for {category!r}, which is not among the categories")
            self.attributes[category][name] = list(values)
            self.heads.append((category, name, list(values), offset))
            offset += len(values)
        c = base_channels
        self.features = nn.Sequential(
            conv_block(1, c, 2, norm_groups),  # (B, c, R/2, R/2, R/2)
            conv_block(c, 2 * c, 2, norm_groups), conv_block(2 * c, 2 * c, 1, norm_groups),  # (B, 2c, R/4, ...)
            conv_block(2 * c, 4 * c, 2, norm_groups), conv_block(4 * c, 4 * c, 1, norm_groups),  # (B, 4c, R/8, ...)
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(4 * c * (resolution // 8) ** 3, hidden), nn.SiLU(), nn.Dropout(dropout),
            nn.Linear(hidden, offset),
        )

    def forward(self, tsdf: torch.Tensor) -> torch.Tensor:
        """(B, 1, R, R, R) TSDF → (B, categories + Σ attribute values) logits."""
        return self.classifier(self.features(tsdf / self.config.tau))

    def head_logits(self, logits: torch.Tensor) -> dict[tuple[str, str], torch.Tensor]:
        """The logits of each (category, attribute) head: (B, number of values)."""
        return {(category, name): logits[:, start:start + len(values)] for category, name, values, start in self.heads}


def load_attribute_classifier(path: str | Path, device: torch.device | str = "cpu") -> AttributeClassifier:
    return load_pretrained(AttributeClassifier, path).eval().to(device)


# ---------------------------------------------------------------- predictions and scores


def _as_batch(tsdf_batch: Any, resolution: int) -> torch.Tensor:
    tsdf = torch.as_tensor(np.asarray(tsdf_batch, dtype=np.float32) if not isinstance(tsdf_batch, torch.Tensor) else tsdf_batch).float()
    if tsdf.dim() == 4:
        tsdf = tsdf[:, None]  # (B, R, R, R) → (B, 1, R, R, R)
    if tsdf.dim() != 5 or tsdf.shape[1:] != (1, resolution, resolution, resolution):
        raise ShapekilnError(f"the attribute classifier reads {resolution}³ TSDF grids, got a batch of shape {tuple(tsdf.shape)}")
    return tsdf


@torch.no_grad()
def classify(model: AttributeClassifier, tsdf_batch: Any, batch_size: int = 32) -> list[dict[str, str]]:
    """Per shape {"category": ..., attribute: value, ...}: the predicted category and, read with that
    category's heads, each of its geometric attributes. `tsdf_batch`: (B, 1, R, R, R) or (B, R, R, R)."""
    tsdf = _as_batch(tsdf_batch, model.config.resolution)
    model.eval()
    predictions: list[dict[str, str]] = []
    for start in range(0, len(tsdf), batch_size):
        logits = model(tsdf[start:start + batch_size].to(model.device)).cpu()
        heads = model.head_logits(logits)
        for row, category_index in enumerate(logits[:, :len(model.categories)].argmax(dim=1).tolist()):
            category = model.categories[category_index]
            prediction = {"category": category}
            for name, values in model.attributes[category].items():
                prediction[name] = values[int(heads[(category, name)][row].argmax())]
            predictions.append(prediction)
    return predictions


def attribute_scores(predictions: Sequence[dict[str, str]], targets: Sequence[dict[str, str]],
                     attributes: dict[str, dict[str, list[str]]] | None = None) -> dict[str, Any]:
    """Accuracy of predictions against targets ({"category": ..., attribute: value}; extra keys such as
    color are ignored): of the category; of the (shape, attribute) pairs over the target category's
    geometric attributes (an attribute counts wrong when the category is wrong, since it was read as
    another category's); of whole shapes (category and every attribute right); and per attribute."""
    attributes = GEOMETRIC_ATTRIBUTES if attributes is None else attributes
    if len(predictions) != len(targets) or not targets:
        raise ValueError(f"{len(predictions)} predictions for {len(targets)} targets")
    category_right, pairs_right, pairs, all_right = 0, 0, 0, 0
    per_attribute: dict[str, list[int]] = {}
    for predicted, target in zip(predictions, targets):
        same_category = predicted["category"] == target["category"]
        right = [same_category and predicted.get(name) == target[name] for name in attributes[target["category"]]]
        for name, ok in zip(attributes[target["category"]], right):
            per_attribute.setdefault(f"{target['category']}.{name}", []).append(int(ok))
        category_right += same_category
        pairs_right += sum(right)
        pairs += len(right)
        all_right += same_category and all(right)
    return {
        "category_accuracy": category_right / len(targets),
        "attribute_accuracy": pairs_right / pairs if pairs else 1.0,
        "all_correct_accuracy": all_right / len(targets),
        "per_attribute": {key: float(np.mean(hits)) for key, hits in sorted(per_attribute.items())},
    }


def classifier_accuracy(model: AttributeClassifier, data: str | Path, split: str = "test", batch_size: int = 32,
                        limit: int | None = None,
                        transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, Any]:
    """The classifier's own accuracy on the ground-truth shapes of a prepared split (see attribute_scores),
    or on `transform` of them ((B, 1, R, R, R) TSDF → the same shape; e.g. an autoencoder's round trip)."""
    dataset = ShapeShards(list_shards(data, split), resolution=model.config.resolution)
    predictions, targets = [], []
    for batch in make_loader(dataset, batch_size=batch_size):
        tsdf = batch["tsdf"] if transform is None else transform(batch["tsdf"])
        predictions += classify(model, tsdf, batch_size)
        targets += [{"category": category, **attributes} for category, attributes in zip(batch["category"], batch["attributes"])]
        if limit is not None and len(targets) >= limit:
            predictions, targets = predictions[:limit], targets[:limit]
            break
    _check_targets(targets, model.attributes, f"{data} (split {split})")
    return {"shapes": len(targets), "split": split, **attribute_scores(predictions, targets, model.attributes)}


def _check_targets(targets: list[dict], attributes: dict[str, dict[str, list[str]]], where: str) -> None:
    for target in targets:
        names = attributes.get(target["category"])
        if names is None or any(target.get(name) not in values for name, values in names.items()):
            raise ShapekilnError(f"{where} holds a {target['category']!r} shape with attributes {_without_color(target)} "
                                 "that the attribute classifier does not know: it reads the synthetic set's categories and attributes")


def _without_color(target: dict) -> dict:
    return {key: value for key, value in target.items() if key not in NOT_GEOMETRIC and key != "category"}


# ---------------------------------------------------------------- training


def _dataset_description(data: Path) -> dict[str, Any]:
    try:
        return json.loads((data / "dataset.json").read_text())
    except (OSError, ValueError):
        raise ShapekilnError(f"{data} is not a prepared dataset (no readable dataset.json)") from None


def _augment(tsdf: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Mirror left-right and shift by up to a voxel per axis: both keep every attribute's meaning
    (shapes are upright and face +Z, so no rotation, and no front-back mirror: it would put a bed's
    headboard at its foot)."""
    flip = torch.rand(len(tsdf), generator=generator) < 0.5
    tsdf = torch.where(flip.view(-1, 1, 1, 1, 1), tsdf.flip(2), tsdf)  # (B, 1, X, Y, Z): X is left-right
    shifts = torch.randint(-1, 2, (3,), generator=generator).tolist()
    return torch.roll(tsdf, shifts=shifts, dims=(2, 3, 4))  # the margin around a normalized shape is empty


def _loss(model: AttributeClassifier, logits: torch.Tensor, categories: list[str], attributes: list[dict]) -> torch.Tensor:
    """Category cross-entropy plus the mean cross-entropy of each sample's own category's attribute heads."""
    category_index = torch.tensor([model.categories.index(category) for category in categories])
    loss = F.cross_entropy(logits[:, :len(model.categories)], category_index)
    attribute_loss, pairs = logits.new_zeros(()), 0
    for category, name, values, start in model.heads:
        rows = [row for row, sample_category in enumerate(categories) if sample_category == category]
        if rows:
            target = torch.tensor([values.index(attributes[row][name]) for row in rows])
            attribute_loss = attribute_loss + F.cross_entropy(logits[rows, start:start + len(values)], target, reduction="sum")
            pairs += len(rows)
    return loss + attribute_loss / max(pairs, 1)


def train_attribute_classifier(data: str | Path, out: str | Path, resolution: int | None = None, steps: int = 600,
                               batch_size: int = 32, seed: int = 0, progress: bool = True, lr: float = 2e-3,
                               base_channels: int = 16) -> Path:
    """Train on the train split of a prepared synthetic dataset (TSDF or latent shards), save to `out`
    (config.json + safetensors) with its accuracy on the val split (if any) in `out/accuracy.json`."""
    data, out = Path(data), Path(out)
    description = _dataset_description(data)
    if description.get("source") != "synthetic":
        raise ShapekilnError(f"{data} was prepared from the {description.get('source')!r} source; the attribute classifier "
                             "learns the synthetic set's attributes (prepare one with `shapekiln prep synthetic`)")
    prepared = description.get("config", {})
    grid, tau = int(prepared.get("resolution", 0)), float(prepared.get("tau", 0.2))
    if resolution is not None and resolution != grid:
        raise ShapekilnError(f"{data} holds {grid}³ grids, not {resolution}³")
    if steps < 1 or batch_size < 1:
        raise ShapekilnError(f"steps and batch size must be at least 1, got {steps} and {batch_size}")
    torch.manual_seed(seed)
    try:
        model = AttributeClassifier(resolution=grid, tau=tau, base_channels=base_channels)
    except ValueError as error:
        raise ShapekilnError(f"attribute classifier: {error}") from None
    dataset = ShapeShards(list_shards(data, "train"), shuffle_buffer=256, seed=seed, repeat=True, resolution=grid)
    batches = iter(make_loader(dataset, batch_size=batch_size))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    warmup = min(50, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: (step + 1) / (warmup + 1) if step < warmup else 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(steps - warmup, 1))))
    generator = torch.Generator().manual_seed(seed)
    model.train()
    bar = tqdm(range(steps), desc="attribute classifier", unit="step", disable=not progress)
    for _ in bar:
        batch = next(batches)
        _check_targets([{"category": c, **a} for c, a in zip(batch["category"], batch["attributes"])], model.attributes, str(data))
        loss = _loss(model, model(_augment(batch["tsdf"], generator)), batch["category"], batch["attributes"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    bar.close()
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    summary: dict[str, Any] = {"data": str(data), "steps": steps, "batch_size": batch_size, "seed": seed, "lr": lr}
    if list(data.glob("val-*.tar")):
        summary["val"] = classifier_accuracy(model, data, "val")
    (out / "accuracy.json").write_text(json.dumps(summary, indent=2) + "\n")
    return out
