"""Latent shards (`shapekiln encode`): every sample of prepared TSDF shards encoded once by a trained VQ-VAE.

An output shard has its input shard's name and every entry of its samples (TSDF, views, cameras,
captions, meta), plus `latent.npy`: the encoder's latent **before quantization**, float32
(C, r, r, r). Continuous latents rather than code indices, because the diffusion model denoises
continuous latents (as SDFusion's does) and `VQVAE.decode` quantizes whatever it is given; the
indices are one `quantizer` call away. The TSDF stays, since completion training cuts partial
shapes from it and encodes those.

`dataset.json` holds the input dataset's description plus the VQ-VAE's config and weights
fingerprint; `latent_stats.json` the per-channel mean and std of the train split's latents, which
the diffusion model uses to scale its inputs to unit variance. Like `prep`, a run is resumable
shard by shard: a shard is written under a temporary name and renamed when whole.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import webdataset as wds
from tqdm import tqdm

from shapekiln.data_prep.process import npy_bytes
from shapekiln.data_prep.reader import check_dataset
from shapekiln.data_prep.shards import SPLITS, prepare_out_dir, write_atomic
from shapekiln.errors import ShapekilnError
from shapekiln.models.io import load_pretrained
from shapekiln.models.vqvae import VQVAE


@dataclass
class EncodeSummary:
    shapes: int = 0
    shards_written: int = 0
    shards_done_before: int = 0

    def line(self, out: Path) -> str:
        return (f"encode: {self.shapes} shapes encoded into {self.shards_written} shards, "
                f"{self.shards_done_before} shards already done → {out}")


@torch.no_grad()
def encode_shards(vqvae_dir: str | Path, data: str | Path, out: str | Path, batch_size: int = 16,
                  progress: bool = True, device: str | torch.device | None = None) -> EncodeSummary:
    """Encode every shard of the prepared directory `data` into `out` (same shard names), on `device`
    (default: cuda when available, else the CPU)."""
    vqvae_dir, data, out = Path(vqvae_dir), Path(data), Path(out)
    if batch_size < 1:
        raise ShapekilnError(f"--batch-size must be at least 1, got {batch_size}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_pretrained(VQVAE, vqvae_dir).eval().to(device)
    source = _read_manifest(data)
    check_dataset(data, model.config.resolution, model.config.tau)
    shards = sorted(path for split in SPLITS for path in data.glob(f"{split}-*.tar"))
    if not shards:
        raise ShapekilnError(f"no shards found in {data}")
    if out.resolve() == data.resolve():
        raise ShapekilnError("--out must differ from --data: latent shards keep the input shards' names")
    prepare_out_dir(out, {**source, "latents": {"vqvae": vqvae_fingerprint(vqvae_dir), "vqvae_config": _public(model.config),
                                                 "shape": list(model.latent_shape)}})

    for stale in out.glob(".*.tar.*.tmp"):
        stale.unlink(missing_ok=True)  # left by a killed run; one encode run owns its --out
    summary = EncodeSummary()
    todo = [shard for shard in shards if not (out / shard.name).exists()]
    summary.shards_done_before = len(shards) - len(todo)
    bar = tqdm(total=len(todo), desc="encode", unit="shard", disable=not progress)
    for shard in todo:
        summary.shapes += _encode_shard(model, shard, out, batch_size)
        summary.shards_written += 1
        bar.update(1)
    bar.close()
    _write_stats(out, model.latent_shape[0])
    return summary


def _public(config: Any) -> dict[str, Any]:
    """A model config without diffusers' bookkeeping keys (`_name_or_path` changes with the folder)."""
    return {key: value for key, value in config.items() if not key.startswith("_")}


def _read_manifest(data: Path) -> dict[str, Any]:
    manifest = data / "dataset.json"
    if not manifest.is_file():
        raise ShapekilnError(f"{data} is not a prepared dataset (no dataset.json); run `shapekiln prep` first")
    try:
        description = json.loads(manifest.read_text())
    except ValueError:
        raise ShapekilnError(f"{manifest} is not valid JSON") from None
    if "latents" in description:
        raise ShapekilnError(f"{data} already holds latent shards; give the TSDF dataset it was encoded from")
    return description


