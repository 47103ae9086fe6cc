"""Conditions → what the denoiser sees: context tokens for cross-attention, and extra input channels.

    text     frozen TextTower tokens (B, Lt, Dt) → Linear → (B, Lt, D)
    image    ConvImageEncoder (trained with the denoiser; the default) → (B, Li, D),
             or a frozen open_clip ImageTower (B, Li, Di) → Linear → (B, Li, D)
    partial  the VQ-VAE latent of the partial TSDF, zeroed outside the known latent cells, plus the
             known-cell mask: (B, C + 1, r, r, r) channels concatenated to the noisy latent

For each modality in `latent_heads` (text, image), a LatentHead also maps its tokens to an estimate
of the shape's normalized latent (B, C, r, r, r), concatenated to the noisy latent as channels. The
text head reads the tower's own token features (not the cross-attention projection), so it can learn
at its own rate (the trainer's latent_head_lr) without moving the tokens cross-attention reads.

A dropped condition (classifier-free guidance) is replaced by the modality's one learned empty
value, in training and at sampling alike: empty tokens for text and image, empty channels for the
partial shape and for each latent head's estimate. A modality the model was not built with has no
parameters and takes no input. The frozen towers are attached at run time, not saved: their
weights come from their own package or checkpoint, named in the config.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from shapekiln.errors import ShapekilnError

MODALITIES = ("text", "image", "partial")


@dataclass
class Conditions:
    """What a batch is conditioned on; None for a modality absent from the whole batch.

    `drop[m]` (B,) bool marks samples whose modality m is replaced by the learned empty value.
    """

    text: list[str] | None = None
    image: torch.Tensor | None = None  # (B, 3, H, W) float in [0, 1]
    partial: torch.Tensor | None = None  # (B, C + 1, r, r, r) from encode_partial
    drop: dict[str, torch.Tensor] = field(default_factory=dict)


def encode_partial(vqvae: Any, partial_tsdf: torch.Tensor, known_mask: torch.Tensor,
                   latent_mean: torch.Tensor, latent_std: torch.Tensor) -> torch.Tensor:
    """The partial-shape condition: (B, C + 1, r, r, r) = (normalized masked latent, known-cell mask).

    Only the partial TSDF is encoded, with every unknown voxel set to +tau (empty space), so nothing
    of the removed part can reach the latent (SDFusion encodes the whole shape and then masks the
    latent, which leaks the removed part into the kept cells through the encoder's receptive field).
    A latent cell counts as known only when every voxel it covers is known.
    """
    tau = vqvae.config.tau
    neutral = torch.where(known_mask, partial_tsdf, torch.full_like(partial_tsdf, tau))  # (B, 1, R, R, R)
    latent = vqvae.encode(neutral)  # (B, C, r, r, r)
    factor = partial_tsdf.shape[-1] // latent.shape[-1]
    known_cells = -F.max_pool3d(-known_mask.float(), factor)  # min-pool: (B, 1, r, r, r)
    latent = (latent - latent_mean.view(1, -1, 1, 1, 1)) / latent_std.view(1, -1, 1, 1, 1)
    return torch.cat([latent * known_cells, known_cells], dim=1)


def masked_mean(tokens: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """(B, L, D) tokens, (B, L) bool mask (True = real token) or None for all → their mean (B, D), as
    sentence embeddings pool; a row without any real token gives zeros."""
    weights = torch.ones(tokens.shape[:2], device=tokens.device) if mask is None else mask.to(tokens.dtype)
    return (tokens * weights.unsqueeze(-1)).sum(1) / weights.sum(1, keepdim=True).clamp(min=1.0)


class LatentHead(nn.Module):
    """A modality's tokens (B, L, D) → an estimate of the shape's normalized latent (B, C, r, r, r).

    The denoiser gets it as input channels, aligned with the latent grid, which it learns to use far
    sooner than the same information in cross-attention tokens; the trainer also regresses it onto
    the true latent (latent_head_weight), so a trainable encoder learns shape features from step one.
    `pooled` (text): the masked mean of the tokens through an MLP, as sentence embeddings pool; else
    (image, whose token order is the image's layout) one linear map of all tokens.
    """

    def __init__(self, tokens: int, token_dim: int, latent_channels: int, latent_resolution: int, pooled: bool,
                 hidden: int = 512):
        super().__init__()
        self.latent_shape = (latent_channels, latent_resolution, latent_resolution, latent_resolution)
        size = latent_channels * latent_resolution**3
        self.pooled = pooled
        self.proj = (nn.Sequential(nn.Linear(token_dim, hidden), nn.SiLU(), nn.Linear(hidden, size)) if pooled
                     else nn.Linear(tokens * token_dim, size))

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.pooled:
            features = masked_mean(tokens, mask)  # (B, D)
        else:
            features = tokens.flatten(1)  # (B, L·D)
        return self.proj(features).view(-1, *self.latent_shape)


class Encoded(NamedTuple):
    """What ConditionModel makes of a batch's conditions; None where the model has no such input."""

    context: torch.Tensor | None  # (B, L, D) tokens for cross-attention
    context_mask: torch.Tensor | None  # (B, L) bool, True = attend
    channels: torch.Tensor | None  # (B, extra_channels, r, r, r): partial (C + 1), then one C per latent head
    head_latents: dict[str, torch.Tensor]  # each latent head's estimate (B, C, r, r, r) for every given condition, none dropped


class ConditionModel(ModelMixin, ConfigMixin):
    """The trainable side of conditioning: projections, the default image encoder, empty values."""

    @register_to_config
    def __init__(
        self,
        modalities: tuple[str, ...] = ("text", "image", "partial"),
        context_dim: int = 256,
        text_tower: dict | None = None,
        text_dim: int = 384,
        text_tokens: int = 32,
        image_tower: dict | None = None,  # None: the trainable ConvImageEncoder
        image_dim: int = 0,  # the tower's feature size; unused with the ConvImageEncoder
        image_tokens: int = 16,
        image_size: int = 64,
        latent_channels: int = 3,
        latent_resolution: int = 8,
        latent_heads: tuple[str, ...] = (),  # modalities whose latent estimate (LatentHead) is input channels too
    ):
        super().__init__()
        unknown = set(modalities) - set(MODALITIES)
        if unknown or not modalities:
            raise ValueError(f"modalities must be a non-empty subset of {MODALITIES}, got {list(modalities)}")
        if set(latent_heads) - ({"text", "image"} & set(modalities)):
            raise ValueError(f"latent_heads must be conditioned modalities among text and image, got {list(latent_heads)}")
        if "text" in modalities:
            self.text_proj = nn.Linear(text_dim, context_dim)
            self.empty_text = nn.Parameter(0.02 * torch.randn(text_tokens, context_dim))
        if "image" in modalities:
            if image_tower is None:
                from shapekiln.models.encoders import ConvImageEncoder

                self.image_encoder = ConvImageEncoder(context_dim, image_size=image_size)
                if self.image_encoder.num_tokens != image_tokens:
                    raise ValueError(f"image_tokens is {image_tokens} but the image encoder makes {self.image_encoder.num_tokens}")
            else:
                self.image_proj = nn.Linear(image_dim, context_dim)
            self.empty_image = nn.Parameter(0.02 * torch.randn(image_tokens, context_dim))
        if "partial" in modalities:
            self.empty_partial = nn.Parameter(torch.zeros(latent_channels + 1))
        head_inputs = {"text": (text_tokens, text_dim), "image": (image_tokens, context_dim)}
        self.heads = nn.ModuleDict({name: LatentHead(*head_inputs[name], latent_channels, latent_resolution,
                                                     pooled=name == "text") for name in MODALITIES if name in latent_heads})
        self.empty_latents = nn.ParameterDict({name: nn.Parameter(torch.zeros(latent_channels)) for name in self.heads})
        # Frozen towers live outside the state dict (a plain dict is not a registered submodule).
        self.towers: dict[str, nn.Module] = {}

    @property
    def extra_channels(self) -> int:
        """Input channels beside the noisy latent: partial (C + 1) and C per latent head, where present."""
        partial = self.config.latent_channels + 1 if "partial" in self.config.modalities else 0
        return partial + self.config.latent_channels * len(self.heads)

    def attach_towers(self, device: torch.device | str | None = None) -> ConditionModel:
        """Load the frozen text (and image) towers named in the config; they stay out of save_pretrained."""
        from shapekiln.models.encoders import load_image_tower, load_text_tower

        if "text" in self.config.modalities and "text" not in self.towers:
            self.towers["text"] = load_text_tower(self.config.text_tower or "minilm", self.config.text_tokens)
        if "image" in self.config.modalities and self.config.image_tower is not None and "image" not in self.towers:
            self.towers["image"] = load_image_tower(self.config.image_tower)
        for tower in self.towers.values():
            tower.to(device or self.device)
        return self

    def forward(self, conditions: Conditions, batch_size: int) -> Encoded:
        tokens, masks, given = [], [], {}  # given: each modality's own tokens (and mask) before any drop
        if "text" in self.config.modalities:
            text_tokens, text_mask, given["text"] = self._text(conditions, batch_size)
            tokens.append(text_tokens)
            masks.append(text_mask)
        if "image" in self.config.modalities:
            image_tokens, given["image"] = self._image(conditions, batch_size)
            tokens.append(image_tokens)
            masks.append(torch.ones(image_tokens.shape[:2], dtype=torch.bool, device=image_tokens.device))
        channels = [self._partial(conditions, batch_size)] if "partial" in self.config.modalities else []
        head_latents = {}
        r = self.config.latent_resolution
        for name, head in self.heads.items():
            empty = self.empty_latents[name].view(1, -1, 1, 1, 1).expand(batch_size, -1, r, r, r)  # (B, C, r, r, r)
            if given[name] is None:
                channels.append(empty)
                continue
            head_latents[name] = head(*given[name])
            drop = self._dropped(conditions, name, batch_size, True).view(batch_size, 1, 1, 1, 1)
            channels.append(torch.where(drop, empty, head_latents[name]))
        return Encoded(
            context=torch.cat(tokens, dim=1) if tokens else None,  # (B, Lt + Li, D)
            context_mask=torch.cat(masks, dim=1) if masks else None,
            channels=torch.cat(channels, dim=1) if channels else None,  # (B, extra_channels, r, r, r)
            head_latents=head_latents,
        )

    def _dropped(self, conditions: Conditions, name: str, batch_size: int, given: bool) -> torch.Tensor:
        """(B, 1, 1) bool: True where the modality is replaced by its empty value (also where not given)."""
        if not given:
            return torch.ones(batch_size, 1, 1, dtype=torch.bool, device=self.device)
        drop = conditions.drop.get(name)
        if drop is None:
            return torch.zeros(batch_size, 1, 1, dtype=torch.bool, device=self.device)
        return drop.to(self.device, torch.bool).view(batch_size, 1, 1)

    def _text(self, conditions: Conditions, batch_size: int) -> tuple[torch.Tensor, torch.Tensor, tuple | None]:
        """(tokens (B, Lt, D), mask (B, Lt), (the tower's features (B, Lt, Dt), mask) before the drop or None without text)."""
        empty = self.empty_text.unsqueeze(0).expand(batch_size, -1, -1)  # (B, Lt, D)
        all_true = torch.ones(empty.shape[:2], dtype=torch.bool, device=self.device)
        if conditions.text is None:
            return empty, all_true, None
        if len(conditions.text) != batch_size:
            raise ValueError(f"{len(conditions.text)} texts for a batch of {batch_size}")
        if "text" not in self.towers:
            raise ShapekilnError("this model conditions on text but no text model is loaded (call attach_towers)")
        features, mask = self.towers["text"](list(conditions.text))  # (B, Lt, Dt), (B, Lt)
        features, mask = features.to(self.device), mask.to(self.device)
        projected = self.text_proj(features)
        drop = self._dropped(conditions, "text", batch_size, True)
        return torch.where(drop, empty, projected), torch.where(drop[:, :, 0], all_true, mask), (features, mask)

    def _image(self, conditions: Conditions, batch_size: int) -> tuple[torch.Tensor, tuple | None]:
        """(tokens (B, Li, D), (the encoded tokens, None) before the drop or None without images)."""
        empty = self.empty_image.unsqueeze(0).expand(batch_size, -1, -1)  # (B, Li, D)
        if conditions.image is None:
            return empty, None
        encoded = self.image_tokens(conditions.image)
        return torch.where(self._dropped(conditions, "image", batch_size, True), empty, encoded), (encoded, None)

    def image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] → (B, Li, D): the image encoder's (or the projected tower's) tokens, never empty."""
        images = images.to(self.device)
        if self.config.image_tower is None:
            return self.image_encoder(images)
        if "image" not in self.towers:
            raise ShapekilnError("this model uses an open_clip image tower but none is loaded (call attach_towers)")
        return self.image_proj(self.towers["image"](images))

    def _partial(self, conditions: Conditions, batch_size: int) -> torch.Tensor:
        r = self.config.latent_resolution
        empty = self.empty_partial.view(1, -1, 1, 1, 1).expand(batch_size, -1, r, r, r)  # (B, C + 1, r, r, r)
        if conditions.partial is None:
            return empty
        if conditions.partial.shape[1:] != empty.shape[1:]:
            raise ValueError(f"partial condition of shape {tuple(conditions.partial.shape[1:])}, expected {tuple(empty.shape[1:])}")
        drop = self._dropped(conditions, "partial", batch_size, True).view(batch_size, 1, 1, 1, 1)
        return torch.where(drop, empty, conditions.partial.to(self.device))


class LatentDiffusion(nn.Module):
    """The denoiser and its condition model, trained as one module (one optimizer, one EMA, one DDP wrap)."""

    def __init__(self, unet: nn.Module, conditioning: ConditionModel):
        super().__init__()
        self.unet, self.conditioning = unet, conditioning

    def forward(self, noisy_latent: torch.Tensor, timesteps: torch.Tensor, conditions: Conditions,
                return_head_latents: bool = False) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """noisy latent (B, C, r, r, r), timesteps (B,) → the model's prediction (B, C, r, r, r); with
        `return_head_latents`, also the latent heads' estimates (Encoded.head_latents) for their loss."""
        encoded = self.conditioning(conditions, noisy_latent.shape[0])
        inputs = noisy_latent if encoded.channels is None else torch.cat([noisy_latent, encoded.channels.to(noisy_latent.dtype)], dim=1)
        prediction = self.unet(inputs, timesteps, context=encoded.context, context_mask=encoded.context_mask)
        return (prediction, encoded.head_latents) if return_head_latents else prediction
