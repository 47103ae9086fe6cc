"""The `shapekiln` command end to end, as a user runs it: real processes, real shards, a real PNG."""

import json
import subprocess
import sys

import pytest
import torch
from PIL import Image

from shapekiln.data_prep.reader import ShapeShards, list_shards, make_loader


def shapekiln(*args, check=True):
    result = subprocess.run([sys.executable, "-m", "shapekiln.cli", *map(str, args)], capture_output=True, text=True)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def test_prep_synthetic_with_workers_is_identical_to_one_process_and_loads_back(tmp_path):
    two = shapekiln("prep", "synthetic", "--count", 24, "--config", "tiny", "--workers", 2, "--out", tmp_path / "two", "--preview", "--no-progress")
    assert "prep: 24 shapes written" in two.stdout and "0 skipped" in two.stdout
    shapekiln("prep", "synthetic", "--count", 24, "--config", "tiny", "--workers", 1, "--out", tmp_path / "one", "--no-progress")
    shards = sorted(p.name for p in (tmp_path / "two").glob("*.tar"))
    assert shards and shards == sorted(p.name for p in (tmp_path / "one").glob("*.tar"))
    for name in shards:
        assert (tmp_path / "two" / name).read_bytes() == (tmp_path / "one" / name).read_bytes()

    ids = []
    for split in ("train", "val", "test"):
        try:
            paths = list_shards(tmp_path / "two", split)
        except Exception:
            continue
        for batch in make_loader(ShapeShards(paths, views=True, resolution=16), batch_size=5):
            assert batch["tsdf"].dtype == torch.float32 and batch["tsdf"].shape[1:] == (1, 16, 16, 16)
            assert batch["views"].shape[1:] == (2, 4, 64, 64)
            ids.extend(batch["id"])
    assert sorted(ids) == [f"syn-{i:06d}" for i in range(24)]

    preview = Image.open(tmp_path / "two" / "preview.png")
    assert preview.width > 500 and preview.height >= 128 * 6


def test_show_writes_a_contact_sheet_and_reports_a_missing_dataset(tmp_path):
    shapekiln("prep", "synthetic", "--count", 6, "--config", "tiny", "--out", tmp_path / "data", "--no-progress")
    shown = shapekiln("show", tmp_path / "data", "--count", 3, "--out", tmp_path / "sheet.png")
    assert Image.open(tmp_path / "sheet.png").height == 3 * 128
    # Shapes built for the 16³ grid hold together, thin parts and all.
    assert "structure: 3 of 3 shown shapes are one piece" in shown.stdout and "thin parts present 100.0% of" in shown.stdout
    missing = shapekiln("show", tmp_path / "nothing", check=False)
    assert missing.returncode == 2 and missing.stderr.startswith("shapekiln: error: no shards found")


@pytest.mark.slow
def test_quickstart_runs_every_stage_and_writes_previews(tmp_path):
    """The whole chain at a reduced budget: prep → encode (general-32) → ldm → samples and a completion."""
    out = tmp_path / "qs"
    result = shapekiln("quickstart", "--out", out, "--count", 60, "--vqvae-steps", 4, "--ldm-steps", 4, "--samples", 1, "--no-progress")
    assert "quickstart: done" in result.stdout
    # The small config encodes with the shipped general VQ-VAE instead of training one.
    assert "VQ-VAE: general-32" in result.stdout and not (out / "vqvae").exists()
    assert json.loads((out / "quickstart.json").read_text())["vqvae"] == "general-32"
    meta = json.loads((out / "data" / "dataset.json").read_text())
    assert meta["config"]["resolution"] == 32 and meta["source_args"] == {"count": 60, "seed": 0, "resolution": 32, "part_voxels": 2.5}
    assert (out / "latents" / "latent_stats.json").is_file() and (out / "ldm" / "pipeline" / "pipeline.json").is_file()
    prompt_dirs = [path for path in (out / "samples").iterdir() if path.name != "completion"]
    assert len(prompt_dirs) == 4 and all((path / "sample_0.npy").is_file() for path in prompt_dirs)
    assert (out / "samples" / "completion" / "completion_0.npy").is_file()
    overview = Image.open(out / "preview.png")
    assert overview.height == 5 * 192  # four prompts and the completion, one row each
    again = shapekiln("quickstart", "--out", out, "--count", 60, "--vqvae-steps", 4, "--ldm-steps", 4, "--samples", 1, "--no-progress")
    assert "exists: skipping training" in again.stdout and "0 shapes written" in again.stdout


@pytest.mark.parametrize("signal_name", ["SIGINT", "SIGKILL"])
def test_a_killed_run_resumes_to_the_same_shards(tmp_path, signal_name):
    """Stop a real two-worker run once its first shard is on disk, rerun it, compare with a clean run."""
    import signal
    import time

    args = ["prep", "synthetic", "--count", 48, "--config", "tiny", "--shard-size", 4, "--workers", 2, "--no-progress"]
    # A job started in the background of a non-interactive shell (CI scripts do this) inherits SIGINT
    # ignored, and Python then leaves it ignored: give the run the default disposition a terminal gives.
    process = subprocess.Popen([sys.executable, "-m", "shapekiln.cli", *map(str, args), "--out", str(tmp_path / "run")],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while not list((tmp_path / "run").glob("*.tar")) and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(getattr(signal, signal_name))
    _, err = process.communicate(timeout=60)
    if signal_name == "SIGINT":
        assert process.returncode == 130 and "Traceback" not in err and "rerun resumes" in err
    finished = {p.name: p.read_bytes() for p in (tmp_path / "run").glob("*.tar")}
    assert finished, "the run was stopped before any shard was finished"

    resumed = shapekiln(*args, "--out", tmp_path / "run")
    assert "shards already done" in resumed.stdout and " 0 shards already done" not in resumed.stdout
    shapekiln(*args, "--out", tmp_path / "clean")
    clean = sorted(p.name for p in (tmp_path / "clean").glob("*.tar"))
    assert sorted(p.name for p in (tmp_path / "run").glob("*.tar")) == clean
    for name in clean:
        assert (tmp_path / "run" / name).read_bytes() == (tmp_path / "clean" / name).read_bytes()
    for name, data in finished.items():
        assert (tmp_path / "run" / name).read_bytes() == data
    assert not [p for p in (tmp_path / "run").iterdir() if p.name.endswith(".tmp")], "temporary files were left"
