"""3D UNet denoiser over latent grids (SDFusion's latent diffusion model): ε/v from (z_t, t, context).

    time:   sinusoidal embedding of t → MLP → scale-shift of the second norm in every ResBlock
    down:   conv_in → per level [Block × n, Downsample (not after the last)]; every output is a skip
    mid:    ResBlock, Transformer, ResBlock (always with attention)
    up:     per level, coarsest first [Block × (n + 1), each fed one skip; Upsample (not after level 0)]
    out:    GroupNorm, SiLU, conv_out (zero-initialized)

A Block is a ResBlock, followed by a Transformer where the level's grid side is in
`attention_resolutions`: self-attention over voxels, cross-attention to `context` tokens (text,
image, ...), feed-forward, each pre-normed with a residual. Unlike diffusers' UNet3DConditionModel
(a video UNet) every level halves depth, height and width alike.

Zero-initialization: conv_out and the last projection of every residual branch start at zero, so
the untrained model predicts 0 and each block starts as the identity (as ADM and LDM do).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import get_timestep_embedding
from diffusers.models.modeling_utils import ModelMixin
from shapekiln.models.vqvae import Downsample, Upsample, group_norm
from torch import nn


def zero_init(module: nn.Module) -> nn.Module:
    for parameter in module.parameters():
        nn.init.zeros_(parameter)
    return module


class ResBlock(nn.Module):
    """Two 3³ convs; the timestep embedding scales and shifts the second GroupNorm's output."""

    def __init__(self, in_channels: int, out_channels: int, time_channels: int, groups: int, dropout: float):
        super().__init__()
        self.norm1 = group_norm(in_channels, groups)
        self.conv1 = nn.Conv3d(in_channels, out_channels, 3, padding=1)
        self.time_proj = nn.Linear(time_channels, 2 * out_channels)
        self.norm2 = group_norm(out_channels, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_init(nn.Conv3d(out_channels, out_channels, 3, padding=1))
        self.skip = nn.Conv3d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, time_emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.time_proj(F.silu(time_emb))[:, :, None, None, None].chunk(2, dim=1)  # each (B, C, 1, 1, 1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class MultiHeadAttention(nn.Module):
    """Attention from `tokens` to `context` (to `tokens` themselves when no context is given)."""

    def __init__(self, channels: int, context_channels: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.to_q = nn.Linear(channels, channels, bias=False)
        self.to_kv = nn.Linear(context_channels, 2 * channels, bias=False)
        self.out = zero_init(nn.Linear(channels, channels))

    def forward(self, tokens: torch.Tensor, context: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        context = tokens if context is None else context
        (b, n, c), length, heads = tokens.shape, context.shape[1], self.num_heads
        q = self.to_q(tokens).view(b, n, heads, c // heads).transpose(1, 2)  # (B, heads, N, C/heads)
        kv = self.to_kv(context).view(b, length, 2, heads, c // heads)
        k, v = kv.permute(2, 0, 3, 1, 4)  # each (B, heads, L, C/heads)
        attends = None
        if mask is not None:
            # A row with no token to attend to would softmax over nothing (NaN): let it attend
            # everywhere and drop its result, so that sample gets no cross-attention at all.
            attends = mask.any(dim=1)  # (B,)
            mask = (mask | ~attends[:, None])[:, None, None, :]  # (B, 1, 1, L)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, heads, N, C/heads)
        out = self.out(out.transpose(1, 2).reshape(b, n, c))  # (B, N, C)
        return out if attends is None else out * attends[:, None, None].to(out.dtype)


class Transformer(nn.Module):
    """Self-attention over the voxels, cross-attention to the context, feed-forward."""

    def __init__(self, channels: int, context_channels: int | None, num_heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(channels)
        self.self_attention = MultiHeadAttention(channels, channels, num_heads)
        self.norm2 = nn.LayerNorm(channels) if context_channels else None
        self.cross_attention = MultiHeadAttention(channels, context_channels, num_heads) if context_channels else None
        self.norm3 = nn.LayerNorm(channels)
        self.feed_forward = nn.Sequential(
            nn.Linear(channels, 4 * channels), nn.GELU(), zero_init(nn.Linear(4 * channels, channels))
        )

    def forward(self, x: torch.Tensor, context: torch.Tensor | None, context_mask: torch.Tensor | None) -> torch.Tensor:
        b, c, d, h, w = x.shape
        tokens = x.flatten(2).transpose(1, 2)  # (B, N, C), N = D·H·W
        tokens = tokens + self.self_attention(self.norm1(tokens))
        if self.cross_attention is not None and context is not None:
            tokens = tokens + self.cross_attention(self.norm2(tokens), context, context_mask)
        tokens = tokens + self.feed_forward(self.norm3(tokens))
        return tokens.transpose(1, 2).reshape(b, c, d, h, w)


class Block(nn.Module):
    """A ResBlock, then a Transformer at the attention resolutions."""

    def __init__(self, in_channels: int, out_channels: int, time_channels: int, groups: int, dropout: float,
                 attention: bool, context_channels: int | None, num_heads: int):
        super().__init__()
        self.res = ResBlock(in_channels, out_channels, time_channels, groups, dropout)
        self.transformer = Transformer(out_channels, context_channels, num_heads) if attention else None

    def forward(self, x: torch.Tensor, time_emb: torch.Tensor, context: torch.Tensor | None,
                context_mask: torch.Tensor | None) -> torch.Tensor:
        h = self.res(x, time_emb)
        return h if self.transformer is None else self.transformer(h, context, context_mask)


class UNet3DModel(ModelMixin, ConfigMixin):
    """Latent (B, in_channels, r, r, r), timestep, context tokens (B, L, D) → (B, out_channels, r, r, r).

    The grid side halves per level (len(channel_mult) levels); `attention_resolutions` are grid
    sides (r, r/2, ...) where Blocks carry a Transformer. For classifier-free guidance in training,
    drop a context with an all-False `context_mask` row rather than `context=None`, so every
    parameter takes part in every step (distributed data parallel needs it).
    """

    @register_to_config
    def __init__(
        self,
        latent_resolution: int = 8,
        in_channels: int = 3,
        out_channels: int = 3,
        model_channels: int = 64,
        channel_mult: tuple[int, ...] = (1, 2, 4),
        num_res_blocks: int = 1,
        attention_resolutions: tuple[int, ...] = (4, 2),
        cross_attention_dim: int | None = 256,
        num_heads: int = 4,
        norm_groups: int = 8,
        dropout: float = 0.0,
    ):
        super().__init__()
        channel_mult, attention_resolutions = tuple(channel_mult), tuple(attention_resolutions)
        downsampling = 2 ** (len(channel_mult) - 1)
        if latent_resolution % downsampling:
            raise ValueError(f"latent_resolution {latent_resolution} is not divisible by {downsampling} (2^(levels-1))")
        level_resolutions = [latent_resolution // 2**level for level in range(len(channel_mult))]
        for resolution in attention_resolutions:
            if resolution not in level_resolutions:
                raise ValueError(
                    f"attention resolution {resolution} is not a level resolution; valid: {level_resolutions}"
                )
        attended = [model_channels * mult for mult, resolution in zip(channel_mult, level_resolutions)
                    if resolution in attention_resolutions] + [model_channels * channel_mult[-1]]  # + the middle
        for channels in attended:
            if channels % num_heads:
                raise ValueError(f"{channels} channels do not split into {num_heads} attention heads")

        time_channels = 4 * model_channels
        self.time_mlp = nn.Sequential(
            nn.Linear(model_channels, time_channels), nn.SiLU(), nn.Linear(time_channels, time_channels)
        )

        def block(in_ch: int, out_ch: int, attention: bool) -> Block:
            return Block(in_ch, out_ch, time_channels, norm_groups, dropout, attention, cross_attention_dim, num_heads)

        self.conv_in = nn.Conv3d(in_channels, model_channels, 3, padding=1)
        down, skip_channels, channels = [], [model_channels], model_channels
        for level, mult in enumerate(channel_mult):
            attention = level_resolutions[level] in attention_resolutions
            for _ in range(num_res_blocks):
                down.append(block(channels, model_channels * mult, attention))
                channels = model_channels * mult
                skip_channels.append(channels)
            if level < len(channel_mult) - 1:
                down.append(Downsample(channels))
                skip_channels.append(channels)
        self.down = nn.ModuleList(down)

        self.mid_res1 = ResBlock(channels, channels, time_channels, norm_groups, dropout)
        self.mid_transformer = Transformer(channels, cross_attention_dim, num_heads)
        self.mid_res2 = ResBlock(channels, channels, time_channels, norm_groups, dropout)

        up = []
        for level, mult in reversed(list(enumerate(channel_mult))):
            attention = level_resolutions[level] in attention_resolutions
            for _ in range(num_res_blocks + 1):
                up.append(block(channels + skip_channels.pop(), model_channels * mult, attention))
                channels = model_channels * mult
            if level > 0:
                up.append(Upsample(channels))
        self.up = nn.ModuleList(up)

        self.norm_out = group_norm(channels, norm_groups)
        self.conv_out = zero_init(nn.Conv3d(channels, out_channels, 3, padding=1))

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | float, context: torch.Tensor | None = None,
                context_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Predict the noise (or v) for `sample` (B, in_channels, r, r, r) at `timestep` (a scalar or (B,)).

        `context` (B, L, cross_attention_dim) tokens for cross-attention; `context_mask` (B, L) bool,
        True = attend; an all-False row gives that sample no cross-attention (as if no context).
        """
        self._check_inputs(sample, context, context_mask)
        batch = sample.shape[0]
        timestep = torch.as_tensor(timestep, device=sample.device)
        if timestep.ndim == 0:
            timestep = timestep.expand(batch)
        if timestep.shape != (batch,):
            raise ValueError(f"timestep must be a scalar or of shape ({batch},), got {tuple(timestep.shape)}")
        frequencies = get_timestep_embedding(timestep, self.config.model_channels, flip_sin_to_cos=True,
                                             downscale_freq_shift=0)  # (B, model_channels)
        time_emb = self.time_mlp(frequencies.to(sample.dtype))  # (B, 4·model_channels)

        h = self.conv_in(sample)  # (B, model_channels, r, r, r)
        skips = [h]
        for layer in self.down:
            h = layer(h, time_emb, context, context_mask) if isinstance(layer, Block) else layer(h)
            skips.append(h)  # (B, C_level, r_level, r_level, r_level)
        h = self.mid_res1(h, time_emb)
        h = self.mid_transformer(h, context, context_mask)
        h = self.mid_res2(h, time_emb)  # (B, C_top, r / 2^(levels-1), ...)
        for layer in self.up:
            if isinstance(layer, Block):
                h = layer(torch.cat([h, skips.pop()], dim=1), time_emb, context, context_mask)
            else:
                h = layer(h)  # (B, C, 2·r_level, ...)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, out_channels, r, r, r)

    def _check_inputs(self, sample: torch.Tensor, context: torch.Tensor | None,
                      context_mask: torch.Tensor | None) -> None:
        config, r = self.config, self.config.latent_resolution
        if sample.ndim != 5 or sample.shape[1:] != (config.in_channels, r, r, r):
            raise ValueError(f"sample must be (B, {config.in_channels}, {r}, {r}, {r}), got {tuple(sample.shape)}")
        if context is None:
            if context_mask is not None:
                raise ValueError("context_mask given without a context")
            return
        if config.cross_attention_dim is None:
            raise ValueError("this UNet3DModel has no cross-attention (cross_attention_dim=None) but got a context")
        if context.ndim != 3 or context.shape[0] != sample.shape[0] or context.shape[2] != config.cross_attention_dim:
            raise ValueError(f"context must be (B={sample.shape[0]}, L, {config.cross_attention_dim}), "
                             f"got {tuple(context.shape)}")
        if context_mask is not None and (context_mask.dtype != torch.bool or context_mask.shape != context.shape[:2]):
            raise ValueError(f"context_mask must be bool of shape {tuple(context.shape[:2])}, "
                             f"got {context_mask.dtype} {tuple(context_mask.shape)}")
