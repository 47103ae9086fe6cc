"""The view-prior trainer as a user runs it: real processes on real tiny shards."""

import shutil
import sys

import pytest
import torch
import webdataset as wds
import yaml
from safetensors.torch import load_file

from shapekiln.models.priors import ViewPrior, load_prior, sds_loss

from .test_train_vqvae import one_error_line, run, shapekiln


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """A 4-step tiny run through the module entry point (as `accelerate launch -m` runs it)."""
    out = tmp_path_factory.mktemp("run") / "prior"
    run(sys.executable, "-m", "shapekiln.train.view_prior", "--config", "tiny", "--data", data, "--output-dir", out, "--no-progress")
    return out


def test_a_run_leaves_checkpoints_logs_with_images_and_a_prior_that_loads(trained):
    assert sorted(p.name for p in (trained / "checkpoints").iterdir()) == ["step-0000002", "step-0000004"]
    assert "text_dropout: 0.1" in (trained / "config.yaml").read_text()

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = [p for p in (trained / "logs").rglob("events.out.tfevents.*") if p.parent.name == "view_prior"]
    accumulator = EventAccumulator(str(events))
    accumulator.Reload()
    assert "samples/preview" in accumulator.Tags()["images"]
    assert {"loss", "loss/noise", "loss/view_head", "lr/head"} <= set(accumulator.Tags()["scalars"])  # the tiny config has a view head
    rates = {tag: [event.value for event in accumulator.Scalars(tag)] for tag in ("lr", "lr/head")}
    config = yaml.safe_load((trained / "config.yaml").read_text())
    ratio = config["conditioning"]["view_head_lr"] / config["train"]["lr"]  # the head's own rate, on the same schedule
    assert ratio != 1.0 and rates["lr/head"] == pytest.approx([ratio * rate for rate in rates["lr"]])
    preview = accumulator.Images("samples/preview")[-1]
    assert (preview.height, preview.width) == (2 * 64, 2 * 64)  # 2 prompts × 2 azimuths of the tiny config

    prior = load_prior(trained / "model")
    assert isinstance(prior, ViewPrior) and prior.image_size == 16 and prior.text_conditioned and prior.camera_conditioned
    assert prior.view_head is not None
    # The saved model is the EMA of the trained weights: it differs from the last training state.
    state = load_file(trained / "checkpoints" / "step-0000004" / "model.safetensors")
    assert not torch.equal(state["unet.conv_in.weight"], prior.unet.conv_in.weight.detach())
    rgb = torch.rand(1, 3, 64, 64, requires_grad=True)
    out = sds_loss(prior, rgb, prior.encode_text(["a tall lamp"]), guidance_scale=5.0, t=torch.tensor([300]),
                   cameras=torch.tensor([[30.0, 20.0]]))
    out.loss.backward()
    assert torch.isfinite(rgb.grad).all() and rgb.grad.abs().sum() > 0


def test_the_cli_trains_a_text_less_prior_on_random_backgrounds(data, trained, tmp_path):
    config = yaml.safe_load((trained / "config.yaml").read_text())
    config["model"]["text"], config["model"]["camera"], config["conditioning"]["background"] = None, False, "random"
    config["model"]["view_head"], config["conditioning"]["view_head_lr"] = False, None  # a view head reads the text
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    shapekiln("train", "view-prior", "--config", tmp_path / "config.yaml", "--data", data, "--output-dir", tmp_path / "out",
              "--max-steps", 2, "--no-progress")
    prior = load_prior(tmp_path / "out" / "model")
    assert not prior.text_conditioned and not prior.camera_conditioned and prior.background == "random"


def strip_views(data, out):
    """The same dataset without rendered views: shards of the wrong kind for this trainer."""
    shutil.copytree(data, out)
    for shard in out.glob("*.tar"):
        samples = list(wds.DataPipeline(wds.SimpleShardList([str(shard)]), wds.tarfile_to_samples()))
        with wds.TarWriter(str(shard)) as writer:
            for sample in samples:
                writer.write({key: value for key, value in sample.items() if not key.startswith("view_") and key != "cameras.json"})
    (out / "dataset.json").unlink()  # as a bare folder of shards: nothing to tell up front
    return out


@pytest.mark.parametrize(
    "setup, expected",
    [
        ("unknown_key", "unknown key 'channels'"),
        ("missing_key", "missing key 'camera'"),
        ("wrong_text", "key 'text': expected one of ['minilm']"),
        ("head_without_text", "view_head reads the text"),
        ("head_lr_without_head", "view_head_lr is set but model.view_head is false"),
    ],
)
def test_a_bad_config_is_one_line_and_exit_2(setup, expected, trained, tmp_path, capsys):
    """In-process through main(argv), the module's CLI (a config error stops before any model or process set-up)."""
    from shapekiln.train.view_prior import main

    config = yaml.safe_load((trained / "config.yaml").read_text())
    if setup == "unknown_key":
        config["model"]["channels"] = 8
    elif setup == "missing_key":
        del config["model"]["camera"]
    elif setup == "wrong_text":
        config["model"]["text"] = "bert"
    elif setup == "head_without_text":
        config["model"]["text"] = None
    elif setup == "head_lr_without_head":
        config["model"]["view_head"] = False
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    assert main(["--config", str(tmp_path / "config.yaml"), "--output-dir", str(tmp_path / "out"), "--no-progress"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("shapekiln: error:") and expected in lines[0], lines
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "setup, expected",
    [
        ("no_views", "have no cameras.json entries"),
        ("no_shards", "no shards found"),
        ("resume_nothing", "no checkpoint in"),
    ],
)
def test_bad_data_or_resume_is_one_line_and_exit_2(setup, expected, data, tmp_path):
    args = ["--data", data, "--output-dir", tmp_path / "out", "--no-progress"]
    if setup == "no_views":
        args[1] = strip_views(data, tmp_path / "no-views")
    elif setup == "no_shards":
        (tmp_path / "empty").mkdir()
        args[1] = tmp_path / "empty"
    elif setup == "resume_nothing":
        args += ["--resume", "latest"]
    result = run(sys.executable, "-m", "shapekiln.train.view_prior", "--config", "tiny", *args, check=False)
    assert expected in one_error_line(result)
    assert not list((tmp_path / "out").glob("checkpoints/*")) and not (tmp_path / "out" / "model").exists()
