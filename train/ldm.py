"""Train the latent diffusion model on latent shards (written by `shapekiln encode`).

    accelerate launch --multi_gpu --num_processes 2 -m shapekiln.train.ldm --config configs/ldm/small.yaml
    shapekiln train ldm --config small            # one process

Each step: normalize the shards' latents to unit variance, noise them at random timesteps with
diffusers' DDPM schedule, and regress the noise (or v) from the noisy latent and the conditions.
Every modality is dropped independently with its own probability, so the model learns every
subset of conditions (the unconditional one too) that multi-modal guidance combines at sampling.
With latent heads (conditioning.latent_heads), each head's estimate of the latent also enters the
loss: MSE to the true normalized latent, weighted by latent_head_weight, for every sample.
The result is a ShapePipeline folder (`OUTPUT_DIR/pipeline`) built from the EMA weights.
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
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr

from shapekiln.config import load_config, to_dict
from shapekiln.data_prep.latents import load_latent_stats, vqvae_fingerprint
from shapekiln.data_prep.reader import PartialSpec
from shapekiln.errors import ShapekilnError
from shapekiln.models.conditioning import MODALITIES, ConditionModel, Conditions, LatentDiffusion, encode_partial
from shapekiln.models.encoders import load_image_tower, load_text_tower, rgba_to_rgb
from shapekiln.models.io import load_pretrained
from shapekiln.models.unet3d import UNet3DModel
from shapekiln.models.vqvae import VQVAE
from shapekiln.sample.pipeline import PipelineConfig, ShapePipeline
from shapekiln.train.common import DataConfig, Run, TrainConfig, parameter_groups
from shapekiln.train.options import add_train_arguments, apply_train_arguments, time_limit_seconds


@dataclass
class UNetConfig:
    """UNet3DModel's arguments; its grid size and channel counts follow from the VQ-VAE and the conditions."""

    model_channels: int = 64
    channel_mult: tuple[int, ...] = (1, 2, 4)
    num_res_blocks: int = 1
    attention_resolutions: tuple[int, ...] = (4, 2)
    num_heads: int = 4
    norm_groups: int = 8
    dropout: float = 0.0


@dataclass
class ConditioningConfig:
    modalities: tuple[str, ...] = ("text", "image", "partial")
    # Probability that each modality is replaced by its empty value, independently per sample.
    drop_text: float = 0.3
    drop_image: float = 0.6
    drop_partial: float = 0.7
    context_dim: int = 256
    text_tower: Literal["minilm", "open_clip"] = "minilm"
    text_tokens: int = 32
    image_encoder: Literal["conv", "open_clip"] = "conv"
    image_size: int = 64
    clip_model: str | None = None  # open_clip model name or config JSON, for the open_clip towers
    clip_checkpoint: str | None = None  # its local .safetensors
    # Modalities (text, image) whose latent estimate (a LatentHead on their tokens) is also fed as input
    # channels, and the weight of its regression onto the shape's normalized latent (0: it learns only
    # through the denoiser).
    latent_heads: tuple[str, ...] = ()
    latent_head_weight: float = 0.0
    # The heads' own learning rate (None: train.lr). A head is a small MLP or linear map that wants a
    # larger step than the denoiser: fitted alone to the small set's captions for 800 steps, the text
    # head's decoded estimate read 0.70 attribute accuracy at lr 5e-4 and 0.99 at 4e-3 (README).
    latent_head_lr: float | None = None

    def validate(self) -> None:
        if not self.modalities or set(self.modalities) - set(MODALITIES):
            raise ValueError(f"modalities must be a non-empty subset of {list(MODALITIES)}")
        if not all(0.0 <= p <= 1.0 for p in (self.drop_text, self.drop_image, self.drop_partial)):
            raise ValueError("drop probabilities must be in [0, 1]")
        if "open_clip" in (self.text_tower, self.image_encoder) and not (self.clip_model and self.clip_checkpoint):
            raise ValueError("open_clip towers need clip_model and clip_checkpoint")
        if self.latent_head_weight < 0 or (self.latent_head_weight > 0 and not self.latent_heads):
            raise ValueError("latent_head_weight must be ≥ 0, and > 0 only with latent_heads")
        if self.latent_head_lr is not None and (self.latent_head_lr <= 0 or not self.latent_heads):
            raise ValueError("latent_head_lr must be positive, and set only with latent_heads")

    def clip_spec(self) -> dict:
        return {"kind": "open_clip", "model": self.clip_model, "checkpoint": self.clip_checkpoint}


