"""The prep run: plan shards from a source, process shapes in worker processes, write tar shards.

A shard is the unit of work and of resume: it is written to a temporary name and renamed when
complete, so an existing `{split}-{index:06d}.tar` is always whole and a rerun skips it. A shard's
sample ids and failures go to `index/{name}.json` before the rename; `failures.jsonl` is rebuilt
from those at the end of every run, so it survives interruptions and array jobs alike.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import webdataset as wds
from tqdm import tqdm

from shapekiln.config import to_dict
from shapekiln.data_prep.process import PrepConfig, prepare_sample, split_of
from shapekiln.data_prep.sources.base import Source
from shapekiln.errors import ShapekilnError

SPLITS = ("train", "val", "test")


@dataclass
class ShardPlan:
    split: str
    index: int
    items: list[Any]

    @property
    def name(self) -> str:
        return f"{self.split}-{self.index:06d}"


@dataclass
class PrepSummary:
    written: int = 0
    failed: int = 0
    shards_written: int = 0
    shards_done_before: int = 0
    seconds: float = 0.0
    failures: list[dict[str, str]] = field(default_factory=list)

    def line(self, out: Path) -> str:
        rate = self.written / self.seconds if self.seconds > 0 else 0.0
        text = (
            f"prep: {self.written} shapes written to {self.shards_written} shards, {self.failed} skipped, "
            f"{self.shards_done_before} shards already done; {self.seconds:.1f} s, {rate:.2f} shapes/s → {out}"
        )
        if self.failed:
            text += f" (reasons in {out / 'failures.jsonl'})"
        return text


def plan_shards(source: Source, config: PrepConfig) -> list[ShardPlan]:
    """Every shard of the dataset, in a fixed order: items sorted by id, grouped by split, chunked."""
    by_split: dict[str, list[tuple[str, Any]]] = {split: [] for split in SPLITS}
    seen: set[str] = set()
    for item in source.items():
        shape_id = source.item_id(item)
        if shape_id in seen:
            raise ShapekilnError(f"source {source.name} yields the id {shape_id!r} twice")
        seen.add(shape_id)
        by_split[split_of(shape_id, config)].append((shape_id, item))
    plans = []
    for split in SPLITS:
        entries = sorted(by_split[split], key=lambda entry: entry[0])
        for index, start in enumerate(range(0, len(entries), config.shard_size)):
            plans.append(ShardPlan(split, index, [item for _, item in entries[start : start + config.shard_size]]))
    return plans


def run_prep(
    source: Source,
    config: PrepConfig,
    out: Path,
    workers: int = 1,
    num_shards: int = 1,
    shard_index: int = 0,
    progress: bool = True,
    source_args: dict[str, Any] | None = None,
) -> PrepSummary:
    """Write this job's slice of the dataset (every `num_shards`-th shard from `shard_index`) into `out`.

    `source_args` (what the source was built from) is recorded in dataset.json with the config; a
    rerun or another array job into the same `out` must match both.
    """
    if num_shards < 1 or not 0 <= shard_index < num_shards:
        raise ShapekilnError(f"--shard-index must be in [0, {num_shards}) for --num-shards {num_shards}, got {shard_index}")
    started = time.perf_counter()
    prepare_out_dir(out, {"source": source.name, "source_args": source_args or {}, "config": to_dict(config)})
    plans = [plan for k, plan in enumerate(plan_shards(source, config)) if k % num_shards == shard_index]
    if not plans:
        raise ShapekilnError(f"source {source.name} yielded no shapes for this job")
    todo = [plan for plan in plans if not (out / f"{plan.name}.tar").exists()]
    summary = PrepSummary(shards_done_before=len(plans) - len(todo))

    results = _process_all(source, config, [item for plan in todo for item in plan.items], workers)
    bar = tqdm(total=sum(len(plan.items) for plan in todo), unit="shape", desc="prep", disable=not progress)
    try:
        for plan in todo:
            ids, failures = _write_shard(out, plan, results, bar)
            summary.written += len(ids)
            summary.failed += len(failures)
            summary.failures.extend(failures)
            summary.shards_written += 1
    finally:
        bar.close()
        results.close()
    _write_failures(out)
    summary.seconds = time.perf_counter() - started
    return summary


def prepare_out_dir(out: Path, description: dict[str, Any]) -> None:
    """Create `out`, check it is writable, and refuse to mix datasets made with different configs.

    `description` goes to `out/dataset.json`; a directory that already has one must match it.
    """
    try:
        (out / "index").mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise ShapekilnError(f"cannot write to output directory {out}: {error.strerror or error}") from None
    description = json.loads(json.dumps(description))  # compare as it reads back: tuples → lists
    manifest = out / "dataset.json"
    if manifest.exists():
        try:
            existing = json.loads(manifest.read_text())
        except (OSError, ValueError):
            raise ShapekilnError(f"{manifest} is unreadable; remove it or choose another --out") from None
        if {key: existing.get(key) for key in description} != description:
            raise ShapekilnError(f"{out} holds a dataset made from another source or config; choose another --out")
        return
    write_atomic(manifest, json.dumps(description, indent=2, sort_keys=True).encode())


def _write_shard(out: Path, plan: ShardPlan, results: Iterator, bar: tqdm) -> tuple[list[str], list[dict[str, str]]]:
    final = out / f"{plan.name}.tar"
    # A killed run leaves its temporary behind; this job owns the shard now, so clear it away.
    for stale in out.glob(f".{plan.name}.tar.*.tmp"):
        stale.unlink(missing_ok=True)
    temporary = out / f".{plan.name}.tar.{os.getpid()}.tmp"
    ids, failures = [], []
    try:
        with open(temporary, "wb") as stream:
            writer = wds.TarWriter(stream, mtime=0.0)  # fixed mtime: same input → byte-identical shards
            try:
                for _ in plan.items:
                    shape_id, sample, reason = next(results)
                    if sample is None:
                        failures.append({"id": shape_id, "reason": reason})
                    else:
                        writer.write(sample)
                        ids.append(shape_id)
                    bar.update(1)
            finally:
                writer.close()  # also on interruption, before the file closes: the temp file is removed below
        index = {"shard": final.name, "samples": ids, "failures": failures}
        write_atomic(out / "index" / f"{plan.name}.json", json.dumps(index, indent=1).encode())
        os.replace(temporary, final)
    finally:
        temporary.unlink(missing_ok=True)
    return ids, failures


def _write_failures(out: Path) -> None:
    """failures.jsonl from every finished shard's index: complete after any sequence of runs."""
    lines = []
    for path in sorted((out / "index").glob("*.json")):
        if (out / f"{path.stem}.tar").exists():
            lines.extend(json.dumps(failure) for failure in json.loads(path.read_text())["failures"])
    write_atomic(out / "failures.jsonl", "".join(line + "\n" for line in lines).encode())


