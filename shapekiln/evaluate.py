"""Evaluations behind `shapekiln eval`: run a saved model over prepared shards, summarize shapekiln.metrics."""

from __future__ import annotations

import itertools
import json
import os
import time
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import torch
from tqdm import tqdm

from shapekiln.data_prep.reader import ShapeShards, check_dataset, list_shards, make_loader
from shapekiln.errors import ShapekilnError
from shapekiln.metrics import (
    chamfer_distance,
    codebook_usage,
    mmd_cov,
    occupancy_iou,
    one_nna,
    pairwise_chamfer,
    reconstruction_metrics,
    structure_summary,
    surface_points,
    total_mutual_difference,
    unidirectional_hausdorff,
)
from shapekiln.models.io import load_pretrained
from shapekiln.models.vqvae import VQVAE


# ---------------------------------------------------------------- structure: is each shape one piece, are its thin parts there?

# Thin parts count as present in reconstructions and samples when they lie within this many voxels of the
# shape's largest piece (`shapekiln.metrics.parts_present`); the data's own figure uses the same rule.
PART_TOLERANCE = 1


class DatasetParts:
    """The thin-part voxel masks (legs, poles, handles, arms) of a prepared synthetic dataset's shapes, rebuilt
    from the source recorded in its dataset.json: `masks(shape_id)`, a list of (R, R, R) bool. Built with
    `for_data`, which gives None where the part list is not known (real meshes)."""

    def __init__(self, source: Any, resolution: int, extent: float):
        self.source, self.resolution, self.extent = source, resolution, extent
        self._masks: dict[str, list[np.ndarray]] = {}

    @classmethod
    def for_data(cls, data: str | Path) -> "DatasetParts | None":
        from shapekiln.data_prep.sources.synthetic import SyntheticSource

        try:
            description = json.loads((Path(data) / "dataset.json").read_text())
        except (OSError, ValueError):
            return None
        if description.get("source") != "synthetic" or "count" not in description.get("source_args", {}):
            return None
        config = description.get("config", {})
        source = SyntheticSource.from_args(description["source_args"], extent=config.get("extent", 0.8))
        return cls(source, int(config["resolution"]), float(config.get("extent", 0.8)))

    def masks(self, shape_id: str) -> list[np.ndarray]:
        if shape_id not in self._masks:
            item = int(shape_id.rsplit("-", 1)[-1])
            self._masks[shape_id] = self.source.thin_part_masks(item, self.resolution, self.extent)
        return self._masks[shape_id]


def structure_figures(grids: list[np.ndarray], parts: list[list[np.ndarray]] | None, prefix: str) -> dict[str, float]:
    """`structure_summary` of a set, its keys prefixed (e.g. "reconstruction_one_piece")."""
    summary = structure_summary(grids, parts, tolerance=PART_TOLERANCE)
    return {f"{prefix}_{key}": value for key, value in summary.items()}


