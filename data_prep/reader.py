"""Stream prepared shards into torch batches: shuffling, split by rank and worker, partial shapes.

Works under `accelerate launch` (rank and world size from torch.distributed or the RANK /
WORLD_SIZE environment) and in DataLoader workers. When there are at least as many shards as
consumers (ranks × workers) each consumer reads its own shards; with fewer shards every consumer
reads all of them and keeps every n-th sample, so no rank ever sits idle with no data.
"""

from __future__ import annotations

import glob
import io
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal, Sequence

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from shapekiln.errors import ShapekilnError


def list_shards(data: str | Path | Sequence[str | Path], split: str = "train") -> list[str]:
    """Shard paths from a prepared directory (its `{split}-*.tar`; splits joined by "+", such as "test+val",
    list each split's shards in that order), a glob pattern, several of those joined by commas
    ("runs/corpus,runs/quickstart/data": their shards in that order), or a list of paths."""
    if isinstance(data, str) and "," in data:
        return [shard for part in _parts(data) for shard in list_shards(part, split)]
    if isinstance(data, (str, Path)) and Path(data).is_dir():
        shards = [path for part in split.split("+") for path in sorted(glob.glob(str(Path(data) / f"{part}-*.tar")))]
        where = f"{data} (split {split})"
    elif isinstance(data, (str, Path)):
        shards = sorted(glob.glob(str(data)))
        where = str(data)
    else:
        shards = [str(path) for path in data]
        where = "the given list"
    if not shards:
        raise ShapekilnError(f"no shards found in {where}")
    return shards


def dataset_config(shards: str | Path) -> dict[str, Any] | None:
    """The processing config a prepared directory was written with (its dataset.json: resolution, tau,
    views, ...); None for a glob or a list of shards, which carry no description."""
    manifest = Path(shards) / "dataset.json"
    if not manifest.is_file():
        return None
    try:
        prepared = json.loads(manifest.read_text())["config"]
        int(prepared["resolution"]), float(prepared["tau"])  # every reader of it needs these two: checked here once
    except (OSError, ValueError, KeyError, TypeError):
        raise ShapekilnError(f"{manifest} is not a shapekiln dataset description") from None
    return prepared


def _parts(data: str) -> list[str]:
    parts = [part.strip() for part in data.split(",") if part.strip()]
    if not parts:
        raise ShapekilnError(f"no dataset named in {data!r}")
    return parts


def check_dataset(shards: str | Path, resolution: int, tau: float) -> None:
    """Fail before any work when a prepared dataset's grid size or truncation is not the model's (each of
    several joined by commas)."""
    if isinstance(shards, str) and "," in shards:
        for part in _parts(shards):
            check_dataset(part, resolution, tau)
        return
    prepared = dataset_config(shards)
    if prepared is None:
        return  # a glob or list of shards: the reader checks each grid's size as it reads
    grid, truncation = int(prepared["resolution"]), float(prepared["tau"])
    if grid != resolution:
        raise ShapekilnError(f"{shards} holds {grid}³ grids but the model expects {resolution}³; prepare the data with --resolution {resolution} or use the matching config")
    if abs(truncation - tau) > 1e-9:
        raise ShapekilnError(f"{shards} holds TSDFs truncated at {truncation} but the model expects tau={tau}; prepare the data with --tau {tau} or use the matching config")


