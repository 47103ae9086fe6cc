"""`shapekiln encode`: latent shards beside the TSDFs, their statistics, determinism, resume and bad input.

One tiny prepared dataset (24 synthetic shapes, 16³) and one tiny untrained VQ-VAE serve the whole
module; the dataset is encoded once by the real command and the tests read what it wrote.
"""

import io
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from shapekiln.cli import main
from shapekiln.data_prep.reader import ShapeShards, list_shards, make_loader
from shapekiln.models.vqvae import VQVAE

LATENT_SHAPE = (3, 4, 4, 4)  # 16³ grid, three levels (two downsamplings), three latent channels


def command(*args):
    return [sys.executable, "-m", "shapekiln.cli", *map(str, args)]


def shapekiln(*args):
    result = subprocess.run(command(*args), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result


def tiny_vqvae(resolution=16):
    torch.manual_seed(0)
    return VQVAE(resolution=resolution, tau=0.2, base_channels=8, channel_mult=(1, 2, 4), codebook_size=32, norm_groups=4)


def shard_names(directory):
    return sorted(path.name for path in Path(directory).glob("*.tar"))


def tar_entries(path):
    """Every member of a tar shard, name → bytes (reading each one fully, so a truncated shard raises)."""
    with tarfile.open(path) as tar:
        return {member.name: tar.extractfile(member).read() for member in tar.getmembers()}


def npy(data):
    return np.load(io.BytesIO(data), allow_pickle=False)


def latents_of(entries):
    """The `latent.npy` entries of a shard, by sample key."""
    return {name.split(".", 1)[0]: npy(data) for name, data in entries.items() if name.endswith(".latent.npy")}


def files_of(directory):
    """Every file under a directory, relative path → bytes."""
    return {str(path.relative_to(directory)): path.read_bytes() for path in sorted(Path(directory).rglob("*")) if path.is_file()}


def encode_in_process(capsys, vqvae, data, out):
    assert main(["encode", "--vqvae", str(vqvae), "--data", str(data), "--out", str(out), "--no-progress"]) == 0
    return capsys.readouterr().out


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared") / "data"
    shapekiln("prep", "synthetic", "--count", 24, "--config", "tiny", "--out", out, "--no-progress")
    return out


@pytest.fixture(scope="module")
def vqvae(tmp_path_factory):
    """The saved folder and the model object that was saved, in eval mode."""
    model = tiny_vqvae()
    folder = tmp_path_factory.mktemp("vqvae") / "model"
    model.save_pretrained(folder)
    return SimpleNamespace(folder=folder, model=model.eval())


@pytest.fixture(scope="module")
def encoded(tmp_path_factory, data, vqvae):
    out = tmp_path_factory.mktemp("encoded") / "latents"
    result = shapekiln("encode", "--vqvae", vqvae.folder, "--data", data, "--out", out, "--no-progress")
    return SimpleNamespace(out=out, stdout=result.stdout)


def test_every_sample_keeps_its_entries_and_gains_the_encoders_latent(data, vqvae, encoded):
    assert shard_names(encoded.out) == shard_names(data) and len(shard_names(data)) >= 3
    assert "encode: 24 shapes encoded into" in encoded.stdout
    encoded_ids = []
    for name in shard_names(data):
        before, after = tar_entries(data / name), tar_entries(encoded.out / name)
        latents = latents_of(after)
        assert {key: value for key, value in after.items() if not key.endswith(".latent.npy")} == before
        keys = sorted({entry.split(".", 1)[0] for entry in before})
        assert sorted(latents) == keys

        tsdf = torch.stack([torch.from_numpy(npy(before[f"{key}.sdf.npy"]).astype(np.float32)) for key in keys])
        with torch.no_grad():
            expected = vqvae.model.encode(tsdf[:, None]).numpy()
        for key, latent in zip(keys, expected):
            assert latents[key].dtype == np.float32 and latents[key].shape == LATENT_SHAPE
            np.testing.assert_allclose(latents[key], latent, atol=1e-5, rtol=0)
        encoded_ids.extend(keys)
    assert sorted(encoded_ids) == [f"syn-{i:06d}" for i in range(24)]


def test_the_reader_yields_latents_beside_tsdfs(data, encoded):
    ids = []
    for split in ("train", "val", "test"):
        for batch in make_loader(ShapeShards(list_shards(encoded.out, split), resolution=16), batch_size=5):
            assert batch["latent"].dtype == torch.float32 and batch["latent"].shape[1:] == LATENT_SHAPE
            assert batch["tsdf"].shape[1:] == (1, 16, 16, 16)
            assert len(batch["latent"]) == len(batch["tsdf"]) == len(batch["id"])
            ids.extend(batch["id"])
    assert sorted(ids) == [f"syn-{i:06d}" for i in range(24)]
    assert "latent" not in next(iter(ShapeShards(list_shards(data, "train"))))  # TSDF shards have none


def test_latent_stats_are_the_train_splits_per_channel_moments(encoded):
    latents = [latent for name in shard_names(encoded.out) if name.startswith("train-")
               for latent in latents_of(tar_entries(encoded.out / name)).values()]
    values = np.stack(latents).astype(np.float64)  # (N, C, r, r, r)
    stats = json.loads((encoded.out / "latent_stats.json").read_text())
    assert stats["split"] == "train" and stats["values_per_channel"] == len(latents) * 64
    np.testing.assert_allclose(stats["mean"], values.mean(axis=(0, 2, 3, 4)), rtol=1e-6)
    np.testing.assert_allclose(stats["std"], values.std(axis=(0, 2, 3, 4)), rtol=1e-6)


def test_encoding_twice_gives_identical_files(capsys, data, vqvae, encoded, tmp_path):
    encode_in_process(capsys, vqvae.folder, data, tmp_path / "again")
    again, first = files_of(tmp_path / "again"), files_of(encoded.out)
    assert sorted(again) == sorted(first)
    for name, content in first.items():
        assert again[name] == content, name


def test_a_rerun_rewrites_only_the_missing_shard(capsys, data, vqvae, encoded, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(encoded.out, run)  # copy2: the shards keep their modification times
    missing = run / "train-000000.tar"
    original = missing.read_bytes()
    missing.unlink()
    stale = run / ".train-000000.tar.999.tmp"  # what a run killed while writing that shard leaves
    stale.write_bytes(original[: len(original) // 3])
    kept = {path.name: path.stat().st_mtime_ns for path in run.glob("*.tar")}

    summary = encode_in_process(capsys, vqvae.folder, data, run)

    samples = len(latents_of(tar_entries(encoded.out / missing.name)))
    assert f"{samples} shapes encoded into 1 shards, {len(kept)} shards already done" in summary
    assert missing.read_bytes() == original
    assert {name: (run / name).stat().st_mtime_ns for name in kept} == kept
    assert not stale.exists() and not list(run.rglob("*.tmp"))
    assert files_of(run) == files_of(encoded.out)


def test_dataset_json_describes_the_input_and_the_model(data, encoded):
    source, description = json.loads((data / "dataset.json").read_text()), json.loads((encoded.out / "dataset.json").read_text())
    assert {key: description[key] for key in source} == source
    assert description["latents"]["shape"] == list(LATENT_SHAPE)
    assert description["latents"]["vqvae_config"]["resolution"] == 16 and len(description["latents"]["vqvae"]) == 64


def test_a_rerun_with_another_model_is_refused(capsys, data, encoded, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(encoded.out, run)
    (run / "train-000000.tar").unlink()
    torch.manual_seed(1)
    VQVAE(resolution=16, tau=0.2, base_channels=8, channel_mult=(1, 2, 4), codebook_size=32, norm_groups=4).save_pretrained(tmp_path / "other")
    assert main(["encode", "--vqvae", str(tmp_path / "other"), "--data", str(data), "--out", str(run), "--no-progress"]) == 2
    assert "made from another source or config" in capsys.readouterr().err
    assert not (run / "train-000000.tar").exists()  # no shard of the other model's latents joined the set


# Bad input, as a user types it. Each case builds its arguments in its own folder and returns them
# with the --out it names and a phrase the error must contain.


def missing_config(case, base):
    (case / "empty").mkdir()
    return ["--vqvae", case / "empty", "--data", base.data, "--out", case / "out"], case / "out", "no config.json"


def another_model_class(case, base):
    from diffusers import UNet2DModel

    UNet2DModel(sample_size=8, block_out_channels=(8, 8), layers_per_block=1, norm_num_groups=4,
                down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D")).save_pretrained(case / "unet")
    return ["--vqvae", case / "unet", "--data", base.data, "--out", case / "out"], case / "out", "UNet2DModel model, not a VQVAE"


def another_resolution(case, base):
    tiny_vqvae(resolution=32).save_pretrained(case / "vqvae32")
    return ["--vqvae", case / "vqvae32", "--data", base.data, "--out", case / "out"], case / "out", "holds 16³ grids but the model expects 32³"


def unprepared_data(case, base):
    (case / "loose").mkdir()  # shards without the dataset.json that `prep` writes
    shutil.copy(base.data / "train-000000.tar", case / "loose")
    return ["--vqvae", base.vqvae, "--data", case / "loose", "--out", case / "out"], case / "out", "no dataset.json"


def data_is_out(case, base):
    shutil.copytree(base.data, case / "data")
    return ["--vqvae", base.vqvae, "--data", case / "data", "--out", case / "data"], case / "data", "--out must differ from --data"


def data_already_encoded(case, base):
    return ["--vqvae", base.vqvae, "--data", base.encoded, "--out", case / "out"], case / "out", "already holds latent shards"


def out_under_a_file(case, base):
    (case / "file").write_text("not a directory")
    return ["--vqvae", base.vqvae, "--data", base.data, "--out", case / "file" / "out"], case / "file" / "out", "cannot write to output directory"


def zero_batch_size(case, base):
    args = ["--vqvae", base.vqvae, "--data", base.data, "--out", case / "out", "--batch-size", 0]
    return args, case / "out", "--batch-size must be at least 1"


BAD_INPUTS = [missing_config, another_model_class, another_resolution, unprepared_data, data_is_out,
              data_already_encoded, out_under_a_file, zero_batch_size]


@pytest.fixture(scope="module")
def bad_runs(tmp_path_factory, data, vqvae, encoded):
    """Every bad-input command, started together: each process spends ~5 s importing torch and
    diffusers, so running them side by side keeps the module quick. Case name → outcome."""
    base = SimpleNamespace(data=data, vqvae=vqvae.folder, encoded=encoded.out)
    started = {}
    for case in BAD_INPUTS:
        folder = tmp_path_factory.mktemp(case.__name__)
        args, out, phrase = case(folder, base)
        before = files_of(out) if out.is_dir() else {}
        process = subprocess.Popen(command("encode", *args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        started[case.__name__] = (process, out, phrase, before)
    runs = {}
    for name, (process, out, phrase, before) in started.items():
        stdout, stderr = process.communicate(timeout=300)
        runs[name] = SimpleNamespace(returncode=process.returncode, stdout=stdout, stderr=stderr, out=out, phrase=phrase, before=before)
    return runs


@pytest.mark.parametrize("case", [case.__name__ for case in BAD_INPUTS])
def test_bad_input_is_one_line_and_exit_2_with_nothing_half_written(bad_runs, case):
    run = bad_runs[case]
    lines = run.stderr.splitlines()
    assert run.returncode == 2, run.stderr
    assert len(lines) == 1 and lines[0].startswith("shapekiln: error: "), run.stderr
    assert run.phrase in lines[0] and "Traceback" not in run.stderr
    if run.out.is_dir():
        for shard in run.out.glob("*.tar"):
            tar_entries(shard)  # raises on a truncated shard
        assert not list(run.out.rglob("*.tmp"))
        assert files_of(run.out) == run.before  # a refused run changes nothing it found
