"""SDS refinement's effect on the synthetic set: held-out shapes whose attribute disagrees with a
prompt (a three-legged table and "… with four legs", a short lamp and "a tall lamp", …) are refined
toward the prompt; the attribute classifier reads the attribute before (the baseline) and after.

Prints, per case and over all: accuracy of the asked attribute before and after (target: up by at
least 20 points), the Chamfer-L1 between each shape before and after (the shape must stay close
apart from the asked change), seconds per refinement step and minutes per shape (target ≤ 5 CPU
minutes), and the classifier's own accuracy on ground truth.

    python bench/sds.py --data runs/quickstart/data                     # trains the prior and classifier first
    python bench/sds.py --data DATA --prior RUN/view_prior/model --classifier RUN/classifier --count 6
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from shapekiln.data_prep.reader import ShapeShards, list_shards
from shapekiln.data_prep.sources.synthetic import captions_for
from shapekiln.errors import ShapekilnError
from shapekiln.metrics import chamfer_distance, surface_points
from shapekiln.models.attributes import classify, load_attribute_classifier, train_attribute_classifier
from shapekiln.models.io import load_pretrained
from shapekiln.models.priors import load_prior
from shapekiln.models.vqvae import VQVAE
from shapekiln.sample.refine import RefineConfig, refine

# (category, attribute, the shape's value, the asked value)
CASES = (
    ("table", "legs", "three", "four"),
    ("lamp", "height", "short", "tall"),
    ("lamp", "height", "tall", "short"),
    ("mug", "height", "short", "tall"),
)


def held_out(data: Path, count: int) -> dict[tuple, list[dict]]:
    """Up to `count` held-out shapes (val, then test split) for each case."""
    chosen: dict[tuple, list[dict]] = {case: [] for case in CASES}
    try:
        shards = list_shards(data, "val+test")
    except ShapekilnError:  # no held-out split
        return chosen
    for sample in ShapeShards(shards):
        for case in CASES:
            category, attribute, value, _ = case
            if sample["category"] == category and sample["attributes"][attribute] == value and len(chosen[case]) < count:
                chosen[case].append(sample)
    return chosen


def train_prior(data: Path, out: Path, minutes: float) -> Path:
    command = [sys.executable, "-m", "shapekiln.train.view_prior", "--config", "small", "--data", str(data),
               "--output-dir", str(out), "--time-limit", str(minutes), "--no-progress"]
    started = time.perf_counter()
    subprocess.run(command, check=True)
    print(f"view prior trained in {(time.perf_counter() - started) / 60:.1f} min → {out / 'model'}")
    return out / "model"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("runs/quickstart/data"), help="prepared synthetic shards (small config)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-sds"), help="where a trained prior and classifier go")
    parser.add_argument("--prior", type=Path, help="view prior folder (default: train one into OUT/view_prior for --prior-minutes)")
    parser.add_argument("--prior-minutes", type=float, default=10.0)
    parser.add_argument("--classifier", type=Path, help="attribute classifier folder (default: train one into OUT/classifier)")
    parser.add_argument("--count", type=int, default=4, help="shapes per case")
    parser.add_argument("--steps", type=int, default=RefineConfig.steps, help="refinement steps per shape")
    parser.add_argument("--guidance", type=float, default=RefineConfig.guidance)
    parser.add_argument("--anchor", type=float, help="default 0.03 for a latent (--vqvae), 0.3 for a grid")
    parser.add_argument("--lr", type=float)
    parser.add_argument("--views", type=int, default=RefineConfig.views_per_step, help="random views per step")
    parser.add_argument("--vqvae", type=Path, help="optimize the shapes' latents under this VQ-VAE (default: a residual grid)")
    parser.add_argument("--no-color", action="store_true", help="refine the shape only, not an albedo grid")
    parser.add_argument("--negative", action="store_true", help="guide away from the shape's own caption (its present attribute) instead of the empty text")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    classifier_dir = args.classifier or args.out / "classifier"
    if not (classifier_dir / "config.json").is_file():
        started = time.perf_counter()
        train_attribute_classifier(args.data, classifier_dir, progress=False)
        print(f"attribute classifier trained in {time.perf_counter() - started:.0f} s → {classifier_dir}")
    classifier = load_attribute_classifier(classifier_dir)
    own = json.loads((classifier_dir / "accuracy.json").read_text()).get("val", {})
    prior_dir = args.prior or args.out / "view_prior" / "model"
    if not (prior_dir / "view_prior.json").is_file() and not (prior_dir / "model_index.json").is_file():
        prior_dir = train_prior(args.data, args.out / "view_prior", args.prior_minutes)
    prior = load_prior(prior_dir)
    # --vqvae: the latent is what is optimized, as `shapekiln refine --ckpt` does by default.
    config = RefineConfig(steps=args.steps, target="latent" if args.vqvae else "grid", guidance=args.guidance, anchor_weight=args.anchor,
                          lr=args.lr, color=not args.no_color, views_per_step=args.views, seed=args.seed,
                          shadings=RefineConfig.shadings_for(not args.no_color))
    vqvae = load_pretrained(VQVAE, args.vqvae).eval() if args.vqvae else None

    rows, everything = [], {"before": [], "after": [], "chamfer": [], "seconds_per_step": [], "minutes": []}
    for case, samples in held_out(args.data, args.count).items():
        category, attribute, value, wanted = case
        before_hits, after_hits, chamfers = [], [], []
        for sample in samples:
            tsdf = sample["tsdf"][0].numpy()
            asked = {**sample["attributes"], attribute: wanted}
            prompt = captions_for(category, asked)[0]
            started = time.perf_counter()
            negative = captions_for(category, sample["attributes"])[0] if args.negative else None
            result = refine(tsdf, prior, prompt, config, tau=0.2, vqvae=vqvae, progress=False, negative=negative)
            minutes = (time.perf_counter() - started) / 60
            before, after = classify(classifier, np.stack([tsdf, result.tsdf]))
            before_hits.append(before.get(attribute) == wanted and before["category"] == category)
            after_hits.append(after.get(attribute) == wanted and after["category"] == category)
            chamfers.append(chamfer_distance(surface_points(tsdf, 4096), surface_points(result.tsdf, 4096))[0])
            everything["seconds_per_step"].append(result.seconds_per_step)
            everything["minutes"].append(minutes)
            print(f"  {sample['id']}: “{prompt}” {attribute} {before.get(attribute)} → {after.get(attribute)}, "
                  f"CD-L1 {chamfers[-1]:.4f}, {minutes:.2f} min{' (' + result.stopped + ')' if result.stopped else ''}", flush=True)
        rows.append((f"{category} {attribute}: {value} → {wanted}", len(samples), np.mean(before_hits), np.mean(after_hits), np.mean(chamfers)))
        everything["before"] += before_hits
        everything["after"] += after_hits
        everything["chamfer"] += chamfers

    print(f"\nSDS refinement of {'the latent' if vqvae is not None else 'a residual grid'}{'' if args.no_color else ' and albedo'}, "
          f"prior {prior_dir}, {args.steps} steps, {args.views} views/step, guidance {args.guidance}, anchor {config.resolved(config.target).anchor_weight:g}; "
          f"{torch.get_num_threads()} threads")
    print(f"{'case':34} {'n':>3} {'acc before':>11} {'acc after':>10} {'Δ points':>9} {'CD-L1 change':>13}")
    for name, n, before, after, chamfer in rows + [("all", len(everything["before"]), np.mean(everything["before"]),
                                                     np.mean(everything["after"]), np.mean(everything["chamfer"]))]:
        print(f"{name:34} {n:>3} {before:>11.3f} {after:>10.3f} {100 * (after - before):>+9.1f} {chamfer:>13.4f}")
    print(f"seconds per refinement step {np.mean(everything['seconds_per_step']):.3f}; minutes per shape "
          f"{np.mean(everything['minutes']):.2f} (target ≤ 5); accuracy gain target ≥ +20 points")
    print(f"attribute classifier on ground truth (val): {own.get('attribute_accuracy', own)}")


if __name__ == "__main__":
    main()