@torch.no_grad()
def evaluate_vqvae(ckpt: str | Path, data: str | Path, split: str = "test", batch_size: int = 8, points: int = 32768,
                   limit: int | None = None, threshold: float = 0.01, progress: bool = True) -> dict[str, Any]:
    """Reconstruct every shape of a split; mean IoU, Chamfer-L1/L2 and F-score (unit cube) and codebook use; the
    structure of the reconstructions beside the data's (`reconstruction_*` / `data_*`: one-piece fraction, mean
    pieces and floater share, and for synthetic data the fraction of thin parts present)."""
    model = load_pretrained(VQVAE, ckpt).eval()
    check_dataset(data, model.config.resolution, model.config.tau)
    dataset = ShapeShards(list_shards(data, split), resolution=model.config.resolution)
    dataset_parts = DatasetParts.for_data(data)
    rows: list[dict[str, float]] = []
    codes: list[np.ndarray] = []
    # Structure of the data and of its reconstructions, from per-shape figures (no grids kept).
    data_structure: list[dict[str, float]] = []
    reconstruction_structure: list[dict[str, float]] = []
    bar = tqdm(desc="eval vqvae", unit="shape", total=limit, disable=not progress)
    for batch in make_loader(dataset, batch_size=batch_size):
        output = model(batch["tsdf"])
        codes.append(output.indices.numpy())
        for shape_id, target, predicted in zip(batch["id"], batch["tsdf"][:, 0].numpy(), output.reconstruction[:, 0].numpy()):
            rows.append(reconstruction_metrics(predicted, target, points, seed=len(rows), threshold=threshold))
            parts = None if dataset_parts is None else [dataset_parts.masks(shape_id)]
            data_structure.append(structure_summary([target], parts, PART_TOLERANCE))
            reconstruction_structure.append(structure_summary([predicted], parts, PART_TOLERANCE))
            bar.update(1)
            if limit is not None and len(rows) >= limit:
                break
        if limit is not None and len(rows) >= limit:
            break
    bar.close()
    usage, perplexity = codebook_usage(np.concatenate(codes), model.config.codebook_size)
    summary = {key: float(np.mean([row[key] for row in rows])) for key in rows[0]}
    return {"shapes": len(rows), "split": split, **summary, "f_score_threshold": threshold,
            "codebook_usage": usage, "codebook_perplexity": perplexity, "codebook_size": model.config.codebook_size,
            **_merge_structure(reconstruction_structure, "reconstruction"), **_merge_structure(data_structure, "data")}


def _merge_structure(rows: list[dict[str, float]], prefix: str) -> dict[str, float]:
    """Per-shape `structure_summary` rows (one grid each) merged into the set's figures, keys prefixed."""
    merged = {f"{prefix}_{key}": float(np.mean([row[key] for row in rows])) for key in ("one_piece", "pieces_mean", "floaters_mean")}
    if "thin_parts" in rows[0]:
        total = sum(row["thin_parts"] for row in rows)
        present = sum(row.get("thin_parts_present", 0.0) * row["thin_parts"] for row in rows)
        merged[f"{prefix}_thin_parts"] = int(total)
        if total:
            merged[f"{prefix}_thin_parts_present"] = present / total
    return merged


# ---------------------------------------------------------------- latent diffusion (`shapekiln eval ldm`)


