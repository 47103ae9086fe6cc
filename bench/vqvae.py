"""VQ-VAE quality and speed on the synthetic set at the small config (32³ → 3×8³), side by side
with a baseline in the same process.

Trains the small config on the CPU within a time budget (default 15 minutes), then evaluates the
held-out (test) split: occupancy IoU, Chamfer-L1/L2 and F-score@0.01 (unit cube) between the
marching-cubes surfaces, codebook usage; plus training steps/s and peak memory. The baseline
stores the same number of values per shape without learning anything: the TSDF resampled
(trilinear) to the smallest grid with at least as many values as the latent (12³ ≥ 3·8³), then
back to 32³. Targets (issue 3): IoU ≥ 0.95 and Chamfer-L1 < 0.01 within 15 CPU minutes.

    python bench/vqvae.py                       # prepares 1000 shapes into bench-runs/vqvae/data first
    python bench/vqvae.py --data DIR --minutes 5
"""

from __future__ import annotations

import argparse
import math
import resource
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from shapekiln.config import load_config
from shapekiln.data_prep.process import PrepConfig
from shapekiln.data_prep.reader import ShapeShards, list_shards, make_loader
from shapekiln.data_prep.shards import run_prep
from shapekiln.data_prep.sources.synthetic import SyntheticSource
from shapekiln.evaluate import evaluate_vqvae
from shapekiln.metrics import reconstruction_metrics
from shapekiln.train.vqvae import VQVAEConfig, train


def baseline(data: Path, resolution: int, values: int, points: int) -> dict[str, float]:
    """Trilinear down- and up-sampling at (at least) the latent's number of values, on the test split."""
    side = math.ceil(values ** (1 / 3))
    rows = []
    for batch in make_loader(ShapeShards(list_shards(data, "test"), resolution=resolution), batch_size=16):
        low = F.interpolate(batch["tsdf"], size=(side,) * 3, mode="trilinear", align_corners=False)
        back = F.interpolate(low, size=(resolution,) * 3, mode="trilinear", align_corners=False)
        for target, predicted in zip(batch["tsdf"][:, 0].numpy(), back[:, 0].numpy()):
            rows.append(reconstruction_metrics(predicted, target, points, seed=len(rows)))
    return {key: float(np.mean([row[key] for row in rows])) for key in rows[0]} | {"side": side}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="prepared small-config shards (default: prepare --count shapes)")
    parser.add_argument("--count", type=int, default=1000, help="synthetic shapes to prepare (default 1000)")
    parser.add_argument("--out", type=Path, default=Path("bench-runs/vqvae"), help="run folder (default bench-runs/vqvae)")
    parser.add_argument("--config", default="small")
    parser.add_argument("--minutes", type=float, default=15.0, help="training time budget (default 15)")
    parser.add_argument("--max-steps", type=int, help="overrides the config's max_steps (the schedule's length)")
    parser.add_argument("--points", type=int, default=32768, help="surface points per shape")
    args = parser.parse_args()

    data = args.data or args.out / "data"
    if args.data is None:
        started = time.perf_counter()
        prep_config = load_config(PrepConfig, "small", "data")
        source = SyntheticSource.for_config(args.count, prep_config)
        summary = run_prep(source, prep_config, data, workers=2, progress=False, source_args=source.args())
        print(f"{summary.line(data)} ({time.perf_counter() - started:.0f} s)")
    config = load_config(VQVAEConfig, args.config, "vqvae")
    config.data.shards, config.train.output_dir = str(data), str(args.out / "run")
    if args.max_steps:
        config.train.max_steps = args.max_steps

    started = time.perf_counter()
    model_dir = train(config, progress=False, time_limit=60 * args.minutes)
    train_seconds = time.perf_counter() - started
    steps = int(torch.load(sorted((args.out / "run" / "checkpoints").glob("step-*"))[-1] / "custom_checkpoint_0.pkl", weights_only=True)["step"])
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    ours = evaluate_vqvae(model_dir, data, "test", points=args.points, progress=False)
    values = config.model.latent_channels * (config.model.resolution // 4) ** 3
    base = baseline(data, config.model.resolution, values, args.points)

    print(f"\nVQ-VAE {args.config}: {config.model.resolution}³ → {config.model.latent_channels}×{config.model.resolution // 4}³, "
          f"codebook {config.model.codebook_size}; {steps} steps in {train_seconds / 60:.1f} min "
          f"({steps / train_seconds:.2f} steps/s, batch {config.data.batch_size}), peak memory {peak_mb:.0f} MB; "
          f"{torch.get_num_threads()} threads; held-out shapes: {ours['shapes']}")
    print(f"{'':24} {'ours':>10} {'trilinear ' + str(base['side']) + '³':>14} {'ours / baseline':>16} {'target':>10}")
    for key, target in (("iou", "≥ 0.95"), ("chamfer_l1", "< 0.01"), ("chamfer_l2", ""), ("f_score", "")):
        print(f"{key:24} {ours[key]:>10.4f} {base[key]:>14.4f} {ours[key] / base[key]:>15.2f}× {target:>10}")
    print(f"{'codebook usage':24} {ours['codebook_usage']:>10.3f}   (perplexity {ours['codebook_perplexity']:.0f} of {ours['codebook_size']})")


if __name__ == "__main__":
    main()
