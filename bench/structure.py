"""Structure: do shapes hold together, from mesh to sample? Every figure of issue 19 beside its baseline.

Uses a finished quickstart run (default runs/quickstart: OUT/data, OUT/ldm/pipeline with its VQ-VAE,
OUT/samples) and an attribute classifier trained on its data (trained here if not given). Per set: the
fraction of shapes whose inside (TSDF < 0) is one 26-connected piece, and for the synthetic set the
fraction of thin parts (legs, poles, handles, arms, spokes) present (`shapekiln.metrics.parts_present`,
within one voxel of the largest piece). Rows, each with its baseline measured in this process:

  * prepared data (every split), beside the generator at its nominal proportions prepared at the same
    resolution (the data before shapes were built for their grid) and the source meshes at 64³;
  * VQ-VAE reconstructions of the held-out split, beside that split's data;
  * raw samples (no post-processing): one per held-out shape from its caption, beside those references;
    their thin parts are those of the nearest reference with the asked attributes; the text-attribute
    accuracy and 1-NNA-CD of `shapekiln eval ldm` beside the figures before this work (0.946 / 0.575);
  * the quickstart's own preview samples (what a person sees first);
  * the quickstart's wall time, where the run recorded it (OUT/quickstart.json).

    shapekiln quickstart && python bench/structure.py
    python bench/structure.py --run runs/quickstart --baseline-count 200
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from shapekiln.data_prep.process import normalize
from shapekiln.data_prep.reader import ShapeShards, list_shards
from shapekiln.data_prep.sources.synthetic import SyntheticSource
from shapekiln.data_prep.tsdf import compute_tsdf
from shapekiln.evaluate import PART_TOLERANCE, DatasetParts, evaluate_ldm, evaluate_vqvae
from shapekiln.metrics import structure_summary
from shapekiln.models.attributes import train_attribute_classifier

# The latest bench figures before the structure work (docs/benchmarks.md, 2026-12-04): samples may not get worse.
BEFORE = {"text_attribute_accuracy": 0.946, "1nna_cd": 0.575}


def data_structure(data: Path) -> dict[str, float]:
    """The prepared shapes of every split, with their thin parts rebuilt from dataset.json."""
    parts = DatasetParts.for_data(data)
    grids, masks = [], []
    for sample in tqdm(ShapeShards(list_shards(data, "train+val+test")), desc="data", unit="shape"):
        grids.append(sample["tsdf"][0].numpy())
        masks.append(parts.masks(sample["id"]) if parts else [])
    return structure_summary(grids, masks if parts else None, PART_TOLERANCE)


def generator_structure(source: SyntheticSource, resolution: int, extent: float, tau: float) -> dict[str, float]:
    """A source's shapes made into TSDFs at `resolution` as prep makes them (closed meshes: no thin shell)."""
    grids, masks = [], []
    for item in tqdm(source.items(), total=source.count, desc=f"generator at {resolution}³", unit="shape"):
        mesh, _ = normalize(source.load(item).mesh, extent)
        grids.append(compute_tsdf(mesh.vertices, mesh.faces, resolution, tau))
        masks.append(source.thin_part_masks(item, resolution, extent))
    return structure_summary(grids, masks, PART_TOLERANCE)


def preview_structure(samples: Path) -> dict[str, float] | None:
    """The quickstart's prompt samples (OUT/samples/<prompt>/sample_*.npy), completions left out."""
    files = sorted(path for path in samples.glob("*/sample_*.npy") if path.parent.name != "completion")
    return structure_summary([np.load(path, allow_pickle=False) for path in files]) | {"shapes": len(files)} if files else None