@torch.no_grad()
def evaluate_ldm(
    pipeline_dir: str | Path,
    data: str | Path,
    classifier_dir: str | Path | None = None,
    split: str = "test",
    count: int = 32,
    prompts: int = 20,
    samples_per_prompt: int = 2,
    completion_count: int = 8,
    completions: int = 4,
    image_count: int = 8,
    points: int = 2048,
    steps: int | None = None,
    scheduler: str | None = "ddim",
    guidance: float | None = None,
    generation: Literal["text", "unconditional"] = "text",
    keeps: Sequence[str] = ("x<0", "z<0"),
    seed: int = 0,
    device: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Sample a saved ShapePipeline and score it against the held-out `split` of prepared shards
    (TSDF or latent shards). Every part runs only when the pipeline and the data allow it; a count
    of 0 skips it. What each figure is:

    generation (`count` shapes of the split): one sample per reference shape, conditioned on that
        shape's first caption (`generation="text"`, the default when the pipeline knows text: the
        generated set then follows the split's mix of categories and attributes, so the set metrics
        measure shape quality rather than the drift of the prior between dataset mixes), else
        unconditional. MMD-CD, COV-CD and 1-NNA-CD (`shapekiln.metrics`), Chamfer-L1 in unit-cube
        units on `points` surface points per shape (2048 keeps the pairwise matrices fast; two
        samplings of one surface then differ by about 0.01, the floor of MMD). Structure of the raw
        samples beside the references' (`generation_*` / `reference_*`): the fraction that is one
        26-connected piece, mean pieces and floater share, and for synthetic data the fraction of
        thin parts present (those of the nearest reference with the asked category and attributes).
    text attributes (needs `classifier_dir` and synthetic data): `prompts` prompts made of attribute
        combinations (the first caption form of `captions_for`, every category in turn), with
        `samples_per_prompt` samples each, read by the attribute classifier: category, attribute
        and all-correct accuracy, and the classifier's own accuracy on the ground truth of `split`.
        With 2 or more samples per prompt, their diversity: TMD over each prompt's samples
        (`text_tmd`), beside the TMD of as many prepared shapes sharing the prompt's attributes
        (`text_data_tmd`): a model that makes one mean shape per prompt scores far below the data.
        `text_one_piece`: the fraction of these samples that is one piece.
    completion (`completion_count` shapes, `completions` each): the shape is kept on one side of a
        plane (`keeps`, by turns) and completed in each mode the pipeline can run ("learned" needs
        the partial modality; "inpaint" needs none). UHD from the kept part of the ground-truth
        surface to each completion (mean), and TMD over the completions (mean over shapes).
    image (`image_count` shapes; needs the image modality): one rendered view of the shape → one
        sample; IoU of the inside voxels and Chamfer-L1 against the ground truth.
    round trip: the classifier's accuracy and the IoU on the same ground-truth shapes after the
        pipeline's VQ-VAE encodes and decodes them: the ceiling the autoencoder sets on both.
    seconds_per_shape: sampling time per generated shape, over everything sampled.
    """
    from shapekiln.sample.pipeline import ShapePipeline

    if count and count < 2:
        raise ShapekilnError(f"generation metrics need at least 2 shapes, got count={count}")
    if completion_count and completions < 2:
        raise ShapekilnError(f"completion diversity (TMD) needs at least 2 completions per shape, got {completions}")
    if min(count, prompts, samples_per_prompt, completion_count, image_count, points) < 0 or points < 1:
        raise ShapekilnError("counts must not be negative and points must be at least 1")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipeline = ShapePipeline.from_pretrained(pipeline_dir, device=device)
    resolution, tau = pipeline.config.resolution, pipeline.config.tau
    check_dataset(data, resolution, tau)
    modalities = pipeline.modalities
    notes: list[str] = []
    image_count = image_count if "image" in modalities else 0
    if "image" not in modalities:
        notes.append("image: the pipeline has no image conditioning")
    references = _read_split(data, split, max(count, completion_count, image_count), views=image_count > 0, resolution=resolution)
    sampler = _TimedSampler(pipeline, steps, scheduler, guidance, progress)
    result: dict[str, Any] = {"split": split, "points": points, "steps": steps or pipeline.config.steps,
                              "scheduler": scheduler or pipeline.config.scheduler}

    if count:
        result.update(_generation_metrics(sampler, references[:count], generation, points, seed, notes, DatasetParts.for_data(data)))
    result.update(_text_attribute_metrics(sampler, data, split, classifier_dir, prompts, samples_per_prompt, points, seed, device, notes))
    if completion_count:
        result.update(_completion_metrics(sampler, references[:completion_count], completions, keeps, points, tau, seed, notes))
    if image_count:
        result.update(_image_metrics(sampler, references[:image_count], points, seed))
    sampler.close()
    result["sampled_shapes"] = sampler.shapes
    result["seconds_per_shape"] = sampler.seconds / max(sampler.shapes, 1)
    result["notes"] = notes
    return result


class _TimedSampler:
    """Calls the pipeline with the evaluation's sampling settings; counts shapes and sampling seconds."""

    def __init__(self, pipeline: Any, steps: int | None, scheduler: str | None, guidance: float | None, progress: bool):
        self.pipeline, self.steps, self.scheduler, self.guidance = pipeline, steps, scheduler, guidance
        self.shapes, self.seconds = 0, 0.0
        self.bar = tqdm(desc="eval ldm", unit="shape", disable=not progress)

    def __call__(self, num_samples: int, seed: int, **conditions: Any) -> list[Any]:
        given = [name for name in ("text", "image") if conditions.get(name) is not None]
        if conditions.get("partial") is not None and conditions.get("completion", "learned") == "learned":
            given.append("partial")
        guidance = None if self.guidance is None else {name: self.guidance for name in given}
        start = time.perf_counter()
        output = self.pipeline(num_samples=num_samples, steps=self.steps, scheduler=self.scheduler, seed=seed,
                               guidance=guidance, progress=False, **conditions)
        self.seconds += time.perf_counter() - start
        self.shapes += num_samples
        self.bar.update(num_samples)
        return output.shapes

    def close(self) -> None:
        self.bar.close()