@dataclass
class DiffusionConfig:
    """diffusers DDPMScheduler arguments (SDFusion: 1000 steps, betas 0.00085 → 0.012, epsilon)."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: Literal["scaled_linear", "linear", "squaredcos_cap_v2"] = "scaled_linear"
    prediction_type: Literal["epsilon", "v_prediction"] = "epsilon"
    # Min-SNR-γ loss weighting (Hang et al. 2023; diffusers' --snr_gamma): min(SNR, γ) relative to the
    # target's own weight, so the easy low-noise steps stop dominating the gradient. None: plain MSE.
    snr_gamma: float | None = None

    def validate(self) -> None:
        if self.snr_gamma is not None and self.snr_gamma <= 0:
            raise ValueError("snr_gamma must be positive (or null for plain MSE)")

    def scheduler(self) -> DDPMScheduler:
        """The training noise schedule; no clipping of x0: unit-variance latents go past diffusers' default [-1, 1]."""
        return DDPMScheduler(num_train_timesteps=self.num_train_timesteps, beta_start=self.beta_start, beta_end=self.beta_end,
                             beta_schedule=self.beta_schedule, prediction_type=self.prediction_type, clip_sample=False)


@dataclass
class SamplingConfig:
    """Defaults saved with the pipeline, and the previews logged while training."""

    steps: int = 50
    scheduler: Literal["ddim", "dpm++", "ddpm"] = "ddim"
    guidance: float = 3.0
    mc_level: float = 0.0
    preview_prompts: tuple[str, ...] = ("a tall round table with four legs", "a chair with arms")
    preview_steps: int = 20


