"""The general VQ-VAE against a category-specific one, side by side on three sets (issue 20).

For each VQ-VAE given (a shipped name such as general-32, or a folder): reconstruction IoU, Chamfer-L1,
F-score@0.01 and structure (one-piece fraction) on

  * real meshes never trained on: every mesh below --real (default ../shared/data/meshes), prepared at
    the model's grid with the small data config (all splits), and --unseen, a second folder, when given;
  * the synthetic set's held-out split (--synthetic, default runs/quickstart/data);
  * the procedural corpus' held-out split (--corpus, when given);

and its batched encoding speed (inference mode, --threads threads, the encoder and the quantizer on
preloaded grids). The first VQ-VAE is measured against the targets; the others are its baselines.

    python bench/general_vqvae.py --vqvae general-32 runs/quickstart/vqvae/model
    python bench/general_vqvae.py --vqvae general-32 runs/qs/vqvae/model --corpus runs/general/procedural --unseen ~/meshes
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from shapekiln.config import load_config
from shapekiln.data_prep.process import PrepConfig
from shapekiln.data_prep.reader import ShapeShards, list_shards, make_loader
from shapekiln.data_prep.shards import run_prep
from shapekiln.data_prep.sources.folder import FolderSource
from shapekiln.evaluate import evaluate_vqvae
from shapekiln.models.io import load_pretrained
from shapekiln.models.vqvae import VQVAE

REPO = Path(__file__).resolve().parents[1]
TARGETS = {  # set → (figure, target, test)
    "real": [("iou", "≥ 0.92", lambda v: v >= 0.92), ("chamfer_l1", "≤ 0.006", lambda v: v <= 0.006)],
    "unseen": [("iou", "≥ 0.92", lambda v: v >= 0.92), ("chamfer_l1", "≤ 0.006", lambda v: v <= 0.006)],
    "synthetic": [("iou", "≥ 0.95", lambda v: v >= 0.95)],
}


def prepared_folder(meshes: Path, out: Path, resolution: int) -> Path:
    """`meshes` prepared at `resolution` with the small data config (no views: only the TSDF is used)."""
    config = load_config(PrepConfig, "small", "data", {"resolution": resolution, "views": 0, "val_fraction": 0.0,
                                                         "test_fraction": 0.0})
    if not (out / "dataset.json").is_file():
        summary = run_prep(FolderSource(meshes), config, out, progress=False,
                           source_args={"root": str(meshes.resolve()), "captions": None})
        print(summary.line(out))
    return out


def encoding_speed(model: VQVAE, data: Path, count: int, batch_size: int) -> float:
    """Shapes per second through the encoder and the quantizer, on grids already in memory."""
    grids = []
    for batch in make_loader(ShapeShards(list_shards(data, "train+val+test"), resolution=model.config.resolution), batch_size=batch_size):
        grids.append(batch["tsdf"])
        if sum(len(g) for g in grids) >= count:
            break
    with torch.inference_mode():
        model.quantizer(model.encode(grids[0]))  # warm-up
        started = time.perf_counter()
        for batch in grids:
            model.quantizer(model.encode(batch))
        seconds = time.perf_counter() - started
    return sum(len(g) for g in grids) / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vqvae", nargs="+", required=True, help="VQ-VAEs: the first is measured, the rest are baselines")
    parser.add_argument("--real", type=Path, default=REPO.parent / "shared" / "data" / "meshes", help="real meshes never trained on")
    parser.add_argument("--unseen", type=Path, help="a second folder of real meshes")
    parser.add_argument("--synthetic", type=Path, default=Path("runs/quickstart/data"), help="prepared synthetic set (its test split)")
    parser.add_argument("--corpus", type=Path, help="prepared procedural corpus (its test split)")
    parser.add_argument("--out", type=Path, default=Path("bench-runs/general_vqvae"), help="where the real meshes are prepared")
    parser.add_argument("--points", type=int, default=32768, help="surface points per shape")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    models = {name: load_pretrained(VQVAE, name).eval() for name in args.vqvae}
    resolutions = {model.config.resolution for model in models.values()}
    if len(resolutions) != 1:
        raise SystemExit(f"the VQ-VAEs have different grids ({sorted(resolutions)}); compare ones of one size")
    resolution = resolutions.pop()
    sets = {"real": (prepared_folder(args.real, args.out / f"real-{resolution}", resolution), "train+val+test")}
    if args.unseen:
        sets["unseen"] = (prepared_folder(args.unseen, args.out / f"unseen-{resolution}", resolution), "train+val+test")
    sets["synthetic"] = (args.synthetic, "test")
    if args.corpus:
        sets["corpus"] = (args.corpus, "test")

    results = {}
    for name in args.vqvae:
        for set_name, (data, split) in sets.items():
            started = time.perf_counter()
            results[name, set_name] = evaluate_vqvae(name, data, split, points=args.points, progress=False)
            print(f"{name} on {set_name}: {results[name, set_name]['shapes']} shapes in {time.perf_counter() - started:.0f} s")
        results[name, "speed"] = encoding_speed(models[name], args.synthetic, 256, 32)

    first = args.vqvae[0]
    print(f"\nVQ-VAEs at {resolution}³ (first measured against the targets; the others are baselines); "
          f"{args.threads} threads")
    header = f"{'set':10} {'figure':22} " + " ".join(f"{name[-24:]:>24}" for name in args.vqvae) + f" {'target':>10}  met"
    print(header)
    for set_name in sets:
        shapes = results[first, set_name]["shapes"]
        targets = {figure: (target, test) for figure, target, test in TARGETS.get(set_name, [])}
        for figure in ("iou", "chamfer_l1", "f_score", "reconstruction_one_piece", "data_one_piece", "reconstruction_thin_parts_present"):
            values = [results[name, set_name].get(figure) for name in args.vqvae]
            if values[0] is None:
                continue
            target, test = targets.get(figure, ("", None))
            met = "" if test is None else "yes" if test(values[0]) else "NO"
            cells = " ".join(f"{'—' if v is None else f'{v:.4f}':>24}" for v in values)
            print(f"{set_name + f' ({shapes})':10} {figure:22} {cells} {target:>10}  {met}")
    speeds = [results[name, "speed"] for name in args.vqvae]
    print(f"{'encoding':10} {'shapes/s (batch 32)':22} " + " ".join(f"{v:>24.1f}" for v in speeds)
          + f" {'≥ 50':>10}  {'yes' if speeds[0] >= 50 else 'NO'}")


if __name__ == "__main__":
    main()
