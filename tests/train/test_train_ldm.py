"""The latent diffusion trainer as a user runs it: prep → vqvae → encode → ldm → sample, in real processes."""

import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from shapekiln.sample.pipeline import ShapePipeline

from .test_train_vqvae import ACCELERATE, one_error_line, run, shapekiln


def train_ldm(latents, vqvae, out, *extra, check=True):
    return shapekiln("train", "ldm", "--config", "tiny", "--data", latents, "--vqvae", vqvae, "--output-dir", out, "--no-progress", *extra, check=check)


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    """A tiny dataset, a 2-step VQ-VAE, its latent shards, and a 4-step diffusion run."""
    root = tmp_path_factory.mktemp("ldm")
    shapekiln("prep", "synthetic", "--count", 40, "--config", "tiny", "--out", root / "data", "--no-progress")
    shapekiln("train", "vqvae", "--config", "tiny", "--data", root / "data", "--output-dir", root / "vqvae", "--max-steps", 2, "--no-progress")
    shapekiln("encode", "--vqvae", root / "vqvae" / "model", "--data", root / "data", "--out", root / "latents", "--no-progress")
    train_ldm(root / "latents", root / "vqvae" / "model", root / "ldm")
    return root


def test_a_run_saves_a_pipeline_that_samples(stages, tmp_path):
    run_dir = stages / "ldm"
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-0000002", "step-0000004"]
    pipeline = ShapePipeline.from_pretrained(run_dir / "pipeline")
    assert pipeline.modalities == ("text", "image", "partial")
    assert pipeline.scheduler.config.clip_sample is False
    events = list((run_dir / "logs").rglob("events.out.tfevents.*"))
    assert events
    # the tiny config trains both latent heads: their losses are logged beside the diffusion loss
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars = EventAccumulator(str(events[0]))
    scalars.Reload()
    assert {"loss/text_latent", "loss/image_latent", "loss/diffusion"} <= set(scalars.Tags()["scalars"])
    # ...and learn at their own rate (latent_head_lr twice lr in the tiny config), on the same schedule
    config = yaml.safe_load(open(run_dir / "config.yaml"))
    rates = {tag: [event.value for event in scalars.Scalars(tag)] for tag in ("lr", "lr/heads")}
    ratio = config["conditioning"]["latent_head_lr"] / config["train"]["lr"]
    assert rates["lr/heads"] == pytest.approx([ratio * rate for rate in rates["lr"]]) and ratio != 1.0
    assert "heads.image.proj.weight" in load_file(run_dir / "pipeline" / "conditioning" / "diffusion_pytorch_model.safetensors")
    result = shapekiln("sample", "--ckpt", run_dir / "pipeline", "--text", "a tall round table", "--n", 2, "--steps", 2,
                       "--out", tmp_path / "samples", "--no-progress")
    assert "2 shapes" in result.stdout
    assert (tmp_path / "samples" / "preview.png").is_file() and (tmp_path / "samples" / "sample_1.npy").is_file()


def test_resume_continues_the_same_run_bit_for_bit(stages, tmp_path):
    resumed = tmp_path / "resumed"
    shutil.copytree(stages / "ldm" / "checkpoints" / "step-0000002", resumed / "checkpoints" / "step-0000002")
    result = train_ldm(stages / "latents", stages / "vqvae" / "model", resumed, "--resume", "latest")
    assert "resumed from" in result.stdout
    straight = load_file(stages / "ldm" / "checkpoints" / "step-0000004" / "model.safetensors")
    again = load_file(resumed / "checkpoints" / "step-0000004" / "model.safetensors")
    assert straight.keys() == again.keys() and all(torch.equal(straight[key], again[key]) for key in straight)


def test_two_processes_train_and_save_a_pipeline_that_loads(stages, tmp_path):
    out = tmp_path / "ldm2"
    run(*ACCELERATE, "-m", "shapekiln.train.ldm", "--config", "tiny", "--data", stages / "latents", "--vqvae", stages / "vqvae" / "model",
        "--output-dir", out, "--no-progress", timeout=400)
    pipeline = ShapePipeline.from_pretrained(out / "pipeline")
    assert pipeline(text="a chair", steps=2, progress=False).shapes[0].tsdf.shape == (16, 16, 16)
    assert (out / "checkpoints" / "step-0000004" / "random_states_1.pkl").exists()


