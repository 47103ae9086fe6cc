"""The VQ-VAE trainer as a user runs it: real processes, real shards, accelerate's launcher."""

import importlib.util
import io
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import yaml

import numpy as np
import pytest
import torch
import webdataset as wds
from safetensors.torch import load_file

from shapekiln.data_prep.reader import ShapeShards, list_shards
from shapekiln.evaluate import evaluate_vqvae
from shapekiln.models.io import load_pretrained
from shapekiln.models.vqvae import VQVAE


def run(*args, check=True, **kwargs):
    result = subprocess.run([*map(str, args)], capture_output=True, text=True, **kwargs)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def shapekiln(*args, check=True):
    return run(sys.executable, "-m", "shapekiln.cli", *args, check=check)


def train_tiny(data, out, *extra, check=True):
    return shapekiln("train", "vqvae", "--config", "tiny", "--data", data, "--output-dir", out, "--no-progress", *extra, check=check)


def one_error_line(result):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("shapekiln: error:"), result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """A 4-step tiny run, checkpoints at steps 2 and 4."""
    out = tmp_path_factory.mktemp("run") / "vq"
    train_tiny(data, out)
    return out


def test_a_run_leaves_checkpoints_a_model_logs_and_its_config(trained):
    assert sorted(p.name for p in (trained / "checkpoints").iterdir()) == ["step-0000002", "step-0000004"]
    model = load_pretrained(VQVAE, trained / "model")
    assert model.config.resolution == 16 and bool(model.quantizer.initialized)
    assert list((trained / "logs").rglob("events.out.tfevents.*"))
    assert "codebook_size: 32" in (trained / "config.yaml").read_text()


def test_resume_continues_the_same_run_bit_for_bit(trained, data, tmp_path):
    resumed = tmp_path / "resumed"
    shutil.copytree(trained / "checkpoints" / "step-0000002", resumed / "checkpoints" / "step-0000002")
    result = train_tiny(data, resumed, "--resume", "latest")
    assert "resumed from" in result.stdout and "step 2" in result.stdout
    straight = load_file(trained / "checkpoints" / "step-0000004" / "model.safetensors")
    again = load_file(resumed / "checkpoints" / "step-0000004" / "model.safetensors")
    assert straight.keys() == again.keys()
    for key in straight:
        assert torch.equal(straight[key], again[key]), key
    ema_straight = load_file(trained / "model" / "diffusion_pytorch_model.safetensors")
    ema_again = load_file(resumed / "model" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(ema_straight[key], ema_again[key]) for key in ema_straight)


def test_eval_reports_reconstruction_metrics(trained, data, tmp_path):
    result = shapekiln("eval", "vqvae", "--ckpt", trained / "model", "--data", data, "--split", "train", "--limit", 5,
                       "--out", tmp_path / "m.json", "--no-progress")
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["shapes"] == 5 and "chamfer_l1" in result.stdout
    assert 0.0 <= metrics["iou"] <= 1.0 and 0.0 <= metrics["f_score"] <= 1.0 and metrics["chamfer_l1"] > 0
    assert 0.0 < metrics["codebook_usage"] <= 1.0 and 1.0 <= metrics["codebook_perplexity"] <= 32
    # Structure, beside the data's: the tiny set is built for its 16³ grid, so every shape is one piece with
    # every thin part (rebuilt from dataset.json) in place; an untrained model's reconstruction is not.
    assert metrics["data_one_piece"] == 1.0 and metrics["data_thin_parts"] > 0 and metrics["data_thin_parts_present"] == 1.0
    assert 0.0 <= metrics["reconstruction_one_piece"] <= 1.0 and 0.0 <= metrics["reconstruction_thin_parts_present"] <= 1.0
    assert metrics["reconstruction_thin_parts"] == metrics["data_thin_parts"]
    assert "reconstruction_one_piece" in result.stdout
    again = evaluate_vqvae(trained / "model", data, "train", limit=5, progress=False)
    assert again == metrics  # deterministic