def _figure(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=Path("runs/quickstart"), help="a finished quickstart's output")
    parser.add_argument("--classifier", type=Path, help="attribute classifier (default RUN/classifier, trained if missing)")
    parser.add_argument("--baseline-count", type=int, default=200, help="shapes of the nominal generator and of the source meshes")
    parser.add_argument("--count", type=int, default=64, help="held-out shapes sampled (one sample each)")
    parser.add_argument("--prompts", type=int, default=20, help="text-attribute prompts (2 samples each)")
    args = parser.parse_args()

    # The VQ-VAE the diffusion model was trained on (the shipped general-32, or the one `--vqvae train` trained).
    data, pipeline = args.run / "data", args.run / "ldm" / "pipeline"
    vqvae = pipeline / "vqvae"
    for needed in (data / "dataset.json", vqvae, pipeline):
        if not needed.exists():
            raise SystemExit(f"no {needed}: run `shapekiln quickstart --out {args.run}` first")
    description = json.loads((data / "dataset.json").read_text())
    config, source_args = description["config"], description["source_args"]
    resolution, extent, tau = int(config["resolution"]), float(config.get("extent", 0.8)), float(config["tau"])
    classifier = args.classifier or args.run / "classifier"
    if not (classifier / "config.json").is_file():
        started = time.perf_counter()
        train_attribute_classifier(data, classifier, progress=False)
        print(f"attribute classifier trained in {time.perf_counter() - started:.0f} s → {classifier}")

    started = time.perf_counter()
    prepared = data_structure(data)
    seed = int(source_args.get("seed", 0))
    nominal = generator_structure(SyntheticSource(args.baseline_count, seed=seed), resolution, extent, tau)
    built = SyntheticSource.from_args({**source_args, "count": args.baseline_count}, extent)  # as the data was built
    source = generator_structure(built, 64, extent, tau)
    print(f"data and generators measured in {time.perf_counter() - started:.0f} s")

    started = time.perf_counter()
    reconstruction = evaluate_vqvae(vqvae, data, "test", progress=False)
    print(f"VQ-VAE evaluated in {time.perf_counter() - started:.0f} s ({reconstruction['shapes']} held-out shapes)")
    started = time.perf_counter()
    samples = evaluate_ldm(pipeline, data, classifier, split="test", count=args.count, prompts=args.prompts,
                           completion_count=0, image_count=0, progress=False)
    print(f"samples evaluated in {time.perf_counter() - started:.0f} s ({samples['generation_shapes']} held-out captions, "
          f"{samples.get('text_samples', 0)} text-attribute samples)")
    preview = preview_structure(args.run / "samples")
    timing = args.run / "quickstart.json"
    quickstart_minutes = json.loads(timing.read_text())["seconds"] / 60 if timing.is_file() else None

    rows = []  # (figure, measured, baseline, baseline's name, target, met)

    def row(figure, measured, baseline, baseline_name, target, met):
        rows.append((figure, measured, baseline, baseline_name, target, met))

    row("data: one piece", prepared["one_piece"], nominal["one_piece"], "nominal generator", "≥ 0.99", prepared["one_piece"] >= 0.99)
    row("data: thin parts present", prepared.get("thin_parts_present"), nominal.get("thin_parts_present"), "nominal generator",
        "≥ 0.98", prepared.get("thin_parts_present", 0) >= 0.98)
    row("source meshes at 64³: one piece", source["one_piece"], None, "", "", None)
    row("source meshes at 64³: thin parts", source.get("thin_parts_present"), None, "", "", None)
    gap = abs(reconstruction["reconstruction_one_piece"] - reconstruction["data_one_piece"])
    row("VQ-VAE recon: one piece", reconstruction["reconstruction_one_piece"], reconstruction["data_one_piece"], "held-out data",
        "within 0.02", gap <= 0.02)
    row("VQ-VAE recon: thin parts present", reconstruction.get("reconstruction_thin_parts_present"),
        reconstruction.get("data_thin_parts_present"), "held-out data", "", None)
    one, reference = samples["generation_one_piece"], samples["reference_one_piece"]
    row("samples: one piece", one, reference, "references", "≥ 0.90, within 0.05", one >= 0.90 and abs(one - reference) <= 0.05)
    row("samples: thin parts present", samples.get("generation_thin_parts_present"), samples.get("reference_thin_parts_present"),
        "references", "≥ 0.90", samples.get("generation_thin_parts_present", 0) >= 0.90)
    row("samples: floaters (share)", samples["generation_floaters_mean"], samples["reference_floaters_mean"], "references", "", None)
    row("text samples: one piece", samples.get("text_one_piece"), None, "", "", None)
    for key, target in (("text_attribute_accuracy", "≥ before"), ("1nna_cd", "≤ before")):
        value = samples.get(key)
        met = None if value is None else value >= BEFORE[key] if key.startswith("text") else value <= BEFORE[key]
        row(f"samples: {key}", value, BEFORE[key], "before (2026-12-04)", target, met)
    if preview:
        row(f"quickstart preview: one piece ({preview['shapes']})", preview["one_piece"], 5 / 16, "before (5 of 16)", "", None)
    row("quickstart: minutes", quickstart_minutes, None, "", "≤ 15", None if quickstart_minutes is None else quickstart_minutes <= 15)

    print(f"\nstructure, {args.run} ({resolution}³; thin parts within {PART_TOLERANCE} voxel of the largest piece; "
          f"{prepared.get('thin_parts', 0)} thin parts in the data, {samples.get('generation_thin_parts', 0)} checked in samples)")
    print(f"{'':40} {'measured':>9} {'baseline':>9}  {'(baseline)':22} {'target':>20}  met")
    for figure, measured, baseline, baseline_name, target, met in rows:
        print(f"{figure:40} {_figure(measured):>9} {_figure(baseline):>9}  {baseline_name:22} {target:>20}  "
              f"{'' if met is None else 'yes' if met else 'NO'}")
    for note in samples.get("notes", []):
        print(f"note: {note}")


if __name__ == "__main__":
    main()