@dataclass
class LDMConfig:
    vqvae: str = "runs/vqvae-small/model"
    model: UNetConfig = field(default_factory=UNetConfig)
    conditioning: ConditioningConfig = field(default_factory=ConditioningConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def build_models(config: LDMConfig, vqvae: VQVAE) -> tuple[UNet3DModel, ConditionModel]:
    """A fresh denoiser and condition model sized for this VQ-VAE's latents, the frozen towers attached."""
    c = config.conditioning
    clip = c.clip_spec() if "open_clip" in (c.text_tower, c.image_encoder) else None
    text_tower = load_text_tower(clip if c.text_tower == "open_clip" else "minilm", c.text_tokens) if "text" in c.modalities else None
    image_tower = load_image_tower(clip) if c.image_encoder == "open_clip" and "image" in c.modalities else None
    try:
        conditioning = ConditionModel(
            modalities=tuple(c.modalities), context_dim=c.context_dim,
            text_tower=clip if c.text_tower == "open_clip" else None, text_dim=text_tower.dim if text_tower else 0,
            text_tokens=c.text_tokens, image_tower=clip if image_tower else None, image_dim=image_tower.dim if image_tower else 0,
            image_tokens=image_tower.num_tokens if image_tower else (c.image_size // 16) ** 2, image_size=c.image_size,
            latent_channels=vqvae.config.latent_channels, latent_resolution=vqvae.latent_resolution,
            latent_heads=tuple(c.latent_heads),
        )
        unet = UNet3DModel(
            latent_resolution=vqvae.latent_resolution,
            in_channels=vqvae.config.latent_channels + conditioning.extra_channels,
            out_channels=vqvae.config.latent_channels,
            cross_attention_dim=c.context_dim if {"text", "image"} & set(c.modalities) else None,
            **to_dict(config.model),
        )
    except ValueError as error:
        raise ShapekilnError(f"model config: {error}") from None
    conditioning.towers.update({name: tower for name, tower in (("text", text_tower), ("image", image_tower)) if tower is not None})
    return unet, conditioning


def check_latents(config: LDMConfig, vqvae: VQVAE) -> None:
    """The latent shards must come from this very VQ-VAE (its weights' fingerprint is in dataset.json)."""
    import json

    manifest = Path(config.data.shards) / "dataset.json"
    try:
        description = json.loads(manifest.read_text())
    except (OSError, ValueError):
        raise ShapekilnError(f"{config.data.shards} is not a latent dataset (no readable dataset.json); run `shapekiln encode` first") from None
    if "latents" not in description:
        raise ShapekilnError(f"{config.data.shards} holds TSDF shards, not latents; run `shapekiln encode --vqvae {config.vqvae} --data {config.data.shards} --out LATENTS` first")
    if description["latents"]["vqvae"] != vqvae_fingerprint(Path(config.vqvae)):
        raise ShapekilnError(f"{config.data.shards} was encoded by another VQ-VAE than {config.vqvae}; encode again or point `vqvae` at that model")


def train(config: LDMConfig, resume: str | None = None, progress: bool = True,
          time_limit: float | None = None) -> Path:
    """Train to config.train.max_steps; returns the folder of the saved pipeline (EMA weights)."""
    run = Run("ldm", config, config.train, resume, progress=progress, time_limit=time_limit)
    vqvae = load_pretrained(VQVAE, config.vqvae).eval().requires_grad_(False).to(run.device)
    check_latents(config, vqvae)
    mean, std = (torch.from_numpy(x).to(run.device) for x in load_latent_stats(config.data.shards))
    unet, conditioning = build_models(config, vqvae)
    towers = conditioning.towers
    noise_schedule = config.diffusion.scheduler()
    # A list in MODALITIES' order, not a set: a set's order changes from process to process with string
    # hashing, and the drop masks are drawn in this order, so a resumed run would draw them differently.
    modalities = [name for name in MODALITIES if name in config.conditioning.modalities]
    drop_prob = {"text": config.conditioning.drop_text, "image": config.conditioning.drop_image, "partial": config.conditioning.drop_partial}

    head_weight = config.conditioning.latent_head_weight
    model = LatentDiffusion(unet, conditioning)
    model, optimizer, scheduler = run.prepare(model, parameter_groups(model, model.conditioning.heads, config.conditioning.latent_head_lr))
    for tower in towers.values():
        tower.to(run.device)
    batches = run.batches(config.data, vqvae.config.resolution, vqvae.config.tau,
                          views="one" if "image" in modalities else False, partial=PartialSpec() if "partial" in modalities else None)
    accelerator = run.accelerator
    samples_per_step = config.data.batch_size * config.train.gradient_accumulation_steps * accelerator.num_processes

    logs: dict[str, torch.Tensor] = {}
    for _ in run.steps():
        for _ in range(config.train.gradient_accumulation_steps):
            batch = next(batches)
            latent = (batch["latent"].to(run.device) - mean.view(1, -1, 1, 1, 1)) / std.view(1, -1, 1, 1, 1)  # (B, C, r, r, r)
            size = latent.shape[0]
            conditions = Conditions(drop={name: torch.rand(size) < drop_prob[name] for name in modalities})
            if "text" in modalities:
                conditions.text = batch["caption"]
            if "image" in modalities:
                conditions.image = rgba_to_rgb(batch["views"][:, 0].to(run.device))  # the reader drew one view per shape
            if "partial" in modalities:
                conditions.partial = partial_conditions(vqvae, batch, conditions.drop["partial"], mean, std, run.device)
            noise = torch.randn_like(latent)
            timesteps = torch.randint(0, noise_schedule.config.num_train_timesteps, (size,), device=run.device)
            noisy = noise_schedule.add_noise(latent, noise, timesteps)
            target = noise if config.diffusion.prediction_type == "epsilon" else noise_schedule.get_velocity(latent, noise, timesteps)
            with accelerator.accumulate(model):
                prediction, head_latents = model(noisy, timesteps, conditions, return_head_latents=True)
                loss = logs["loss/diffusion"] = diffusion_loss(prediction, target, timesteps, noise_schedule, config.diffusion)
                if head_weight > 0:
                    for name, estimate in head_latents.items():  # every sample's, dropped or not
                        logs[f"loss/{name}_latent"] = F.mse_loss(estimate.float(), latent)
                        loss = loss + head_weight * logs[f"loss/{name}_latent"]
                run.update(loss, model, optimizer, scheduler)
        run.ema.step(model.parameters())
        rates = scheduler.get_last_lr()  # one per parameter group: the rest, then the heads when they have their own
        run.log({"loss": loss.detach(), "lr": rates[0], **({"lr/heads": rates[1]} if len(rates) > 1 else {}),
                 **{k: v.detach() for k, v in logs.items()}}, samples_per_step)
        if run.wants_images() and "text" in modalities:
            pipeline = make_pipeline(accelerator.unwrap_model(model), vqvae, noise_schedule, mean, std, config)
            run.log_image("samples/preview", preview_strip(pipeline, config.sampling))

    def save(unwrapped: LatentDiffusion, folder: Path) -> None:
        make_pipeline(unwrapped, vqvae, noise_schedule, mean, std, config).save_pretrained(folder)

    saved = run.save_model(model, "pipeline", save)
    if run.is_main:
        print(f"ldm: saved {saved}")
    run.finish()
    return saved


def diffusion_loss(prediction: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor, noise_schedule: DDPMScheduler,
                   diffusion: DiffusionConfig) -> torch.Tensor:
    """MSE to the target, per sample weighted by min(SNR(t), γ) / SNR(t) (epsilon) or / (SNR(t) + 1) (v)."""
    per_sample = (prediction.float() - target.float()).pow(2).flatten(1).mean(dim=1)  # (B,)
    if diffusion.snr_gamma is None:
        return per_sample.mean()
    snr = compute_snr(noise_schedule, timesteps).float()
    weight = snr.clamp(max=diffusion.snr_gamma) / (snr if diffusion.prediction_type == "epsilon" else snr + 1)
    return (weight * per_sample).mean()


@torch.no_grad()
def partial_conditions(vqvae: VQVAE, batch: dict, dropped: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
                       device: torch.device) -> torch.Tensor:
    """encode_partial for the samples that keep their partial shape; zeros (replaced by the learned
    empty value downstream) for the dropped ones, which then cost no VQ-VAE encoder pass."""
    kept = ~dropped
    r = vqvae.latent_resolution
    conditions = torch.zeros(len(dropped), vqvae.config.latent_channels + 1, r, r, r, device=device)
    if kept.any():
        conditions[kept.to(device)] = encode_partial(vqvae, batch["partial"][kept].to(device), batch["known_mask"][kept].to(device), mean, std)
    return conditions


def make_pipeline(model: LatentDiffusion, vqvae: VQVAE, noise_schedule: DDPMScheduler, mean: torch.Tensor,
                  std: torch.Tensor, config: LDMConfig) -> ShapePipeline:
    sampling = config.sampling
    pipeline_config = PipelineConfig(
        latent_mean=mean.tolist(), latent_std=std.tolist(), resolution=vqvae.config.resolution, tau=vqvae.config.tau,
        steps=sampling.steps, scheduler=sampling.scheduler, guidance=sampling.guidance, mc_level=sampling.mc_level,
    )
    return ShapePipeline(model.unet, model.conditioning, vqvae, noise_schedule, pipeline_config)


def preview_strip(pipeline: ShapePipeline, sampling: SamplingConfig, size: int = 160) -> np.ndarray:
    """One shaded render per preview prompt, side by side: (size, P·size, 3) uint8. Restores train mode."""
    from shapekiln.sample.export import render_shape

    training = pipeline.unet.training  # the caller's mode, restored below
    pipeline.unet.eval()
    pipeline.conditioning.eval()
    try:
        panels = [render_shape(pipeline(text=prompt, steps=sampling.preview_steps, seed=k, progress=False).shapes[0].mesh, size)
                  for k, prompt in enumerate(sampling.preview_prompts)]
    finally:
        pipeline.unet.train(training)
        pipeline.conditioning.train(training)
    return np.concatenate(panels, axis=1)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="shapekiln.train.ldm", description="Train the latent diffusion model on latent shards.")
    add_train_arguments(parser, "ldm")
    parser.add_argument("--vqvae", help="the VQ-VAE folder the latents were encoded with (overrides vqvae)")
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args)
        train(config, resume=args.resume, progress=not args.no_progress, time_limit=time_limit_seconds(args))
    except ShapekilnError as error:
        print(f"shapekiln: error: {error}", file=sys.stderr)
        return 2
    return 0


def config_from_args(args: argparse.Namespace) -> LDMConfig:
    config = apply_train_arguments(load_config(LDMConfig, args.config, "ldm"), args)
    if args.vqvae:
        config.vqvae = args.vqvae
    return config


if __name__ == "__main__":
    sys.exit(main())