def nan_copy(data: Path, out: Path) -> Path:
    """The same dataset with every TSDF replaced by NaN: what a corrupt dataset looks like to the trainer."""
    shutil.copytree(data, out)
    for shard in out.glob("*.tar"):
        samples = list(wds.DataPipeline(wds.SimpleShardList([str(shard)]), wds.tarfile_to_samples()))
        with wds.TarWriter(str(shard)) as writer:
            for sample in samples:
                grid = np.load(io.BytesIO(sample["sdf.npy"]))
                buffer = io.BytesIO()
                np.save(buffer, np.full_like(grid, np.nan))
                writer.write({**sample, "sdf.npy": buffer.getvalue()})
    return out


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(trained, data, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(trained / "checkpoints" / "step-0000002", run_dir / "checkpoints" / "step-0000002")
    before = (run_dir / "checkpoints" / "step-0000002" / "model.safetensors").read_bytes()
    result = train_tiny(nan_copy(data, tmp_path / "nan"), run_dir, "--resume", "latest", check=False)
    line = one_error_line(result)
    assert "NaN or infinite at step 2" in line and "step-0000002" in line
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-0000002"]
    assert (run_dir / "checkpoints" / "step-0000002" / "model.safetensors").read_bytes() == before
    assert not (run_dir / "model").exists()


@pytest.mark.parametrize(
    "setup, expected",
    [
        ("unknown_key", "unknown key 'codebook_entries'"),
        ("missing_key", "missing key 'codebook_size'"),
        ("wrong_type", "key 'batch_size': expected int"),
        ("other_resolution", "holds 16³ grids but the model expects 32³"),
        ("no_shards", "no shards found"),
        ("resume_other_model", "cannot resume"),
        ("resume_nothing", "no checkpoint in"),
        ("zero_steps", "--max-steps must be at least 1"),
        ("missing_config", "config file not found"),
        ("negative_loss_weight", "sign_weight must not be negative"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(setup, expected, data, trained, tmp_path):
    tiny = yaml.safe_load((trained / "config.yaml").read_text())
    args = ["--data", data, "--output-dir", tmp_path / "out", "--no-progress"]
    config = tmp_path / "config.yaml"
    if setup == "unknown_key":
        tiny["model"]["codebook_entries"] = 8
    elif setup == "missing_key":
        del tiny["model"]["codebook_size"]
    elif setup == "wrong_type":
        tiny["data"]["batch_size"] = "two"
    elif setup == "other_resolution":
        tiny["model"]["resolution"] = 32
    elif setup == "no_shards":
        (tmp_path / "empty").mkdir()
        args[1] = tmp_path / "empty"
    elif setup == "resume_other_model":
        tiny["model"]["base_channels"] = 16
        args += ["--resume", trained / "checkpoints" / "step-0000002"]
    elif setup == "resume_nothing":
        args += ["--resume", "latest"]
    elif setup == "zero_steps":
        args += ["--max-steps", 0]
    elif setup == "missing_config":
        config = tmp_path / "nowhere.yaml"
    elif setup == "negative_loss_weight":
        tiny["loss"]["sign_weight"] = -1.0
    if setup != "missing_config":
        config.write_text(yaml.safe_dump(tiny))
    result = shapekiln("train", "vqvae", "--config", config, *args, check=False)
    assert expected in one_error_line(result)
    assert not list((tmp_path / "out").glob("checkpoints/*")) and not (tmp_path / "out" / "model").exists()


def test_eval_of_another_resolution_or_model_is_one_line(trained, data, tmp_path):
    VQVAE(resolution=32, base_channels=8, norm_groups=4, codebook_size=8).save_pretrained(tmp_path / "vq32")
    line = one_error_line(shapekiln("eval", "vqvae", "--ckpt", tmp_path / "vq32", "--data", data, check=False))
    assert "holds 16³ grids but the model expects 32³" in line
    line = one_error_line(shapekiln("eval", "vqvae", "--ckpt", trained / "checkpoints", "--data", data, check=False))
    assert "not a saved model folder" in line


ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]


def test_two_processes_train_and_save_a_model_that_loads(data, tmp_path):
    out = tmp_path / "vq2"
    run(*ACCELERATE, "-m", "shapekiln.train.vqvae", "--config", "tiny", "--data", data, "--output-dir", out, "--no-progress", timeout=300)
    model = load_pretrained(VQVAE, out / "model")
    assert model.config.resolution == 16
    state = torch.load(out / "checkpoints" / "step-0000004" / "custom_checkpoint_0.pkl", weights_only=True)
    assert state == {"step": 4}
    assert (out / "checkpoints" / "step-0000004" / "random_states_1.pkl").exists()  # both ranks saved


def test_two_ranks_read_disjoint_training_data(data, tmp_path):
    """The trainer's own data stream (Run.batches) under two real processes: no shape on both ranks."""
    script = tmp_path / "ranks.py"
    script.write_text(textwrap.dedent(f"""
        import json, sys
        from shapekiln.config import load_config
        from shapekiln.train.common import Run
        from shapekiln.train.vqvae import VQVAEConfig

        config = load_config(VQVAEConfig, "tiny", "vqvae")
        config.data.shards, config.train.output_dir = {str(data)!r}, {str(tmp_path / "run")!r}
        run = Run("ranks", config, config.train)
        batches = run.batches(config.data, config.model.resolution, config.model.tau)
        ids = [shape_id for _ in range(3) for shape_id in next(batches)["id"]]  # less than an epoch
        with open({str(tmp_path)!r} + f"/rank-{{run.accelerator.process_index}}-of-{{run.accelerator.num_processes}}.json", "w") as f:
            json.dump(ids, f)
        run.finish()
    """))
    run(*ACCELERATE, script, timeout=300)
    first = json.loads((tmp_path / "rank-0-of-2.json").read_text())
    second = json.loads((tmp_path / "rank-1-of-2.json").read_text())
    assert len(first) == len(second) == 6 and not set(first) & set(second)
    train_ids = {sample["id"] for sample in ShapeShards(list_shards(data, "train"))}
    assert set(first) | set(second) <= train_ids



def test_reconstruction_loss_weights_the_band_near_the_surface():
    from shapekiln.train.vqvae import VQVAELossConfig, reconstruction_loss

    target = torch.tensor([-0.02, 0.03, 0.15, -0.15])  # two voxels in the 0.05 band, two outside it
    prediction = torch.tensor([0.01, 0.05, 0.10, -0.15])
    errors = torch.tensor([0.03, 0.02, 0.05, 0.0])
    assert torch.isclose(reconstruction_loss(prediction, target, VQVAELossConfig(surface_weight=0.0)), errors.mean())
    banded = VQVAELossConfig(surface_weight=10.0, surface_band=0.05)
    assert torch.isclose(reconstruction_loss(prediction, target, banded), (errors * torch.tensor([11.0, 11.0, 1.0, 1.0])).mean())


def test_sign_loss_costs_the_wrong_side_of_the_surface_within_the_band():
    import math

    from shapekiln.train.vqvae import VQVAELossConfig, reconstruction_loss

    # In the band: a voxel on the wrong side (−0.02 for +0.01), one right by a wide margin, one exactly on
    # the surface; outside it: a voxel on the wrong side that the sign term must ignore.
    target = torch.tensor([0.01, -0.03, 0.02, 0.15])
    prediction = torch.tensor([-0.02, -0.13, 0.0, -0.05])
    plain = VQVAELossConfig(surface_weight=0.0)
    signed = VQVAELossConfig(surface_weight=0.0, sign_weight=2.0, sign_scale=0.01)
    softplus = lambda x: math.log1p(math.exp(x))  # noqa: E731
    by_hand = 0.01 * (softplus(2.0) + softplus(-13.0) + softplus(0.0)) / 4  # outside the band: nothing
    extra = reconstruction_loss(prediction, target, signed) - reconstruction_loss(prediction, target, plain)
    assert math.isclose(float(extra), 2.0 * by_hand, rel_tol=1e-5)
    # One voxel: the wrong side costs about |prediction| more than L1 alone, the right side by 0.1 next to nothing.
    one = lambda p, t: float(reconstruction_loss(torch.tensor([p]), torch.tensor([t]), signed)  # noqa: E731
                             - reconstruction_loss(torch.tensor([p]), torch.tensor([t]), plain))
    assert 2.0 * 0.03 < one(-0.03, 0.01) < 2.0 * 0.0305 and one(0.11, 0.01) < 1e-5


def test_report_to_picks_the_trackers_and_a_missing_one_is_one_line(data, tmp_path):
    quiet = tmp_path / "quiet"
    train_tiny(data, quiet, "--report-to", "none", "--max-steps", "2")
    assert (quiet / "model").is_dir() and not list(quiet.rglob("events.out.tfevents.*"))
    assert "report_to: none" in (quiet / "config.yaml").read_text()
    if importlib.util.find_spec("wandb") is None:
        line = one_error_line(train_tiny(data, tmp_path / "wandb", "--report-to", "wandb", check=False))
        assert "--report-to wandb needs the wandb package" in line


def test_the_logged_loss_is_the_mean_over_processes(data, tmp_path):
    """Rank r logs r + 1: TensorBoard gets 1.5 from two processes, not rank 0's 1.0."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    script = tmp_path / "mean.py"
    script.write_text(textwrap.dedent(f"""
        import torch
        from shapekiln.config import load_config
        from shapekiln.train.common import Run
        from shapekiln.train.vqvae import VQVAEConfig

        config = load_config(VQVAEConfig, "tiny", "vqvae")
        config.data.shards, config.train.output_dir = {str(data)!r}, {str(tmp_path / "run")!r}
        run = Run("mean", config, config.train, progress=False)
        run.prepare(torch.nn.Linear(2, 2))
        for _ in run.steps():
            run.log({{"loss": torch.tensor(run.accelerator.process_index + 1.0), "lr": 0.5}}, 1)
            if run.state.step == 1:
                break
        run.finish()
    """))
    run(*ACCELERATE, script, timeout=300)
    accumulators = [EventAccumulator(str(folder)) for folder in {path.parent for path in (tmp_path / "run" / "logs").rglob("events.out.tfevents.*")}]
    (accumulator,) = [a for a in accumulators if "loss" in a.Reload().Tags()["scalars"]]
    assert [event.value for event in accumulator.Scalars("loss")][0] == pytest.approx(1.5)
    assert [event.value for event in accumulator.Scalars("lr")][0] == pytest.approx(0.5)


def test_the_cpu_is_forced_only_where_torch_sees_no_accelerator_at_all(monkeypatch):
    """Apple's MPS and Intel's XPU count as accelerators (accelerate then picks the device), not only CUDA."""
    from shapekiln.train.common import accelerator_present

    assert accelerator_present() == torch.cuda.is_available()  # these machines: no GPU of any kind
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)  # what torch reports on an Apple Silicon Mac
    assert accelerator_present()


def test_a_resume_positions_the_data_stream_without_replaying_it(data, tmp_path):
    """The stream is reseeded every checkpoint_every steps: a resume at step s skips s mod checkpoint_every
    steps' batches (not s), and still gets the batches the uninterrupted stream has there."""
    from shapekiln.config import load_config
    from shapekiln.train.common import Run
    from shapekiln.train.vqvae import VQVAEConfig

    config = load_config(VQVAEConfig, "tiny", "vqvae")
    config.data.shards, config.train.output_dir, config.train.checkpoint_every = str(data), str(tmp_path / "run"), 3

    def ids_from(step, count):
        run = Run("stream", config, config.train, progress=False)
        run.state.step = step
        batches = run.batches(config.data, config.model.resolution, config.model.tau)
        ids = [list(next(batches)["id"]) for _ in range(count)]
        return ids, run.skipped_batches

    straight, skipped = ids_from(0, 8)
    assert skipped == 0 and straight[0] != straight[3]  # a new segment, a new shuffle
    for step in (3, 5, 7):
        resumed, skipped = ids_from(step, 8 - step)
        assert skipped == step % 3 and resumed == straight[step:], step
    late, skipped = ids_from(300_002, 1)  # a late resume reads at most one segment's batches before its first step
    assert skipped == 300_002 % 3 == 2 and len(late[0]) == config.data.batch_size