def vqvae_fingerprint(vqvae_dir: Path) -> str:
    """SHA-256 of the weights: a rerun into the same --out must use the same model, wherever it lies."""
    digest = hashlib.sha256()
    for path in sorted(vqvae_dir.glob("*.safetensors")):
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _encode_shard(model: VQVAE, shard: Path, out: Path, batch_size: int) -> int:
    """Write `out/<shard name>` with `latent.npy` added to every sample; return the sample count."""
    final = out / shard.name
    temporary = out / f".{shard.name}.{os.getpid()}.tmp"
    count, total, total_sq = 0, np.zeros(model.latent_shape[0]), np.zeros(model.latent_shape[0])
    try:
        with open(temporary, "wb") as stream:
            writer = wds.TarWriter(stream, mtime=0.0)  # fixed mtime: same input and model → same bytes
            try:
                for samples in _batched(wds.DataPipeline(wds.SimpleShardList([str(shard)]), wds.tarfile_to_samples()), batch_size):
                    tsdf = torch.stack([_tsdf(sample) for sample in samples])[:, None]  # (B, 1, R, R, R)
                    latents = model.encode(tsdf.to(model.device)).cpu().numpy()  # (B, C, r, r, r)
                    for sample, latent in zip(samples, latents):
                        writer.write({**sample, "latent.npy": npy_bytes(latent.astype(np.float32))})
                    count += len(samples)
                    total += latents.astype(np.float64).sum(axis=(0, 2, 3, 4))
                    total_sq += (latents.astype(np.float64) ** 2).sum(axis=(0, 2, 3, 4))
            finally:
                writer.close()
        per_channel = int(np.prod(model.latent_shape[1:]))
        index = {"shard": final.name, "samples": count, "values_per_channel": count * per_channel,
                 "sum": total.tolist(), "sum_sq": total_sq.tolist()}
        write_atomic(out / "index" / f"{final.stem}.json", json.dumps(index).encode())
        os.replace(temporary, final)
    finally:
        temporary.unlink(missing_ok=True)
    return count


def _tsdf(sample: dict[str, Any]) -> torch.Tensor:
    try:
        return torch.from_numpy(np.load(io.BytesIO(sample["sdf.npy"]), allow_pickle=False).astype(np.float32))
    except KeyError:
        raise ShapekilnError(f"sample {sample['__key__']} in {sample.get('__url__')} has no sdf.npy: not a shapekiln shard") from None


def _batched(samples: Iterator[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    batch = []
    for sample in samples:
        batch.append(sample)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _write_stats(out: Path, channels: int) -> None:
    """Per-channel mean and std of the train split's latents, from the per-shard sums in index/."""
    count, total, total_sq = 0, np.zeros(channels), np.zeros(channels)
    for path in sorted((out / "index").glob("train-*.json")):
        if (out / f"{path.stem}.tar").exists():
            index = json.loads(path.read_text())
            count += index["values_per_channel"]
            total += np.array(index["sum"])
            total_sq += np.array(index["sum_sq"])
    if count == 0:
        raise ShapekilnError(f"{out} has no train shards to compute latent statistics from")
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean**2, 0.0))
    stats = {"split": "train", "values_per_channel": count, "mean": mean.tolist(), "std": std.tolist()}
    write_atomic(out / "latent_stats.json", json.dumps(stats, indent=2).encode())


def load_latent_stats(data: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(mean, std) per latent channel of an encoded dataset."""
    path = Path(data) / "latent_stats.json"
    try:
        stats = json.loads(path.read_text())
        return np.array(stats["mean"], dtype=np.float32), np.array(stats["std"], dtype=np.float32)
    except (OSError, ValueError, KeyError):
        raise ShapekilnError(f"{path} is missing or unreadable: is {data} a directory written by `shapekiln encode`?") from None
