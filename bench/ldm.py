"""Latent diffusion quality and sampling speed on the synthetic set (small config), after the
quickstart's training budget, with the samplers and the guidance batching side by side.

Uses a finished quickstart run (default runs/quickstart: its data and OUT/ldm/pipeline) and an
attribute classifier trained on the same data (trained here if not given; its own accuracy on
ground truth is printed beside the generated shapes' accuracy). For DDIM-50 and DPM-Solver++-20:
text-attribute accuracy (target ≥ 0.9) and the diversity of a prompt's samples (TMD, beside the
data's own for the same attributes), 1-NNA-CD (target ≤ 0.65), MMD/COV-CD, completion UHD and
TMD (learned condition and training-free inpainting), image-conditioned IoU (target ≥ 0.7) and
Chamfer, seconds per shape; then the 20-step figures relative to the 50-step ones and the largest
difference (target: within 2% on the figures the target names, AGREEMENT; the largest over every
quality figure beside it), and the time of one guided denoising step with the 1 + n passes batched
against looped.

The set metrics (1-NNA, MMD, COV) are averaged over `--seeds` sample seeds (default 5): at 85 held-out
shapes one seed's 1-NNA moves by several percent (three seeds of one pipeline spread it by 7%), more
than the 2% target. Each seed draws the same noise for both samplers, so their difference is paired:
it is printed per seed and as a mean with its standard error.

    shapekiln quickstart && python bench/ldm.py
    python bench/ldm.py --run runs/quickstart --classifier runs/quickstart/classifier --split test --count 32
"""

from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path

import torch

from shapekiln.data_prep.reader import ShapeShards, list_shards
from shapekiln.evaluate import evaluate_ldm
from shapekiln.models.attributes import train_attribute_classifier
from shapekiln.sample.partial import known_region
from shapekiln.sample.pipeline import ShapePipeline

FIGURES = (
    ("text_attribute_accuracy", "≥ 0.9"), ("text_category_accuracy", ""), ("text_all_correct_accuracy", ""),
    ("classifier_attribute_accuracy", "(ground truth)"), ("round_trip_attribute_accuracy", "(VQ-VAE ceiling)"),
    ("text_tmd", "(diversity)"), ("text_data_tmd", "(the data's)"), ("1nna_cd", "≤ 0.65"), ("mmd_cd", ""), ("cov_cd", ""),
    ("completion_learned_uhd", ""), ("completion_learned_tmd", ""), ("completion_inpaint_uhd", ""),
    ("completion_inpaint_tmd", ""), ("image_iou", "≥ 0.7"), ("round_trip_iou", "(VQ-VAE ceiling)"),
    ("image_chamfer_l1", ""), ("generation_seconds_per_shape", ""),
)

# The figures the 2% target names: text-attribute accuracy, 1-NNA, completion UHD and TMD, image IoU.
AGREEMENT = ("text_attribute_accuracy", "1nna_cd", "completion_learned_uhd", "completion_learned_tmd", "completion_inpaint_uhd",
             "completion_inpaint_tmd", "image_iou")
TIMING = ("generation_seconds_per_shape",)
SET_FIGURES = ("1nna_cd", "mmd_cd", "cov_cd")
SAMPLERS = (("ddim", 50), ("dpm++", 20))
SEED_STRIDE = 1000  # seed s samples shape k with seed s + k: strides of 1000 keep the seeds' noise apart


def seed_spread(reference: list[float], other: list[float]) -> tuple[float, float]:
    """Mean and standard error of the paired relative difference other / reference − 1 over seeds
    (the standard error is nan for one seed; both are nan where the reference is 0)."""
    differences = [b / a - 1.0 if a else float("nan") for a, b in zip(reference, other)]
    mean = sum(differences) / len(differences)
    if len(differences) < 2:
        return mean, float("nan")
    variance = sum((d - mean) ** 2 for d in differences) / (len(differences) - 1)
    return mean, (variance / len(differences)) ** 0.5