def write_atomic(path: Path, data: bytes) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_bytes(data)
    os.replace(temporary, path)


class _Results:
    """Processed samples in item order, from a worker pool or in-process."""

    def __init__(self, iterator: Iterator, pool: Any = None):
        self.iterator, self.pool = iterator, pool

    def __next__(self):
        return next(self.iterator)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()


def _process_all(source: Source, config: PrepConfig, items: list[Any], workers: int) -> _Results:
    if workers <= 1:
        _init_worker(source, config)
        return _Results(map(_process_item, items))
    # spawn, not fork: libigl and embree start threads, and forking a threaded parent can deadlock.
    pool = multiprocessing.get_context("spawn").Pool(workers, initializer=_init_worker, initargs=(source, config))
    return _Results(pool.imap(_process_item, items, chunksize=1), pool)


_worker: dict[str, Any] = {}


def _init_worker(source: Source, config: PrepConfig) -> None:
    _worker.update(source=source, config=config, cameras=config.cameras())


def _process_item(item: Any) -> tuple[str, dict | None, str]:
    """(id, sample, "") or (id, None, reason): a bad shape is a failure record, never a dead run."""
    source: Source = _worker["source"]
    shape_id = source.item_id(item)
    try:
        record = source.load(item)
        return shape_id, prepare_sample(record, _worker["config"], _worker["cameras"]), ""
    except ShapekilnError as error:
        return shape_id, None, str(error)
    except Exception as error:  # noqa: BLE001 — any per-shape error becomes one line in failures.jsonl
        reason = " ".join(f"{type(error).__name__}: {error}".split())
        return shape_id, None, reason[:500]
