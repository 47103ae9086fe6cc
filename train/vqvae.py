"""Train the VQ-VAE on TSDF shards.

    accelerate launch --multi_gpu --num_processes 2 -m shapekiln.train.vqvae --config configs/vqvae/small.yaml
    shapekiln train vqvae --config small            # one process

Loss: L1 between the predicted and the true TSDF (optionally weighted up near the surface, where
the mesh is decided), optionally a logistic loss on the sign (the occupancy) near the surface, plus
the quantizer's commitment loss; the codebook learns by EMA updates with dead-code restarts, so it
has no loss term of its own.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from shapekiln.config import load_config, to_dict
from shapekiln.errors import ShapekilnError
from shapekiln.models.vqvae import VQVAE
from shapekiln.train.common import DataConfig, Run, TrainConfig
from shapekiln.train.options import add_train_arguments, apply_train_arguments, time_limit_seconds


@dataclass
class VQVAEModelConfig:
    """Constructor arguments of models.vqvae.VQVAE."""

    resolution: int = 32
    tau: float = 0.2
    base_channels: int = 32
    channel_mult: tuple[int, ...] = (1, 2, 4)
    num_res_blocks: int = 1
    attention: bool = True
    latent_channels: int = 3
    codebook_size: int = 512
    commitment_weight: float = 1.0
    ema_decay: float = 0.99
    restart_dead_codes: bool = True
    norm_groups: int = 8
    upsample: str = "nearest"  # or "transpose"
    patch_size: int = 1  # > 1: p³ voxel blocks fold into channels before the first conv (and unfold after the last)


@dataclass
class VQVAELossConfig:
    surface_weight: float = 0.0  # extra L1 weight on voxels with |tsdf| < surface_band
    surface_band: float = 0.05
    sign_weight: float = 0.0  # > 0: a logistic loss on the sign (the occupancy) of voxels within surface_band
    sign_scale: float = 0.01  # its softness, in TSDF units: a sign right by a few of these costs nothing

    def validate(self) -> None:
        if min(self.surface_weight, self.sign_weight) < 0 or self.surface_band <= 0 or self.sign_scale <= 0:
            raise ValueError("surface_weight and sign_weight must not be negative, surface_band and sign_scale must be positive")


@dataclass
class VQVAEConfig:
    model: VQVAEModelConfig = field(default_factory=VQVAEModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    loss: VQVAELossConfig = field(default_factory=VQVAELossConfig)


def reconstruction_loss(prediction: torch.Tensor, target: torch.Tensor, loss: VQVAELossConfig) -> torch.Tensor:
    band = (target.abs() < loss.surface_band).float()
    l1 = ((1.0 + loss.surface_weight * band) * (prediction - target).abs()).mean()
    if not loss.sign_weight:
        return l1
    # scale · softplus(−pred · sign / scale): ≈ |pred| on the wrong side, scale · ln 2 on the surface, → 0 when right.
    # L1 hardly cares whether a value of +0.005 comes out as −0.005; the occupancy (IoU) does.
    sign = torch.where(target < 0, -1.0, 1.0)
    wrong_side = loss.sign_scale * F.softplus(-prediction.float() * sign / loss.sign_scale)
    return l1 + loss.sign_weight * (band * wrong_side).mean()


def train(config: VQVAEConfig, resume: str | None = None, progress: bool = True,
          time_limit: float | None = None) -> Path:
    """Train to config.train.max_steps; returns the folder of the saved (EMA) model."""
    run = Run("vqvae", config, config.train, resume, progress=progress, time_limit=time_limit)
    try:
        model = VQVAE(**to_dict(config.model))
    except ValueError as error:
        raise ShapekilnError(f"model config: {error}") from None
    model, optimizer, scheduler = run.prepare(model)
    batches = run.batches(config.data, config.model.resolution, config.model.tau)
    accelerator = run.accelerator
    samples_per_step = config.data.batch_size * config.train.gradient_accumulation_steps * accelerator.num_processes

    for _ in run.steps():
        for _ in range(config.train.gradient_accumulation_steps):
            tsdf = next(batches)["tsdf"].to(run.device)  # (B, 1, R, R, R)
            with accelerator.accumulate(model):
                output = model(tsdf)
                l1 = reconstruction_loss(output.reconstruction, tsdf, config.loss)
                loss = l1 + output.commitment_loss
                run.update(loss, model, optimizer, scheduler)
        run.ema.step(model.parameters())
        run.log(
            {
                "loss": loss.detach(), "l1": l1.detach(), "commitment": output.commitment_loss.detach(),
                "codebook_perplexity": output.perplexity, "codebook_usage": output.usage,
                "lr": scheduler.get_last_lr()[0],
            },
            samples_per_step,
        )
        if run.wants_images():
            run.log_image("reconstruction/input_vs_decoded", side_by_side(tsdf[0, 0], output.reconstruction[0, 0]))

    saved = run.save_model(model)
    if run.is_main:
        print(f"vqvae: saved {saved}")
    run.finish()
    return saved


def side_by_side(true_tsdf: torch.Tensor, decoded_tsdf: torch.Tensor, size: int = 192) -> np.ndarray:
    """Marching-cubes renders of an input grid and its reconstruction, (size, 2*size, 3) uint8."""
    from shapekiln.data_prep.preview import tsdf_to_mesh
    from shapekiln.sample.export import render_shape

    return np.concatenate([render_shape(tsdf_to_mesh(grid.detach().float().cpu().numpy()), size) for grid in (true_tsdf, decoded_tsdf)], axis=1)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="shapekiln.train.vqvae", description="Train the VQ-VAE on TSDF shards.")
    add_train_arguments(parser, "vqvae")
    args = parser.parse_args(argv)
    try:
        config = apply_train_arguments(load_config(VQVAEConfig, args.config, "vqvae"), args)
        train(config, resume=args.resume, progress=not args.no_progress, time_limit=time_limit_seconds(args))
    except ShapekilnError as error:
        print(f"shapekiln: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