def _read_split(data: str | Path, split: str, count: int, views: bool, resolution: int) -> list[dict[str, Any]]:
    """The first `count` shapes of a split: id, category, attributes, captions, tsdf (R, R, R) and views (K, H, W, 4)."""
    if count == 0:
        return []
    dataset = ShapeShards(list_shards(data, split), views=views, resolution=resolution)
    shapes = []
    for sample in itertools.islice(dataset, count):
        shape = {key: sample[key] for key in ("id", "category", "attributes", "captions")}
        shape["tsdf"] = sample["tsdf"][0].numpy()
        if views:
            shape["views"] = sample["views"].permute(0, 2, 3, 1).numpy()  # (K, H, W, 4) uint8
        shapes.append(shape)
    return shapes


def _generation_metrics(sampler: _TimedSampler, references: list[dict[str, Any]], generation: str, points: int,
                        seed: int, notes: list[str], dataset_parts: DatasetParts | None = None) -> dict[str, Any]:
    if generation not in ("text", "unconditional"):
        raise ShapekilnError(f"generation must be 'text' or 'unconditional', got {generation!r}")
    if len(references) < 2:
        notes.append(f"generation: skipped, the split holds {len(references)} shape(s)")
        return {}
    if generation == "text" and "text" not in sampler.pipeline.modalities:
        notes.append("generation: the pipeline has no text conditioning, so samples are unconditional")
        generation = "unconditional"
    start = sampler.seconds
    if generation == "text":
        generated = [sampler(1, seed + k, text=reference["captions"][0])[0] for k, reference in enumerate(references)]
    else:
        generated = []
        while len(generated) < len(references):
            generated += sampler(min(8, len(references) - len(generated)), seed + len(generated))
    generated_points = [surface_points(shape.mesh, points, seed=k) for k, shape in enumerate(generated)]
    reference_points = [surface_points(reference["tsdf"], points, seed=k) for k, reference in enumerate(references)]
    mmd, cov = mmd_cov(generated_points, reference_points)
    return {
        "generation": generation, "generation_shapes": len(references), "mmd_cd": mmd, "cov_cd": cov,
        "1nna_cd": one_nna(generated_points, reference_points),
        "generation_empty": sum(len(p) == 0 for p in generated_points),
        "generation_seconds_per_shape": (sampler.seconds - start) / len(references),
        **_generation_structure(generated, references, generated_points, reference_points, dataset_parts,
                                conditioned=generation == "text"),
    }


def _generation_structure(generated: list[Any], references: list[dict[str, Any]], generated_points: list[np.ndarray],
                          reference_points: list[np.ndarray], dataset_parts: DatasetParts | None,
                          conditioned: bool) -> dict[str, float]:
    """Structure of the raw samples beside that of the reference shapes. A sample's thin parts are those of
    its nearest reference (Chamfer) among the ones with the same category and attributes as the reference
    it was conditioned on (for unconditional samples: the nearest reference of all)."""
    reference_grids = [reference["tsdf"] for reference in references]
    if dataset_parts is None:
        return {**structure_figures([shape.tsdf for shape in generated], None, "generation"),
                **structure_figures(reference_grids, None, "reference")}
    reference_parts = [dataset_parts.masks(reference["id"]) for reference in references]
    distances = pairwise_chamfer(generated_points, reference_points)  # (G, R)
    sample_parts = []
    for k, row in enumerate(distances):
        same = range(len(references))
        if conditioned:  # sample k was asked for reference k's caption
            asked = (references[k]["category"], references[k]["attributes"])
            same = [j for j, reference in enumerate(references) if (reference["category"], reference["attributes"]) == asked]
        nearest = min(same, key=lambda j: row[j])
        sample_parts.append(reference_parts[nearest])
    return {**structure_figures([shape.tsdf for shape in generated], sample_parts, "generation"),
            **structure_figures(reference_grids, reference_parts, "reference")}