@torch.no_grad()
def guidance_timing(pipeline: ShapePipeline, data: Path, repeats: int = 5, split: str = "test") -> tuple[float, float]:
    """Seconds per guided prediction (text + image + partial: 4 passes) batched and looped."""
    sample = next(iter(ShapeShards(list_shards(data, split), views=True)))
    tsdf = sample["tsdf"][0].numpy()
    conditions = pipeline._conditions(sample["caption"], sample["views"][0].permute(1, 2, 0).numpy(), tsdf,
                                      known_region("z<0", tsdf.shape[0]), 1)
    weights = {name: 3.0 for name in pipeline.modalities}
    latent = torch.randn(1, *pipeline.vqvae.latent_shape).to(pipeline.device)
    timings = []
    for batched in (True, False):
        pipeline.guided_prediction(latent, torch.tensor(500), conditions, weights, batched)  # warm-up
        started = time.perf_counter()
        for _ in range(repeats):
            prediction = pipeline.guided_prediction(latent, torch.tensor(500), conditions, weights, batched)
        prediction.cpu()  # waits for an accelerator's queued work
        timings.append((time.perf_counter() - started) / repeats)
    return timings[0], timings[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=Path("runs/quickstart"), help="a finished quickstart folder")
    parser.add_argument("--classifier", type=Path, help="attribute classifier folder (default: train one into RUN/classifier)")
    parser.add_argument("--split", default="test+val", help="held-out shapes (default test+val: the quickstart's 41 + 44; "
                        "at the test split's 41 alone one 1-NNA classification is 2.2%% of 0.56, more than the 2%% target)")
    parser.add_argument("--count", type=int, default=128, help="held-out shapes for MMD/COV/1-NNA, up to the split's size (1-NNA moves in steps of 1 / (2·count))")
    parser.add_argument("--seeds", type=int, default=5, help="sample seeds the set metrics (1-NNA, MMD, COV) are averaged over")
    parser.add_argument("--prompts", type=int, default=20)
    parser.add_argument("--completion-count", type=int, default=32)
    parser.add_argument("--image-count", type=int, default=32)
    args = parser.parse_args()

    if args.seeds < 1:
        raise SystemExit(f"--seeds must be at least 1, got {args.seeds}")
    data, pipeline_dir = args.run / "data", args.run / "ldm" / "pipeline"
    if not pipeline_dir.is_dir():
        raise SystemExit(f"no pipeline at {pipeline_dir}: run `shapekiln quickstart --out {args.run}` first")
    classifier = args.classifier or args.run / "classifier"
    if not (classifier / "config.json").is_file():
        started = time.perf_counter()
        train_attribute_classifier(data, classifier, progress=False)
        print(f"attribute classifier trained in {time.perf_counter() - started:.0f} s → {classifier}")

    results, per_seed = {}, {figure: {} for figure in SET_FIGURES}
    for scheduler, steps in SAMPLERS:
        started = time.perf_counter()
        results[scheduler] = evaluate_ldm(pipeline_dir, data, classifier, split=args.split, count=args.count, prompts=args.prompts,
                                          completion_count=args.completion_count, image_count=args.image_count,
                                          steps=steps, scheduler=scheduler, progress=False)
        runs = [results[scheduler]]
        for index in range(1, args.seeds):  # the set metrics alone
            runs.append(evaluate_ldm(pipeline_dir, data, None, split=args.split, count=args.count, prompts=0, completion_count=0,
                                     image_count=0, steps=steps, scheduler=scheduler, seed=SEED_STRIDE * index, progress=False))
        for figure in SET_FIGURES:
            if figure in results[scheduler]:
                per_seed[figure][scheduler] = [run[figure] for run in runs]
                results[scheduler][figure] = sum(per_seed[figure][scheduler]) / len(runs)
        print(f"{scheduler}-{steps}: evaluated in {time.perf_counter() - started:.0f} s ({args.seeds} seed(s) of the set metrics)")
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    batched, looped = guidance_timing(ShapePipeline.from_pretrained(pipeline_dir), data)

    ddim, dpm = results["ddim"], results["dpm++"]
    print(f"\nlatent diffusion, {pipeline_dir}; held-out split '{ddim['split']}', {torch.get_num_threads()} threads, peak memory {peak_mb:.0f} MB; "
          f"set metrics the mean of {args.seeds} sample seed(s)")
    print(f"{'':32} {'DDIM-50':>10} {'DPM++-20':>10} {'20 / 50':>9} {'target':>15}")
    for key, target in FIGURES:
        if key in ddim and key in dpm:
            ratio = dpm[key] / ddim[key] if ddim[key] else float("nan")
            print(f"{key:32} {ddim[key]:>10.4f} {dpm[key]:>10.4f} {ratio:>8.3f}× {target:>15}")
    for notes in {tuple(ddim.get("notes", [])), tuple(dpm.get("notes", []))}:
        for note in notes:
            print(f"note: {note}")
    (ddim_name, ddim_steps), (dpm_name, dpm_steps) = SAMPLERS
    for figure, samplers in per_seed.items():
        if len(samplers) == 2:
            seeds = ", ".join(f"{a:.3f} / {b:.3f}" for a, b in zip(samplers[ddim_name], samplers[dpm_name]))
            mean, error = seed_spread(samplers[ddim_name], samplers[dpm_name])
            print(f"{figure} per seed (seeds 0, {SEED_STRIDE}, …; DDIM-{ddim_steps} / DPM++-{dpm_steps}): {seeds}; "
                  f"paired difference {100 * mean:+.1f}% ± {100 * error:.1f} (standard error)")
    print(f"guided step (text + image + partial, 4 passes): batched {batched * 1000:.1f} ms, looped {looped * 1000:.1f} ms, "
          f"looped / batched {looped / batched:.2f}×")
    for name, keys in (("the target's figures", AGREEMENT), ("every quality figure", [key for key, _ in FIGURES if key not in TIMING])):
        shared = [key for key in keys if key in ddim and key in dpm and ddim[key]]
        if shared:
            worst = max(shared, key=lambda key: abs(dpm[key] / ddim[key] - 1.0))
            print(f"largest relative difference DPM++-20 vs DDIM-50 over {name}: {100 * abs(dpm[worst] / ddim[worst] - 1.0):.1f}% "
                  f"({worst}; target ≤ 2%)")


if __name__ == "__main__":
    main()