def distributed_rank() -> tuple[int, int]:
    """(rank, world size) of this process, from torch.distributed if running, else the environment."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


@dataclass
class PartialSpec:
    """How on-the-fly partial shapes are cut (SDFusion trains completion on such masks)."""

    kinds: tuple[str, ...] = ("half", "octant", "box")
    fill: float | None = None  # value of unknown voxels in `partial`; None means +tau (empty space)


def random_known_mask(resolution: int, rng: np.random.Generator, kinds: Sequence[str] = ("half", "octant", "box")) -> np.ndarray:
    """A known-region mask (R, R, R) bool over voxel centers of [-1, 1]³ with both parts non-empty.

    half: one side of an axis-aligned plane; octant: all but one octant around a jittered center
    (or only that octant); box: all but a random axis-aligned box.
    """
    axis = -1.0 + (np.arange(resolution) + 0.5) * (2.0 / resolution)
    # Each kind is a product of per-axis conditions: tested on the three 1-D axes and broadcast, not on an
    # (R, R, R, 3) grid of points (at 64³ that grid made this the data loader's largest cost).
    along = [axis[:, None, None], axis[None, :, None], axis[None, None, :]]
    for _ in range(100):
        kind = kinds[rng.integers(len(kinds))]
        if kind == "half":
            dim, side, cut = rng.integers(3), rng.choice([-1.0, 1.0]), rng.uniform(-0.3, 0.3)
            known = np.broadcast_to(side * (along[dim] - cut) > 0, (resolution,) * 3).copy()
        elif kind == "octant":
            center, signs = rng.uniform(-0.2, 0.2, size=3), rng.choice([-1.0, 1.0], size=3)
            octant = ((along[0] - center[0]) * signs[0] > 0) & ((along[1] - center[1]) * signs[1] > 0) & ((along[2] - center[2]) * signs[2] > 0)
            known = octant if rng.random() < 0.5 else ~octant
        elif kind == "box":
            center, half_size = rng.uniform(-0.5, 0.5, size=3), rng.uniform(0.15, 0.6, size=3)
            known = ~((np.abs(along[0] - center[0]) < half_size[0]) & (np.abs(along[1] - center[1]) < half_size[1])
                      & (np.abs(along[2] - center[2]) < half_size[2]))
        else:
            raise ShapekilnError(f"unknown partial-shape kind {kind!r} (choose from half, octant, box)")
        if known.any() and not known.all():
            return known
    raise AssertionError("could not draw a mask with both known and unknown voxels")  # unreachable for R >= 2


class ShapeShards(torch.utils.data.IterableDataset):
    """Samples from prepared shards as dicts of tensors and strings.

    Each sample: `id`, `category`, `caption` (one of the shape's captions, chosen by the seeded
    rng), `captions`, `tsdf` (1, R, R, R) float32, `latent` (C, r, r, r) float32 when the shards
    were written by `shapekiln encode`, and with `views=True` also `views`
    (K, 4, H, W) uint8 RGBA, `intrinsics` (K, 3, 3) and `world_to_camera` (K, 4, 4) (with
    `views="one"` the same for one view drawn by the seeded rng, K = 1: a trainer that wants one
    random view per step decodes one PNG instead of K); with
    `partial` also `known_mask` (1, R, R, R) bool and `partial` (1, R, R, R) float32.
    """

    def __init__(
        self,
        shards: Sequence[str],
        *,
        shuffle_buffer: int = 0,
        seed: int = 0,
        repeat: bool = False,
        views: bool | Literal["one"] = False,
        partial: PartialSpec | None = None,
        resolution: int | None = None,
        rank: int | None = None,
        world_size: int | None = None,
    ):
        super().__init__()
        if not shards:
            raise ShapekilnError("no shards to read")
        self.shards = list(shards)
        self.shuffle_buffer, self.seed, self.repeat = shuffle_buffer, seed, repeat
        self.views, self.partial, self.resolution = views, partial, resolution
        self.rank, self.world_size = rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def consumer(self) -> tuple[int, int]:
        """(index, count) of this rank-and-worker among all readers."""
        rank, world_size = distributed_rank()
        rank = rank if self.rank is None else self.rank
        world_size = world_size if self.world_size is None else self.world_size
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return rank * workers + worker, world_size * workers

    def __iter__(self) -> Iterator[dict[str, Any]]:
        me, consumers = self.consumer()
        epoch = self.epoch
        while True:
            shards = list(self.shards)
            if self.shuffle_buffer:
                random.Random(f"{self.seed}-{epoch}").shuffle(shards)
            if len(shards) >= consumers:
                mine, keep = shards[me::consumers], None
            else:
                mine, keep = shards, (me, consumers)
            rng = np.random.default_rng([self.seed, epoch, me])
            samples = self._decode_all(_raw_samples(mine, keep), rng)
            if self.shuffle_buffer:
                samples = _shuffled(samples, self.shuffle_buffer, rng)
            yield from samples
            if not self.repeat:
                return
            epoch += 1

    def _decode_all(self, raw: Iterator[dict[str, Any]], rng: np.random.Generator) -> Iterator[dict[str, Any]]:
        for sample in raw:
            yield self.decode(sample, rng)

    def decode(self, raw: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        key = raw["__key__"]
        try:
            tsdf = np.load(io.BytesIO(raw["sdf.npy"]), allow_pickle=False).astype(np.float32)
            meta = json.loads(raw["meta.json"])
            captions = raw["caption.txt"].decode().splitlines()
        except KeyError as missing:
            raise ShapekilnError(f"sample {key} in {raw.get('__url__')} has no {missing.args[0]} entry: not a shapekiln shard") from None
        if self.resolution is not None and tsdf.shape != (self.resolution,) * 3:
            raise ShapekilnError(f"shard {raw.get('__url__')} holds {tsdf.shape[0]}³ grids but {self.resolution}³ was expected")
        sample: dict[str, Any] = {
            "id": key,
            "category": meta.get("category", "unknown"),
            "attributes": meta.get("attributes", {}),
            "captions": captions,
            "caption": captions[rng.integers(len(captions))],
            "tsdf": torch.from_numpy(tsdf)[None],  # (1, R, R, R)
        }
        if "latent.npy" in raw:
            sample["latent"] = torch.from_numpy(np.load(io.BytesIO(raw["latent.npy"]), allow_pickle=False))  # (C, r, r, r)
        if self.views:
            cameras = json.loads(raw["cameras.json"])
            chosen = [int(rng.integers(len(cameras)))] if self.views == "one" else range(len(cameras))
            cameras = [cameras[k] for k in chosen]
            images = [np.asarray(Image.open(io.BytesIO(raw[f"view_{k}.png"])).convert("RGBA")) for k in chosen]
            sample["views"] = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()  # (K, 4, H, W)
            sample["intrinsics"] = torch.tensor([camera["K"] for camera in cameras], dtype=torch.float32)
            sample["world_to_camera"] = torch.tensor([camera["world_to_camera"] for camera in cameras], dtype=torch.float32)
        if self.partial is not None:
            known = random_known_mask(tsdf.shape[0], rng, self.partial.kinds)
            fill = meta.get("tau", float(np.abs(tsdf).max())) if self.partial.fill is None else self.partial.fill
            sample["known_mask"] = torch.from_numpy(known)[None]
            sample["partial"] = torch.from_numpy(np.where(known, tsdf, np.float32(fill)).astype(np.float32))[None]
        return sample


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack tensors along a new batch axis; keep strings and lists as lists."""
    batch = {}
    for key in samples[0]:
        values = [sample[key] for sample in samples]
        batch[key] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
    return batch


def make_loader(dataset: ShapeShards, batch_size: int, num_workers: int = 0, drop_last: bool = False) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate, drop_last=drop_last,
        persistent_workers=num_workers > 0,
    )


def _raw_samples(shards: list[str], keep: tuple[int, int] | None) -> Iterator[dict[str, Any]]:
    """Raw (undecoded) samples of the given shards, optionally every n-th one only."""
    pipeline = wds.DataPipeline(wds.SimpleShardList(shards), wds.tarfile_to_samples())
    for position, sample in enumerate(pipeline):
        if keep is None or position % keep[1] == keep[0]:
            yield sample


def _shuffled(samples: Iterator[dict[str, Any]], buffer_size: int, rng: np.random.Generator) -> Iterator[dict[str, Any]]:
    """A seeded shuffle buffer: deterministic for a given seed, epoch and consumer."""
    buffer: list[dict[str, Any]] = []
    for sample in samples:
        buffer.append(sample)
        if len(buffer) >= buffer_size:
            yield buffer.pop(int(rng.integers(len(buffer))))
    while buffer:
        yield buffer.pop(int(rng.integers(len(buffer))))
