"""3D VQ-VAE over TSDF grids (SDFusion's autoencoder): an R³ TSDF ⇄ an (R/4)³ × C latent.

    encoder:   conv_in → per level [ResBlock × n, Downsample (not after the last)] → mid (ResBlock,
               Attention, ResBlock) → GroupNorm, SiLU, conv_out → latent (before quantization)
    quantizer: nearest codebook entry with a straight-through gradient; the codebook follows its
               assigned latents by EMA and dead entries restart from random latents of the batch
    decoder:   the mirror image, nearest-neighbour upsampling + conv (or a transposed conv)

The TSDF is divided by `tau` on the way in and multiplied by it on the way out, so the network
sees values in [-1, 1] whatever the truncation. The diffusion model works on `encode`'s latent
(before quantization, as SDFusion's does); `decode` quantizes it first unless told not to.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from torch import nn


def group_norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(groups, channels), channels, eps=1e-6)


class ResBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.norm1 = group_norm(in_channels, groups)
        self.conv1 = nn.Conv3d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels, groups)
        self.conv2 = nn.Conv3d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv3d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class Attention(nn.Module):
    """Single-head self-attention over all voxels of a (small) grid."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = group_norm(channels, groups)
        self.qkv = nn.Conv3d(channels, 3 * channels, 1)
        self.proj = nn.Conv3d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, d, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, d * h * w).transpose(-1, -2).unbind(1)  # each (B, N, C)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, N, C)
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, d, h, w))


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv3d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)  # (B, C, R, R, R) → (B, C, R/2, R/2, R/2)


class Upsample(nn.Module):
    """×2 per axis: nearest-neighbour then a 3³ conv (SDFusion's, from taming), or one 2³ stride-2
    transposed conv ("transpose": each input voxel writes its own 2³ block; on a 2-core CPU the whole
    VQ-VAE step takes 0.62 s instead of 0.75 s at the small config)."""

    def __init__(self, channels: int, mode: str = "nearest"):
        super().__init__()
        self.mode = mode
        if mode == "nearest":
            self.conv = nn.Conv3d(channels, channels, 3, padding=1)
        elif mode == "transpose":
            self.conv = nn.ConvTranspose3d(channels, channels, 2, stride=2)
        else:
            raise ValueError(f"upsample must be 'nearest' or 'transpose', got {mode!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "nearest":
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x)  # (B, C, 2R, 2R, 2R)


