"""Evaluations behind `shapekiln eval`: run a saved model over prepared shards, summarize shapekiln.metrics."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from shapekiln.data_prep.reader import ShapeShards, check_dataset, list_shards, make_loader
from shapekiln.errors import ShapekilnError
from shapekiln.metrics import codebook_usage, reconstruction_metrics
from shapekiln.models.io import load_pretrained
from shapekiln.models.vqvae import VQVAE


@torch.no_grad()
def evaluate_vqvae(ckpt: str | Path, data: str | Path, split: str = "test", batch_size: int = 8, points: int = 32768,
                   limit: int | None = None, threshold: float = 0.01, progress: bool = True) -> dict[str, Any]:
    """Reconstruct every shape of a split; mean IoU, Chamfer-L1/L2 and F-score (unit cube) and codebook use."""
    model = load_pretrained(VQVAE, ckpt).eval()
    check_dataset(data, model.config.resolution, model.config.tau)
    dataset = ShapeShards(list_shards(data, split), resolution=model.config.resolution)
    rows: list[dict[str, float]] = []
    codes: list[np.ndarray] = []
    bar = tqdm(desc="eval vqvae", unit="shape", total=limit, disable=not progress)
    for batch in make_loader(dataset, batch_size=batch_size):
        output = model(batch["tsdf"])
        codes.append(output.indices.numpy())
        for target, predicted in zip(batch["tsdf"][:, 0].numpy(), output.reconstruction[:, 0].numpy()):
            rows.append(reconstruction_metrics(predicted, target, points, seed=len(rows), threshold=threshold))
            bar.update(1)
            if limit is not None and len(rows) >= limit:
                break
        if limit is not None and len(rows) >= limit:
            break
    bar.close()
    usage, perplexity = codebook_usage(np.concatenate(codes), model.config.codebook_size)
    summary = {key: float(np.mean([row[key] for row in rows])) for key in rows[0]}
    return {"shapes": len(rows), "split": split, **summary, "f_score_threshold": threshold,
            "codebook_usage": usage, "codebook_perplexity": perplexity, "codebook_size": model.config.codebook_size}


def format_metrics(metrics: dict[str, Any]) -> str:
    return "\n".join(f"{key:>20}  {value:.5g}" if isinstance(value, float) else f"{key:>20}  {value}" for key, value in metrics.items())


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