@pytest.mark.parametrize(
    "setup, expected",
    [
        ("tsdf_data", "holds TSDF shards, not latents"),
        ("other_vqvae", "encoded by another VQ-VAE"),
        ("missing_vqvae", "not a saved model folder"),
        ("unknown_modality", "modalities must be a non-empty subset"),
        ("bad_drop", "drop probabilities must be in [0, 1]"),
        ("clip_without_checkpoint", "open_clip towers need clip_model and clip_checkpoint"),
        ("bad_snr_gamma", "snr_gamma must be positive"),
        ("head_without_its_modality", "latent_heads must be conditioned modalities among text and image"),
        ("head_weight_without_heads", "latent_head_weight must be ≥ 0, and > 0 only with latent_heads"),
        ("head_lr_not_positive", "latent_head_lr must be positive, and set only with latent_heads"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(stages, tmp_path, setup, expected):
    config = yaml.safe_load(open(stages / "ldm" / "config.yaml"))
    data, vqvae = stages / "latents", stages / "vqvae" / "model"
    if setup == "tsdf_data":
        data = stages / "data"
    elif setup == "other_vqvae":
        other = tmp_path / "vq"
        shutil.copytree(vqvae, other)
        weights = load_file(other / "diffusion_pytorch_model.safetensors")
        from safetensors.torch import save_file

        save_file({key: value + 1.0 if value.is_floating_point() else value for key, value in weights.items()},
                  str(other / "diffusion_pytorch_model.safetensors"))
        vqvae = other
    elif setup == "missing_vqvae":
        vqvae = tmp_path / "nowhere"
    elif setup == "unknown_modality":
        config["conditioning"]["modalities"] = ["text", "smell"]
    elif setup == "bad_drop":
        config["conditioning"]["drop_text"] = 1.5
    elif setup == "clip_without_checkpoint":
        config["conditioning"]["text_tower"] = "open_clip"
    elif setup == "bad_snr_gamma":
        config["diffusion"]["snr_gamma"] = 0
    elif setup == "head_without_its_modality":
        config["conditioning"]["modalities"] = ["text", "partial"]
    elif setup == "head_weight_without_heads":
        config["conditioning"]["latent_heads"] = []
    elif setup == "head_lr_not_positive":
        config["conditioning"]["latent_head_lr"] = 0.0
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    result = shapekiln("train", "ldm", "--config", path, "--data", data, "--vqvae", vqvae, "--output-dir", tmp_path / "out",
                       "--no-progress", check=False)
    assert expected in one_error_line(result)
    assert not (tmp_path / "out" / "pipeline").exists()


def test_the_module_entry_point_speaks_like_the_cli(tmp_path):
    result = subprocess.run([sys.executable, "-m", "shapekiln.train.ldm", "--config", tmp_path / "missing.yaml"],
                            capture_output=True, text=True)
    assert "config file not found" in one_error_line(result)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weights_each_sample_by_min_snr_gamma_over_its_target_weight(prediction_type):
    from shapekiln.train.ldm import DiffusionConfig, diffusion_loss

    diffusion = DiffusionConfig(prediction_type=prediction_type, snr_gamma=5.0)
    schedule = diffusion.scheduler()
    alphas = schedule.alphas_cumprod.double()
    timesteps = torch.tensor([0, 300, 999])
    snr = alphas[timesteps] / (1 - alphas[timesteps])  # ≈ 1175, 1.3, 0.005: above, near and below γ
    assert snr[0] > 5 > snr[2]
    prediction = torch.zeros(3, 2, 4, 4, 4)
    target = torch.arange(1.0, 4.0).view(3, 1, 1, 1, 1).expand_as(prediction)  # per-sample MSE 1, 4, 9
    mse = torch.tensor([1.0, 4.0, 9.0], dtype=torch.float64)
    denominator = snr if prediction_type == "epsilon" else snr + 1
    expected = (torch.minimum(snr, torch.tensor(5.0, dtype=torch.float64)) / denominator * mse).mean()
    assert torch.isclose(diffusion_loss(prediction, target, timesteps, schedule, diffusion).double(), expected, rtol=1e-5)
    # without γ it is the plain MSE over every element
    plain = DiffusionConfig(prediction_type=prediction_type)
    assert torch.isclose(diffusion_loss(prediction, target, timesteps, schedule, plain), mse.mean().float())
    # epsilon: the low-noise sample (SNR ≫ γ) is weighted down to γ / SNR; the noisiest keeps weight 1
    if prediction_type == "epsilon":
        weights = torch.minimum(snr, torch.tensor(5.0, dtype=torch.float64)) / snr
        assert weights[0] < 0.01 and weights[2] == 1.0
