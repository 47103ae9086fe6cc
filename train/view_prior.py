"""Train the view prior: the embedded 2D text-to-image diffusion model that SDS refinement distills from.

    accelerate launch --multi_gpu --num_processes 2 -m shapekiln.train.view_prior --config configs/view_prior/small.yaml
    shapekiln train view-prior --config small            # one process

Data: one rendered view per shape and step (RGBA from the prepared shards), composited over the
background, resized to image_size, its caption, and its camera's azimuth/elevation. Loss: ε-MSE at random
timesteps of diffusers' DDPM schedule (plus, with model.view_head, view_head_weight times the MSE of the
view head's estimate to the clean view). Captions are replaced by the learned empty text with probability
text_dropout (and cameras by the unknown view with camera_dropout), so the same model serves both branches
of classifier-free guidance. The result is a ViewPrior folder (`OUTPUT_DIR/model`) that
`models.priors.load_prior` loads.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from shapekiln.config import load_config
from shapekiln.errors import ShapekilnError
from shapekiln.data_prep.reader import dataset_config
from shapekiln.models.encoders import rgba_to_rgb
from shapekiln.models.priors import ViewPrior, azimuth_elevation
from shapekiln.train.common import DataConfig, Run, TrainConfig, parameter_groups
from shapekiln.train.options import add_train_arguments, apply_train_arguments, time_limit_seconds


@dataclass
class ViewPriorModelConfig:
    """The UNet2DConditionModel and its conditions (ViewPrior.create's arguments)."""

    image_size: int = 32
    block_out_channels: tuple[int, ...] = (32, 64, 128)
    layers_per_block: int = 1
    attention: tuple[bool, ...] = (False, True, True)  # cross-attention (with self-attention) per level
    head_dim: int = 32
    norm_groups: int = 8
    text: Literal["minilm"] | None = "minilm"  # null: an unconditional prior
    text_tokens: int = 16
    camera: bool = True
    view_head: bool = False  # a ViewHead's estimate of the view from text and camera as 3 more input channels

    def validate(self) -> None:
        if self.view_head and self.text is None:
            raise ValueError("view_head reads the text: it needs text (set view_head: false for a text-less prior)")


@dataclass
class ViewPriorConditioningConfig:
    text_dropout: float = 0.1  # probability that a caption is replaced by the learned empty text
    camera_dropout: float = 0.1  # probability that a camera is replaced by the unknown view
    background: Literal["white", "random"] = "white"
    view_head_weight: float = 1.0  # weight of the view head's MSE to the clean view, beside the ε-MSE
    view_head_lr: float | None = None  # the view head's own learning rate (None: train.lr), as the LDM's latent_head_lr

    def validate(self) -> None:
        if not (0.0 <= self.text_dropout <= 1.0 and 0.0 <= self.camera_dropout <= 1.0):
            raise ValueError("text_dropout and camera_dropout must be in [0, 1]")
        if self.view_head_weight < 0.0:
            raise ValueError(f"view_head_weight must not be negative, got {self.view_head_weight}")
        if self.view_head_lr is not None and self.view_head_lr <= 0.0:
            raise ValueError(f"view_head_lr must be positive, got {self.view_head_lr}")


@dataclass
class ViewPriorDiffusionConfig:
    """diffusers DDPMScheduler arguments: Improved DDPM's cosine schedule by default (DDPM's linear 1e-4 → 0.02
    with "linear"; beta_start and beta_end are unused by the cosine one)."""

    num_train_timesteps: int = 1000
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "squaredcos_cap_v2"
    beta_start: float = 1.0e-4
    beta_end: float = 0.02


@dataclass
class ViewPriorSamplingConfig:
    """The preview grid logged while training: one row per prompt, one column per azimuth."""

    preview_prompts: tuple[str, ...] = ("a tall lamp", "a table with four legs")
    preview_azimuths: tuple[float, ...] = (0.0, 90.0, 180.0, 270.0)
    preview_elevation: float = 20.0
    preview_steps: int = 25
    guidance: float = 3.0


@dataclass
class ViewPriorConfig:
    model: ViewPriorModelConfig = field(default_factory=ViewPriorModelConfig)
    conditioning: ViewPriorConditioningConfig = field(default_factory=ViewPriorConditioningConfig)
    diffusion: ViewPriorDiffusionConfig = field(default_factory=ViewPriorDiffusionConfig)
    sampling: ViewPriorSamplingConfig = field(default_factory=ViewPriorSamplingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> None:
        if self.conditioning.view_head_lr is not None and not self.model.view_head:
            raise ValueError("conditioning.view_head_lr is set but model.view_head is false")


def build_prior(config: ViewPriorConfig) -> ViewPrior:
    model, diffusion = config.model, config.diffusion
    return ViewPrior.create(
        image_size=model.image_size, block_out_channels=model.block_out_channels, layers_per_block=model.layers_per_block,
        attention=model.attention, head_dim=model.head_dim, norm_groups=model.norm_groups, text=model.text,
        text_tokens=model.text_tokens, camera=model.camera, background=config.conditioning.background,
        num_train_timesteps=diffusion.num_train_timesteps, beta_schedule=diffusion.beta_schedule,
        beta_start=diffusion.beta_start, beta_end=diffusion.beta_end, view_head=model.view_head,
    )


def view_dataset(shards: str) -> tuple[int | None, float]:
    """The prepared dataset's grid size and truncation (Run.batches checks them against these, since this
    trainer reads views, not grids); views must have been rendered."""
    prepared = dataset_config(shards)
    if prepared is None:
        return None, 0.0  # a glob or list of shards: nothing to check up front
    try:
        views = int(prepared["views"])
    except (ValueError, KeyError, TypeError):
        raise ShapekilnError(f"{Path(shards) / 'dataset.json'} is not a shapekiln dataset description") from None
    if views < 1:
        raise ShapekilnError(f"{shards} holds no rendered views; prepare the data with views (configs/data/*.yaml: views)")
    return int(prepared["resolution"]), float(prepared["tau"])


def next_batch(batches, shards: str) -> dict:
    try:
        return next(batches)
    except KeyError as missing:  # the reader's view entries
        raise ShapekilnError(f"the shards in {shards} have no {missing.args[0]} entries: the view prior needs shards with rendered views") from None


def training_images(views: torch.Tensor, background: str, image_size: int) -> torch.Tensor:
    """RGBA uint8 (B, 4, H, W) → RGB (B, 3, S, S) in [0, 1] over a white or a random solid background."""
    if background == "white":
        rgb = rgba_to_rgb(views, 1.0)
    else:
        rgb = rgba_to_rgb(views, torch.rand(views.shape[0], 3, 1, 1))
    return F.interpolate(rgb, size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False)


def train(config: ViewPriorConfig, resume: str | None = None, progress: bool = True,
          time_limit: float | None = None) -> Path:
    """Train to config.train.max_steps; returns the folder of the saved (EMA) prior."""
    run = Run("view_prior", config, config.train, resume, progress=progress, time_limit=time_limit)
    resolution, tau = view_dataset(config.data.shards)
    prior = build_prior(config)
    noise_schedule = prior.scheduler
    model, optimizer, scheduler = run.prepare(prior, parameter_groups(prior, prior.view_head, config.conditioning.view_head_lr))
    if prior.text_tower is not None:
        prior.text_tower.to(run.device)
    batches = run.batches(config.data, resolution, tau, views="one")
    accelerator = run.accelerator
    conditioning = config.conditioning
    samples_per_step = config.data.batch_size * config.train.gradient_accumulation_steps * accelerator.num_processes

    for _ in run.steps():
        for _ in range(config.train.gradient_accumulation_steps):
            batch = next_batch(batches, config.data.shards)
            rgb = training_images(batch["views"][:, 0], conditioning.background, config.model.image_size)  # the reader drew one view
            x0 = prior.encode_images(rgb.to(run.device))  # (B, 3, S, S) in [-1, 1]
            cameras = azimuth_elevation(batch["world_to_camera"][:, 0]).to(run.device)  # (B, 2) degrees
            text = prior.encode_text(batch["caption"]) if prior.text_conditioned else None
            size = x0.shape[0]
            drop_text, drop_camera = torch.rand(size) < conditioning.text_dropout, torch.rand(size) < conditioning.camera_dropout
            noise = torch.randn_like(x0)
            timesteps = torch.randint(0, noise_schedule.config.num_train_timesteps, (size,), device=run.device)
            noisy = noise_schedule.add_noise(x0, noise, timesteps)
            with accelerator.accumulate(model):
                prediction, estimate = model(noisy, timesteps, text, cameras, drop_text=drop_text, drop_camera=drop_camera,
                                             return_view_estimate=True)
                noise_loss = F.mse_loss(prediction.float(), noise.float())
                head_loss = F.mse_loss(estimate.float(), x0.float()) if estimate is not None else None
                loss = noise_loss if head_loss is None else noise_loss + conditioning.view_head_weight * head_loss
                run.update(loss, model, optimizer, scheduler)
        run.ema.step(model.parameters())
        rates = scheduler.get_last_lr()
        logged = {"loss": loss.detach(), "loss/noise": noise_loss.detach(), "lr": rates[0], **({"lr/head": rates[1]} if len(rates) > 1 else {})}
        if head_loss is not None:
            logged["loss/view_head"] = head_loss.detach()
        run.log(logged, samples_per_step)
        if run.wants_images():
            run.log_image("samples/preview", preview_grid(prior, config.sampling))
            run.log_image("data/views", image_strip(rgb[:8]))

    saved = run.save_model(model)
    if run.is_main:
        print(f"view_prior: saved {saved}")
    run.finish()
    return saved


def preview_grid(prior: ViewPrior, sampling: ViewPriorSamplingConfig, cell: int = 64) -> np.ndarray:
    """DDIM samples, one row per prompt (a single unconditional row without text), one column per azimuth
    (one column without cameras): (rows·cell, columns·cell, 3) uint8, fixed seed. Restores train mode."""
    rows = list(sampling.preview_prompts) if prior.text_conditioned else [None]
    azimuths = list(sampling.preview_azimuths) if prior.camera_conditioned else [0.0]
    prompts = [prompt for prompt in rows for _ in azimuths]
    cameras = torch.tensor([[azimuth, sampling.preview_elevation] for _ in rows for azimuth in azimuths]) if prior.camera_conditioned else None
    training = prior.training
    prior.eval()
    try:
        images = prior.sample(len(prompts) if rows == [None] else prompts, steps=sampling.preview_steps,
                              guidance_scale=sampling.guidance, generator=torch.Generator(prior.device).manual_seed(0), cameras=cameras)
    finally:
        prior.train(training)
    images = F.interpolate(images.float().cpu(), size=(cell, cell), mode="nearest")  # (N, 3, cell, cell)
    grid = images.view(len(rows), len(azimuths), 3, cell, cell).permute(0, 3, 1, 4, 2)  # (rows, cell, cols, cell, 3)
    return (grid.reshape(len(rows) * cell, len(azimuths) * cell, 3) * 255).round().byte().numpy()


def image_strip(rgb: torch.Tensor, cell: int = 64) -> np.ndarray:
    """(N, 3, S, S) in [0, 1] → (cell, N·cell, 3) uint8: what the model is trained on."""
    images = F.interpolate(rgb.detach().float().cpu(), size=(cell, cell), mode="nearest")
    return (images.permute(2, 0, 3, 1).reshape(cell, -1, 3).clamp(0, 1) * 255).round().byte().numpy()


def config_from_args(args: argparse.Namespace) -> ViewPriorConfig:
    return apply_train_arguments(load_config(ViewPriorConfig, args.config, "view_prior"), args)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="shapekiln.train.view_prior", description="Train the view prior (the SDS image prior) on the shards' views.")
    add_train_arguments(parser, "view_prior")
    args = parser.parse_args(argv)
    try:
        train(config_from_args(args), resume=args.resume, progress=not args.no_progress, time_limit=time_limit_seconds(args))
    except ShapekilnError as error:
        print(f"shapekiln: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
