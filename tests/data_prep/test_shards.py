"""The prep run: shards on disk, determinism, resume, array jobs and every kind of bad input."""

import dataclasses
import json
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import trimesh

from shapekiln.cli import main
from shapekiln.config import from_dict
from shapekiln.data_prep.process import PrepConfig
from shapekiln.data_prep.shards import plan_shards, run_prep
from shapekiln.data_prep.sources.base import ShapeRecord
from shapekiln.errors import ShapekilnError

CONFIG = from_dict(PrepConfig, {"resolution": 16, "views": 2, "view_size": 32, "shard_size": 3, "val_fraction": 0.0, "test_fraction": 0.0, "max_faces": 2000}, "test")


def good_mesh(k: int) -> trimesh.Trimesh:
    if k % 2:
        return trimesh.creation.box(extents=(1.0, 0.5 + 0.1 * (k % 5), 0.7))
    return trimesh.creation.icosphere(subdivisions=2, radius=0.5 + 0.05 * (k % 3))


def flat_mesh() -> trimesh.Trimesh:
    return trimesh.Trimesh([[0, 0, 0], [1, 0, 0], [0, 1, 0], [1, 1, 0]], [[0, 1, 2], [1, 3, 2]])


def nan_mesh() -> trimesh.Trimesh:
    mesh = trimesh.creation.box()
    vertices = mesh.vertices.copy()
    vertices[0, 0] = np.nan
    return trimesh.Trimesh(vertices, mesh.faces, process=False)


class ListSource:
    """A source over meshes built in the test; `builders[k]` may raise, like a corrupt file does."""

    name = "list"

    def __init__(self, builders, interrupt_at=None):
        self.builders, self.interrupt_at = builders, interrupt_at

    def items(self):
        return iter(range(len(self.builders)))

    def item_id(self, item):
        return f"shape-{item:03d}"

    def load(self, item):
        if item == self.interrupt_at:
            raise KeyboardInterrupt
        mesh = self.builders[item]()
        return ShapeRecord(self.item_id(item), mesh, [f"shape number {item}"], category="thing", source="list")


def good_source(count=10, **kwargs):
    return ListSource([lambda k=k: good_mesh(k) for k in range(count)], **kwargs)


def read_tar(path):
    with tarfile.open(path) as tar:
        return {member.name: tar.extractfile(member).read() for member in tar.getmembers()}


def test_shards_hold_every_entry_of_the_contract(tmp_path):
    summary = run_prep(good_source(7), CONFIG, tmp_path, progress=False)
    assert (summary.written, summary.failed, summary.shards_written) == (7, 0, 3)
    assert sorted(p.name for p in tmp_path.glob("*.tar")) == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    entries = read_tar(tmp_path / "train-000000.tar")
    assert sorted(entries) == sorted(
        f"shape-00{k}.{name}" for k in range(3) for name in ("sdf.npy", "view_0.png", "view_1.png", "cameras.json", "caption.txt", "meta.json")
    )
    meta = json.loads(entries["shape-000.meta.json"])
    assert meta["id"] == "shape-000" and meta["resolution"] == 16 and meta["flags"]["watertight"] is True
    transform = np.array(meta["transform"])
    # Normalization: the sphere of radius 0.5 maps its longest side onto [-0.8, 0.8].
    assert transform[0, 0] == pytest.approx(0.8 / 0.5, rel=1e-3)
    cameras = json.loads(entries["shape-000.cameras.json"])
    assert len(cameras) == 2 and np.array(cameras[0]["world_to_camera"]).shape == (4, 4)
    assert json.loads((tmp_path / "dataset.json").read_text())["config"]["resolution"] == 16
    assert (tmp_path / "failures.jsonl").read_text() == ""


def test_same_input_gives_byte_identical_shards(tmp_path):
    run_prep(good_source(5), CONFIG, tmp_path / "a", progress=False)
    run_prep(good_source(5), CONFIG, tmp_path / "b", progress=False)
    for shard in sorted((tmp_path / "a").glob("*.tar")):
        assert shard.read_bytes() == (tmp_path / "b" / shard.name).read_bytes()