def fold_patches(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, R, R, R) → (B, C·p³, R/p, R/p, R/p): each p³ block of voxels becomes channels (space to depth)."""
    b, c, d, h, w = x.shape
    x = x.reshape(b, c, d // p, p, h // p, p, w // p, p)
    return x.permute(0, 1, 3, 5, 7, 2, 4, 6).reshape(b, c * p**3, d // p, h // p, w // p)


def unfold_patches(x: torch.Tensor, p: int) -> torch.Tensor:
    """The inverse of `fold_patches`: (B, C·p³, r, r, r) → (B, C, r·p, r·p, r·p)."""
    b, cp, d, h, w = x.shape
    c = cp // p**3
    x = x.reshape(b, c, p, p, p, d, h, w)
    return x.permute(0, 1, 5, 2, 6, 3, 7, 4).reshape(b, c, d * p, h * p, w * p)


def mid_block(channels: int, groups: int, attention: bool) -> nn.Sequential:
    return nn.Sequential(
        ResBlock(channels, channels, groups),
        Attention(channels, groups) if attention else nn.Identity(),
        ResBlock(channels, channels, groups),
    )


class Encoder(nn.Module):
    def __init__(self, in_channels: int, base_channels: int, channel_mult: tuple[int, ...], num_res_blocks: int,
                 attention: bool, latent_channels: int, groups: int, patch_size: int = 1):
        super().__init__()
        self.patch_size = patch_size
        self.conv_in = nn.Conv3d(in_channels * patch_size**3, base_channels, 3, padding=1)
        blocks, channels = [], base_channels
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                blocks.append(ResBlock(channels, base_channels * mult, groups))
                channels = base_channels * mult
            if level < len(channel_mult) - 1:
                blocks.append(Downsample(channels))
        self.down = nn.Sequential(*blocks)
        self.mid = mid_block(channels, groups, attention)
        self.norm_out = group_norm(channels, groups)
        self.conv_out = nn.Conv3d(channels, latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.patch_size > 1:
            x = fold_patches(x, self.patch_size)
        h = self.mid(self.down(self.conv_in(x)))  # (B, C_top, r, r, r)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, latent_channels, r, r, r)


class Decoder(nn.Module):
    def __init__(self, out_channels: int, base_channels: int, channel_mult: tuple[int, ...], num_res_blocks: int,
                 attention: bool, latent_channels: int, groups: int, upsample: str = "nearest", patch_size: int = 1):
        super().__init__()
        self.patch_size = patch_size
        channels = base_channels * channel_mult[-1]
        self.conv_in = nn.Conv3d(latent_channels, channels, 3, padding=1)
        self.mid = mid_block(channels, groups, attention)
        blocks = []
        for level, mult in reversed(list(enumerate(channel_mult))):
            for _ in range(num_res_blocks):
                blocks.append(ResBlock(channels, base_channels * mult, groups))
                channels = base_channels * mult
            if level > 0:
                blocks.append(Upsample(channels, upsample))
        self.up = nn.Sequential(*blocks)
        self.norm_out = group_norm(channels, groups)
        self.conv_out = nn.Conv3d(channels, out_channels * patch_size**3, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.up(self.mid(self.conv_in(z)))  # (B, C_base, R/p, R/p, R/p)
        out = self.conv_out(F.silu(self.norm_out(h)))
        return unfold_patches(out, self.patch_size) if self.patch_size > 1 else out


@dataclass
class QuantizerOutput:
    quantized: torch.Tensor  # (B, C, r, r, r), straight-through: gradients reach the latent
    indices: torch.Tensor  # (B, r, r, r) int64
    commitment_loss: torch.Tensor  # scalar
    perplexity: torch.Tensor  # scalar, exp(entropy) of this batch's code histogram
    usage: torch.Tensor  # scalar, fraction of the codebook used by this batch


class VectorQuantizer(nn.Module):
    """Nearest-neighbour codebook with EMA updates and dead-code restarts (no codebook loss term).

    Under data parallelism the code counts and sums are summed over ranks and restarts come from
    rank 0, so every rank keeps the same codebook.
    """

    def __init__(self, codebook_size: int, dim: int, commitment_weight: float, decay: float,
                 restart_dead_codes: bool, dead_threshold: float = 0.01, eps: float = 1e-5):
        super().__init__()
        self.codebook_size, self.dim = codebook_size, dim
        self.commitment_weight, self.decay, self.eps = commitment_weight, decay, eps
        self.restart_dead_codes, self.dead_threshold = restart_dead_codes, dead_threshold
        self.register_buffer("codebook", torch.randn(codebook_size, dim))
        self.register_buffer("cluster_size", torch.ones(codebook_size))
        self.register_buffer("embed_sum", self.codebook.clone())
        # important! set from the first training batch, so no code starts far from every latent
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    def nearest(self, flat: torch.Tensor, chunk: int = 16384) -> torch.Tensor:
        """Index of the nearest code for each row of `flat` (N, C); chunked to bound the (N, K) distances."""
        codebook = self.codebook.to(flat.dtype)
        code_norms = (codebook**2).sum(1)
        indices = [torch.argmin(code_norms - 2.0 * part @ codebook.T, dim=1) for part in flat.split(chunk)]
        return torch.cat(indices)

    def forward(self, latent: torch.Tensor) -> QuantizerOutput:
        # Distances to the codebook in full precision even under bf16/fp16 autocast: rounded
        # distances pick the wrong nearest code.
        with torch.autocast(latent.device.type, enabled=False):
            return self._quantize(latent)

    def _quantize(self, latent: torch.Tensor) -> QuantizerOutput:
        b, c, d, h, w = latent.shape
        flat = latent.permute(0, 2, 3, 4, 1).reshape(-1, c).float()  # (N, C)
        if self.training and not bool(self.initialized):
            self._initialize(flat.detach())
        indices = self.nearest(flat.detach())  # (N,)
        if self.training:
            self._ema_update(flat.detach(), indices)
        quantized = self.codebook[indices].reshape(b, d, h, w, c).permute(0, 4, 1, 2, 3).to(latent.dtype)
        commitment = self.commitment_weight * F.mse_loss(latent, quantized.detach())
        counts = torch.bincount(indices, minlength=self.codebook_size).float()
        probs = counts / counts.sum()
        perplexity = torch.exp(-(probs * torch.log(probs + 1e-10)).sum())
        return QuantizerOutput(
            quantized=latent + (quantized - latent).detach(),
            indices=indices.reshape(b, d, h, w),
            commitment_loss=commitment,
            perplexity=perplexity,
            usage=(counts > 0).float().mean(),
        )

    @torch.no_grad()
    def _initialize(self, flat: torch.Tensor) -> None:
        self.codebook.copy_(_broadcast(_random_rows(flat, self.codebook_size)))
        self.embed_sum.copy_(self.codebook)
        self.cluster_size.fill_(1.0)
        self.initialized.fill_(True)

    @torch.no_grad()
    def _ema_update(self, flat: torch.Tensor, indices: torch.Tensor) -> None:
        one_hot_counts = _all_reduce(torch.bincount(indices, minlength=self.codebook_size).float())  # (K,)
        sums = _all_reduce(torch.zeros_like(self.embed_sum).index_add_(0, indices, flat))  # (K, C)
        self.cluster_size.mul_(self.decay).add_(one_hot_counts, alpha=1 - self.decay)
        self.embed_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        # Laplace smoothing keeps a code with a tiny count from dividing by ~0.
        total = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.eps) / (total + self.codebook_size * self.eps) * total
        self.codebook.copy_(self.embed_sum / smoothed[:, None])
        if self.restart_dead_codes:
            dead = self.cluster_size < self.dead_threshold
            if bool(dead.any()):
                fresh = _broadcast(_random_rows(flat, int(dead.sum())))
                self.codebook[dead] = fresh
                self.embed_sum[dead] = fresh
                self.cluster_size[dead] = 1.0


def _random_rows(flat: torch.Tensor, count: int) -> torch.Tensor:
    """`count` rows of `flat` drawn at random (with replacement when there are fewer), slightly jittered."""
    picks = torch.randint(len(flat), (count,), device=flat.device) if len(flat) < count else torch.randperm(len(flat), device=flat.device)[:count]
    rows = flat[picks]
    return rows + 1e-3 * rows.std() * torch.randn_like(rows)


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1


def _all_reduce(tensor: torch.Tensor) -> torch.Tensor:
    if _distributed():
        torch.distributed.all_reduce(tensor)
    return tensor


def _broadcast(tensor: torch.Tensor) -> torch.Tensor:
    if _distributed():
        torch.distributed.broadcast(tensor, src=0)
    return tensor


@dataclass
class VQVAEOutput(BaseOutput):
    # Defaults as in diffusers' outputs: accelerate's mixed precision rebuilds an output from a dict.
    reconstruction: torch.Tensor = None  # (B, 1, R, R, R) TSDF
    latent: torch.Tensor = None  # (B, C, r, r, r) before quantization
    indices: torch.Tensor = None  # (B, r, r, r)
    commitment_loss: torch.Tensor = None
    perplexity: torch.Tensor = None
    usage: torch.Tensor = None


class VQVAE(ModelMixin, ConfigMixin):
    """TSDF (B, 1, R, R, R) → latent (B, latent_channels, R/2^(L-1), ...) → TSDF, L = len(channel_mult)."""

    @register_to_config
    def __init__(
        self,
        resolution: int = 32,
        tau: float = 0.2,
        in_channels: int = 1,
        base_channels: int = 32,
        channel_mult: tuple[int, ...] = (1, 2, 4),
        num_res_blocks: int = 1,
        attention: bool = True,
        latent_channels: int = 3,
        codebook_size: int = 512,
        commitment_weight: float = 1.0,
        ema_decay: float = 0.99,
        restart_dead_codes: bool = True,
        norm_groups: int = 8,
        upsample: str = "nearest",
        patch_size: int = 1,
    ):
        super().__init__()
        if patch_size < 1:
            raise ValueError(f"patch_size must be at least 1, got {patch_size}")
        downsampling = patch_size * 2 ** (len(channel_mult) - 1)
        if resolution % downsampling:
            raise ValueError(f"resolution {resolution} is not divisible by {downsampling} (patch_size · 2^(levels-1))")
        if tau <= 0:
            raise ValueError(f"tau must be positive, got {tau}")
        channel_mult = tuple(channel_mult)
        args = (base_channels, channel_mult, num_res_blocks, attention, latent_channels, norm_groups)
        self.encoder = Encoder(in_channels, *args, patch_size=patch_size)
        self.quantizer = VectorQuantizer(codebook_size, latent_channels, commitment_weight, ema_decay, restart_dead_codes)
        self.decoder = Decoder(in_channels, *args, upsample=upsample, patch_size=patch_size)

    @property
    def latent_resolution(self) -> int:
        return self.config.resolution // (self.config.patch_size * 2 ** (len(self.config.channel_mult) - 1))

    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        r = self.latent_resolution
        return (self.config.latent_channels, r, r, r)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """diffusers' loader, also taking the name of a VQ-VAE shipped with the package
        ("shapekiln/general-32" or "general-32"; see models/pretrained.py), checked against its checksum."""
        from shapekiln.models.pretrained import resolve

        return super().from_pretrained(str(resolve(pretrained_model_name_or_path)), **kwargs)

    def encode(self, tsdf: torch.Tensor) -> torch.Tensor:
        """TSDF (B, 1, R, R, R) → latent before quantization (B, C, r, r, r)."""
        return self.encoder(tsdf / self.config.tau)

    def decode(self, latent: torch.Tensor, quantize: bool = True) -> torch.Tensor:
        """Latent (B, C, r, r, r) → TSDF (B, 1, R, R, R); quantized first unless `quantize=False`."""
        if quantize:
            latent = self.quantizer(latent).quantized
        return self.decoder(latent) * self.config.tau

    def forward(self, tsdf: torch.Tensor) -> VQVAEOutput:
        latent = self.encode(tsdf)
        quantized = self.quantizer(latent)
        return VQVAEOutput(
            reconstruction=self.decoder(quantized.quantized) * self.config.tau,
            latent=latent,
            indices=quantized.indices,
            commitment_loss=quantized.commitment_loss,
            perplexity=quantized.perplexity,
            usage=quantized.usage,
        )