def text_attribute_prompts(attributes: dict[str, dict[str, list[str]]], count: int, seed: int = 0) -> list[tuple[str, dict[str, str]]]:
    """`count` (prompt, target) pairs: categories in turn, each walking a seeded permutation of its grid of
    geometric attribute values; colors in turn (named in the prompt, not scored). The prompt is the first
    caption form of the synthetic set, which names every attribute."""
    from shapekiln.data_prep.sources.synthetic import PALETTE, captions_for

    colors = list(PALETTE)
    orders = {}
    for index, (category, names) in enumerate(attributes.items()):
        grid = list(itertools.product(*names.values()))
        order = np.random.default_rng([seed, index]).permutation(len(grid))
        orders[category] = [dict(zip(names, grid[k])) for k in order]
    pairs = []
    for k in range(count):
        category = list(attributes)[k % len(attributes)]
        combos = orders[category]
        target = {"category": category, **combos[(k // len(attributes)) % len(combos)]}
        color = colors[k % len(colors)]
        pairs.append((captions_for(category, {**target, "color": color})[0], target))
    return pairs


def _text_attribute_metrics(sampler: _TimedSampler, data: str | Path, split: str, classifier_dir: str | Path | None,
                            prompts: int, samples_per_prompt: int, points: int, seed: int, device: str,
                            notes: list[str]) -> dict[str, Any]:
    if not prompts or not samples_per_prompt:
        return {}
    if classifier_dir is None:
        notes.append("text attributes: skipped, no attribute classifier given (train one with train_attribute_classifier)")
        return {}
    if "text" not in sampler.pipeline.modalities:
        notes.append("text attributes: skipped, the pipeline has no text conditioning")
        return {}
    try:
        source = json.loads((Path(data) / "dataset.json").read_text()).get("source")
    except (OSError, ValueError):
        source = None
    if source != "synthetic":
        notes.append(f"text attributes: skipped, the data is not the synthetic set (source {source!r})")
        return {}
    from shapekiln.models.attributes import attribute_scores, classifier_accuracy, classify, load_attribute_classifier

    classifier = load_attribute_classifier(classifier_dir, device)
    made = sampler.pipeline.config
    if classifier.config.resolution != made.resolution or abs(classifier.config.tau - made.tau) > 1e-9:
        raise ShapekilnError(f"the attribute classifier in {classifier_dir} reads {classifier.config.resolution}³ grids truncated at "
                             f"{classifier.config.tau}, but the pipeline makes {made.resolution}³ ones at {made.tau}; train one on this data")
    predictions, targets, diversity, grids = [], [], [], []
    pairs = text_attribute_prompts(classifier.attributes, prompts, seed)
    for k, (prompt, target) in enumerate(pairs):
        shapes = sampler(samples_per_prompt, seed + k, text=prompt)
        grids += [shape.tsdf for shape in shapes]
        predictions += classify(classifier, np.stack([shape.tsdf for shape in shapes]))
        targets += [target] * len(shapes)
        if samples_per_prompt >= 2:
            diversity.append(total_mutual_difference([surface_points(shape.mesh, points, seed=j) for j, shape in enumerate(shapes)]))
    generated = attribute_scores(predictions, targets, classifier.attributes)
    own = classifier_accuracy(classifier, data, split)
    # The same shapes through the pipeline's VQ-VAE: what the diffusion model could reach at best.
    round_trip = classifier_accuracy(classifier, data, split, transform=lambda tsdf: _round_trip(sampler.pipeline, tsdf))
    return {
        "text_prompts": prompts, "text_samples": len(targets),
        "text_category_accuracy": generated["category_accuracy"],
        "text_attribute_accuracy": generated["attribute_accuracy"],
        "text_all_correct_accuracy": generated["all_correct_accuracy"],
        "classifier_shapes": own["shapes"],
        "classifier_category_accuracy": own["category_accuracy"],
        "classifier_attribute_accuracy": own["attribute_accuracy"],
        "classifier_all_correct_accuracy": own["all_correct_accuracy"],
        "round_trip_category_accuracy": round_trip["category_accuracy"],
        "round_trip_attribute_accuracy": round_trip["attribute_accuracy"],
        "round_trip_all_correct_accuracy": round_trip["all_correct_accuracy"],
        **structure_figures(grids, None, "text"),
        "text_per_attribute": generated["per_attribute"],
        **(_text_diversity(diversity, data, [target for _, target in pairs], classifier.attributes, samples_per_prompt, points,
                           made.resolution) if diversity else {}),
    }


def _text_diversity(generated: list[float], data: str | Path, targets: list[dict[str, str]],
                    attributes: dict[str, dict[str, list[str]]], per_prompt: int, points: int, resolution: int) -> dict[str, Any]:
    """Diversity given a prompt: TMD over each prompt's samples (mean over prompts), beside the same figure
    for the data: the first `per_prompt` prepared shapes (every split) with a prompt's category and
    attribute values (mean over the prompts that have that many; absent where none has)."""

    def key(category: str, values: dict[str, str]) -> tuple:
        return (category, *(values.get(name) for name in attributes.get(category, {})))

    matches: dict[tuple, list[np.ndarray]] = {key(target["category"], target): [] for target in targets}
    for sample in ShapeShards(list_shards(data, "train+val+test"), resolution=resolution):
        found = matches.get(key(sample["category"], sample["attributes"]))
        if found is not None and len(found) < per_prompt:
            found.append(sample["tsdf"][0].numpy())
            if all(len(shapes) == per_prompt for shapes in matches.values()):
                break  # every prompt has its shapes: read no further
    data_tmd = [total_mutual_difference([surface_points(tsdf, points, seed=j) for j, tsdf in enumerate(shapes)])
                for shapes in matches.values() if len(shapes) == per_prompt]
    result = {"text_tmd": float(np.mean(generated)), "text_data_tmd_prompts": len(data_tmd)}
    return {**result, "text_data_tmd": float(np.mean(data_tmd))} if data_tmd else result


def kept_points(surface: np.ndarray, known_mask: np.ndarray) -> np.ndarray:
    """The surface points (unit cube) that lie in known voxels: the partial input's surface."""
    resolution = known_mask.shape[0]
    voxel = np.clip((surface * resolution).astype(int), 0, resolution - 1)  # unit cube → voxel index
    return surface[known_mask[voxel[:, 0], voxel[:, 1], voxel[:, 2]]]


def _completion_metrics(sampler: _TimedSampler, references: list[dict[str, Any]], completions: int, keeps: Sequence[str],
                        points: int, tau: float, seed: int, notes: list[str]) -> dict[str, Any]:
    from shapekiln.sample.partial import known_region

    modes = [mode for mode in ("learned", "inpaint") if mode != "learned" or "partial" in sampler.pipeline.modalities]
    if "learned" not in modes:
        notes.append("completion: the pipeline has no partial-shape conditioning; only training-free inpainting is scored")
    uhd: dict[str, list[float]] = {mode: [] for mode in modes}
    tmd: dict[str, list[float]] = {mode: [] for mode in modes}
    skipped = 0
    for k, reference in enumerate(references):
        tsdf = reference["tsdf"]
        known = known_region(keeps[k % len(keeps)], tsdf.shape[0])
        partial = np.where(known, tsdf, np.float32(tau))
        partial_points = kept_points(surface_points(tsdf, points, seed=k), known)
        try:
            outputs = {mode: sampler(completions, seed + k, partial=partial, known_mask=known, completion=mode) for mode in modes}
        except ShapekilnError as error:  # the kept part holds too little of this shape to complete
            notes.append(f"completion: skipped {reference['id']} ({error})")
            skipped += 1
            continue
        for mode, shapes in outputs.items():
            completion_points = [surface_points(shape.mesh, points, seed=j) for j, shape in enumerate(shapes)]
            uhd[mode].append(float(np.mean([unidirectional_hausdorff(partial_points, cloud) for cloud in completion_points])))
            tmd[mode].append(total_mutual_difference(completion_points))
    result: dict[str, Any] = {"completion_shapes": len(references) - skipped, "completion_skipped": skipped,
                              "completions_per_shape": completions}
    for mode in modes:
        if uhd[mode]:
            result[f"completion_{mode}_uhd"] = float(np.mean(uhd[mode]))
            result[f"completion_{mode}_tmd"] = float(np.mean(tmd[mode]))
    return result


def _image_metrics(sampler: _TimedSampler, references: list[dict[str, Any]], points: int, seed: int) -> dict[str, Any]:
    ious, chamfers = [], []
    for k, reference in enumerate(references):
        views = reference["views"]
        (shape,) = sampler(1, seed + k, image=views[k % len(views)])  # (H, W, 4) uint8
        ious.append(occupancy_iou(shape.tsdf, reference["tsdf"]))
        generated = surface_points(shape.mesh, points, seed=k)
        chamfers.append(chamfer_distance(generated, surface_points(reference["tsdf"], points, seed=k + 1))[0])
    truth = np.stack([reference["tsdf"] for reference in references])  # (N, R, R, R)
    reconstructed = _round_trip(sampler.pipeline, torch.from_numpy(truth)[:, None])[:, 0].numpy()
    return {"image_shapes": len(references), "image_iou": float(np.mean(ious)), "image_chamfer_l1": float(np.mean(chamfers)),
            "round_trip_iou": float(np.mean([occupancy_iou(r, t) for r, t in zip(reconstructed, truth)]))}


def _round_trip(pipeline: Any, tsdf: torch.Tensor) -> torch.Tensor:
    """TSDF grids (B, 1, R, R, R) encoded by the pipeline's VQ-VAE and decoded as the pipeline decodes
    its samples (ShapePipeline.decode): the autoencoder's ceiling on what diffusion can reach."""
    parameter = next(pipeline.vqvae.parameters())
    return pipeline.decode(pipeline.vqvae.encode(tsdf.to(parameter.device, parameter.dtype))).float().cpu()


def format_metrics(metrics: dict[str, Any], indent: int = 0) -> str:
    """One figure per line; nested dicts indented under their key, lists (notes) one item per line."""
    lines = []
    for key, value in metrics.items():
        label = " " * indent + f"{key:>{max(28 - indent, 1)}}"
        if isinstance(value, dict):
            lines += [label, format_metrics(value, indent + 4)]
        elif isinstance(value, list):
            lines += [label] + [" " * (indent + 4) + f"- {item}" for item in value]
        else:
            lines.append(f"{label}  {value:.5g}" if isinstance(value, float) else f"{label}  {value}")
    return "\n".join(lines)


def write_json(path: str | Path, value: Any) -> Path:
    """JSON to `path` through a temporary file, so a failed write leaves any earlier file whole."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary.write_text(json.dumps(value, indent=2) + "\n")
        os.replace(temporary, path)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        raise ShapekilnError(f"cannot write {path}: {error.strerror or error}") from None
    return path