def test_interrupted_run_resumes_without_redoing_finished_shards(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        run_prep(good_source(8, interrupt_at=4), CONFIG, tmp_path / "run", progress=False)
    finished = sorted((tmp_path / "run").glob("*.tar"))
    assert [p.name for p in finished] == ["train-000000.tar"]  # shard 1 (items 3-5) was cut short
    assert not list((tmp_path / "run").glob(".*tmp")), "a temporary shard was left behind"
    before = {p.name: p.stat().st_mtime_ns for p in finished}

    summary = run_prep(good_source(8), CONFIG, tmp_path / "run", progress=False)
    assert summary.shards_done_before == 1 and summary.shards_written == 2 and summary.written == 5
    assert {p.name: p.stat().st_mtime_ns for p in finished} == before
    run_prep(good_source(8), CONFIG, tmp_path / "whole", progress=False)
    for shard in (tmp_path / "whole").glob("*.tar"):
        assert shard.read_bytes() == (tmp_path / "run" / shard.name).read_bytes()
    again = run_prep(good_source(8), CONFIG, tmp_path / "run", progress=False)
    assert again.shards_written == 0 and again.shards_done_before == 3


def test_array_job_slices_add_up_to_the_whole_run(tmp_path):
    for index in range(2):
        run_prep(good_source(8), CONFIG, tmp_path / "sliced", num_shards=2, shard_index=index, progress=False)
    run_prep(good_source(8), CONFIG, tmp_path / "whole", progress=False)
    whole = sorted(p.name for p in (tmp_path / "whole").glob("*.tar"))
    assert sorted(p.name for p in (tmp_path / "sliced").glob("*.tar")) == whole
    for name in whole:
        assert (tmp_path / "sliced" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()


def corrupt():
    raise ValueError("file does not start with a valid header\nsecond line")


def huge():
    return trimesh.creation.icosphere(subdivisions=5)  # 20480 faces, over max_faces=2000


def test_bad_shapes_are_skipped_with_one_line_each(tmp_path):
    builders = [lambda: good_mesh(0), corrupt, lambda: trimesh.Trimesh(), nan_mesh, flat_mesh, huge, lambda: good_mesh(1)]
    # thin_shell 0: with a shell the flat mesh is a sheet that gets volume (tests/data_prep/test_thin_shell.py).
    summary = run_prep(ListSource(builders), dataclasses.replace(CONFIG, thin_shell=0), tmp_path, progress=False)
    assert summary.written == 3 and summary.failed == 4  # the huge sphere is decimated, not skipped
    failures = [json.loads(line) for line in (tmp_path / "failures.jsonl").read_text().splitlines()]
    reasons = {failure["id"]: failure["reason"] for failure in failures}
    assert set(reasons) == {"shape-001", "shape-002", "shape-003", "shape-004"}
    assert reasons["shape-001"] == "ValueError: file does not start with a valid header second line"
    assert "empty mesh" in reasons["shape-002"]
    assert "NaN" in reasons["shape-003"]
    assert "zero-volume" in reasons["shape-004"]
    entries = {}
    for shard in tmp_path.glob("*.tar"):
        entries.update(read_tar(shard))
    meta = json.loads(entries["shape-005.meta.json"])
    assert meta["flags"]["decimated_from_faces"] == 20480 and meta["faces"] <= 2000


def test_over_face_limit_skip_says_so(tmp_path):
    config = from_dict(PrepConfig, {**vars(CONFIG), "over_face_limit": "skip"}, "test")
    run_prep(ListSource([huge, lambda: good_mesh(0)]), config, tmp_path, progress=False)
    (failure,) = [json.loads(line) for line in (tmp_path / "failures.jsonl").read_text().splitlines()]
    assert failure == {"id": "shape-000", "reason": "20480 faces is over the limit of 2000 (over_face_limit: skip)"}


def test_unwritable_output_and_mixed_configs_are_run_level_errors(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(ShapekilnError, match="cannot write to output directory"):
        run_prep(good_source(2), CONFIG, blocker / "out", progress=False)
    run_prep(good_source(2), CONFIG, tmp_path / "out", progress=False)
    other = from_dict(PrepConfig, {**vars(CONFIG), "resolution": 32}, "test")
    with pytest.raises(ShapekilnError, match="another source or config"):
        run_prep(good_source(2), other, tmp_path / "out", progress=False)


def test_splits_are_deterministic_from_the_id():
    config = from_dict(PrepConfig, {**vars(CONFIG), "val_fraction": 0.2, "test_fraction": 0.2}, "test")
    plans = plan_shards(good_source(60), config)
    splits = {plan.split for plan in plans}
    assert splits == {"train", "val", "test"}
    again = plan_shards(good_source(60), config)
    assert [(p.name, p.items) for p in plans] == [(p.name, p.items) for p in again]
    # A shape keeps its split when the set grows.
    small = {item: plan.split for plan in plan_shards(good_source(30), config) for item in plan.items}
    large = {item: plan.split for plan in plans for item in plan.items}
    assert all(large[item] == split for item, split in small.items())


def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    assert main(["prep", "folder", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("shapekiln: error:") and "missing" in err
    assert main(["prep", "synthetic", "--out", str(tmp_path / "o"), "--config", "huge"]) == 2
    assert "no data config named 'huge'" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("resolution: 16\nvoxels: 3\n")
    assert main(["prep", "synthetic", "--out", str(tmp_path / "o"), "--config", str(bad)]) == 2
    assert "unknown key 'voxels'" in capsys.readouterr().err


def test_console_command_prints_no_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "shapekiln.cli", "prep", "synthetic", "--out", str(tmp_path / "o"), "--count", "0"],
        capture_output=True, text=True,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == "shapekiln: error: --count must be at least 1, got 0"
