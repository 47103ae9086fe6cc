"""2D text-to-image diffusion priors for Score Distillation Sampling (DreamFusion), behind one interface.

    DiffusionPrior        noise prediction given a noisy image, a timestep, text (and optionally the camera)
    ViewPrior             the embedded default: a small pixel-space diffusers UNet2D trained on the dataset's
                          own captioned views (train/view_prior.py), text through the frozen MiniLM tower,
                          optionally camera-conditioned (azimuth/elevation) against the Janus problem
    StableDiffusionPrior  a local diffusers Stable Diffusion directory (latent SDS)
    sds_loss              w(t)·(ε̂ − ε) with classifier-free guidance, as a scalar surrogate loss
    load_prior            a folder → the right prior (PRIORS: name → class)

Nothing is downloaded and every weight file is read with safetensors, never unpickled.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from diffusers.utils.torch_utils import randn_tensor
from torch import nn

from shapekiln.errors import ShapekilnError, first_line
from shapekiln.models.conditioning import masked_mean

VIEW_PRIOR_FILE = "view_prior.json"
EMPTY_TEXT_FILE = "empty_text.safetensors"
VIEW_HEAD_FILE = "view_head.safetensors"
VIEW_PRIOR_FORMAT = 1
CAMERA_FEATURES = 4  # sin/cos of azimuth and elevation
STABLE_DIFFUSION_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


@dataclass
class TextCondition:
    """Per-token text features for cross-attention: tokens (B, L, D), mask (B, L) bool (True = real token)
    or None when the model attends to every position (Stable Diffusion was trained without a mask)."""

    tokens: torch.Tensor
    mask: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @staticmethod
    def cat(first: TextCondition, second: TextCondition) -> TextCondition:
        if (first.mask is None) != (second.mask is None) or first.tokens.shape[1:] != second.tokens.shape[1:]:
            raise ShapekilnError("cannot batch two text conditions of different shapes (are they from the same prior?)")
        mask = None if first.mask is None else torch.cat([first.mask, second.mask])
        return TextCondition(torch.cat([first.tokens, second.tokens]), mask)

    def where(self, keep: torch.Tensor, other: TextCondition) -> TextCondition:
        """Per sample: this condition where `keep` (B,) is True, else `other` (caption dropout)."""
        tokens = torch.where(keep.view(-1, 1, 1), self.tokens, other.tokens)
        mask = None if self.mask is None else torch.where(keep.view(-1, 1), self.mask, other.mask)
        return TextCondition(tokens, mask)


class DiffusionPrior(nn.Module):
    """Noise prediction given a noisy image, t and text. Subclasses set the attributes below."""

    scheduler: DDPMScheduler  # its alphas_cumprod / add_noise / config.num_train_timesteps
    text_conditioned: bool
    camera_conditioned: bool
    image_size: int  # renders are resized (bilinear, antialias) to this many pixels

    def encode_text(self, prompts: list[str]) -> TextCondition:
        raise NotImplementedError

    def empty_text(self, batch: int) -> TextCondition:
        raise NotImplementedError

    def encode_images(self, rgb: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] → x0 in the diffusion space, differentiable."""
        raise NotImplementedError

    def predict_noise(self, x_t: torch.Tensor, t: torch.Tensor, text: TextCondition,
                      cameras: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """x0 → RGB in [0, 1] (previews)."""
        raise NotImplementedError

    def guided_noise(self, x_t: torch.Tensor, t: torch.Tensor, text: TextCondition | None, guidance_scale: float,
                     cameras: torch.Tensor | None = None, negative: TextCondition | None = None) -> torch.Tensor:
        """ε̂ = ε(x_t, n) + s·(ε(x_t, c) − ε(x_t, n)), both branches in one predict_noise call of batch 2B, where
        n is the empty text ∅, or the `negative` prompt (as diffusers' negative_prompt: guidance then pushes
        away from it). `text` None: ε(x_t, ∅) alone (unconditional); s = 1: ε(x_t, c) alone."""
        batch = x_t.shape[0]
        if text is None:
            return self.predict_noise(x_t, t, self.empty_text(batch), cameras)
        if guidance_scale == 1.0:
            return self.predict_noise(x_t, t, text, cameras)
        if negative is not None and len(negative) != batch:
            raise ShapekilnError(f"{len(negative)} negative text conditions for {batch} images")
        t = torch.as_tensor(t, device=x_t.device).reshape(-1).expand(batch)
        both = TextCondition.cat(negative if negative is not None else self.empty_text(batch), text)
        cameras_both = None if cameras is None else torch.cat([cameras, cameras])
        unconditional, conditional = self.predict_noise(torch.cat([x_t, x_t]), torch.cat([t, t]), both, cameras_both).chunk(2)
        return unconditional + guidance_scale * (conditional - unconditional)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device


def as_epsilon(output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, scheduler: DDPMScheduler) -> torch.Tensor:
    """A UNet's output as ε, whatever its scheduler's `prediction_type`: ε itself; for v (SD 2.x at 768,
    x_t = √ᾱ·x0 + √(1−ᾱ)·ε, v = √ᾱ·ε − √(1−ᾱ)·x0) ε = √ᾱ·v + √(1−ᾱ)·x_t; for x0 ("sample")
    ε = (x_t − √ᾱ·x0) / √(1−ᾱ)."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return output
    alpha = scheduler.alphas_cumprod.to(x_t.device)[t].to(output.dtype).view(-1, *([1] * (x_t.ndim - 1)))
    x_t = x_t.to(output.dtype)
    if kind == "v_prediction":
        return alpha.sqrt() * output + (1 - alpha).sqrt() * x_t
    if kind == "sample":
        return (x_t - alpha.sqrt() * output) / (1 - alpha).sqrt()
    raise ShapekilnError(f"unknown prediction_type {kind!r} in the prior's scheduler (epsilon, v_prediction or sample)")


def resize_images(rgb: torch.Tensor, size: int) -> torch.Tensor:
    """(B, 3, H, W) float → (B, 3, size, size), bilinear with antialiasing; differentiable."""
    if rgb.ndim != 4 or rgb.shape[1] != 3:
        raise ShapekilnError(f"images must be (B, 3, H, W) RGB in [0, 1], got shape {tuple(rgb.shape)}")
    if not rgb.is_floating_point():
        raise ShapekilnError(f"images must be float in [0, 1], got {rgb.dtype}")
    if rgb.shape[-2:] == (size, size):
        return rgb
    return F.interpolate(rgb, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


# ---------------------------------------------------------------------------------------------------
# SDS


@dataclass
class SDSOutput:
    loss: torch.Tensor  # scalar surrogate: d loss / d x0 == grad (summed over the batch)
    grad: torch.Tensor  # w(t)·(ε̂ − ε), detached, shape of x0
    noise_pred: torch.Tensor  # ε̂ (guided)


def sds_loss(prior: DiffusionPrior, rgb: torch.Tensor, text: TextCondition | None, *, guidance_scale: float,
             t: torch.Tensor, noise: torch.Tensor | None = None, cameras: torch.Tensor | None = None,
             weighting: str = "sds", generator: torch.Generator | None = None,
             negative: TextCondition | None = None) -> SDSOutput:
    """Score Distillation Sampling (DreamFusion, eq. 3) for renders `rgb` (B, 3, H, W) in [0, 1].

    ε̂ = ε(x_t, n) + s·(ε(x_t, c) − ε(x_t, n)), both branches in one predict_noise call of batch 2B and no
    gradient through the denoiser; grad = w(t)·(ε̂ − ε) with w = 1 − ᾱ_t ("sds") or 1 ("uniform").
    n is the empty text, or `negative` (a prompt to move away from). `text` None: unconditional SDS.
    """
    if weighting not in ("sds", "uniform"):
        raise ShapekilnError(f"weighting must be 'sds' or 'uniform', got {weighting!r}")
    x0 = prior.encode_images(rgb)  # (B, C, h, w) with gradient to rgb
    batch = x0.shape[0]
    scheduler = prior.scheduler
    t = torch.as_tensor(t, device=x0.device).long().reshape(-1)
    t = t.expand(batch) if t.numel() == 1 else t
    if t.shape != (batch,):
        raise ShapekilnError(f"t must be one timestep or one per image ({batch}), got shape {tuple(t.shape)}")
    if t.min() < 0 or t.max() >= scheduler.config.num_train_timesteps:
        raise ShapekilnError(f"timesteps must lie in [0, {scheduler.config.num_train_timesteps - 1}], got {t.tolist()}")
    if noise is None:
        noise = randn_tensor(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    elif noise.shape != x0.shape:
        raise ShapekilnError(f"noise must have the shape of x0 {tuple(x0.shape)}, got {tuple(noise.shape)}")
    if text is not None and len(text) != batch:
        raise ShapekilnError(f"{len(text)} text conditions for {batch} images")

    with torch.no_grad():
        x_t = scheduler.add_noise(x0.detach(), noise, t)
        noise_pred = prior.guided_noise(x_t, t, text, guidance_scale, cameras, negative=negative)
        alphas_cumprod = scheduler.alphas_cumprod.to(x0.device)[t].to(x0.dtype).view(-1, *([1] * (x0.ndim - 1)))
        weight = 1.0 - alphas_cumprod if weighting == "sds" else torch.ones_like(alphas_cumprod)
        # NaN stays NaN: the caller must see a broken prior (refine stops on it) rather than a zero push.
        grad = weight * (noise_pred.to(x0.dtype) - noise)
    # d/dx0 of 0.5·|x0 − target|² with target = (x0 − grad) held fixed is exactly grad.
    target = (x0 - grad).detach()
    loss = 0.5 * ((x0 - target) ** 2).sum()
    return SDSOutput(loss=loss, grad=grad, noise_pred=noise_pred)


# ---------------------------------------------------------------------------------------------------
# The embedded view prior


def camera_features(cameras: torch.Tensor | None, batch: int, device: torch.device) -> torch.Tensor:
    """(B, 2) azimuth, elevation in degrees → (B, 4) sin/cos features; None → zeros, the "unknown view"
    (a real camera never gives all zeros, since sin² + cos² = 1; training drops cameras to it)."""
    if cameras is None:
        return torch.zeros(batch, CAMERA_FEATURES, device=device)
    cameras = torch.as_tensor(cameras, dtype=torch.float32, device=device)
    if cameras.shape != (batch, 2):
        raise ShapekilnError(f"cameras must be (B, 2) azimuth, elevation in degrees for B={batch}, got shape {tuple(cameras.shape)}")
    radians = torch.deg2rad(cameras)
    return torch.stack([radians[:, 0].sin(), radians[:, 0].cos(), radians[:, 1].sin(), radians[:, 1].cos()], dim=1)


def azimuth_elevation(world_to_camera: torch.Tensor) -> torch.Tensor:
    """(..., 4, 4) world-to-camera → (..., 2) azimuth, elevation in degrees of the camera center −Rᵀt
    (data_prep.render.look_at_origin's convention: azimuth 0 on +Z growing towards +X)."""
    rotation, translation = world_to_camera[..., :3, :3], world_to_camera[..., :3, 3]
    center = -(rotation.transpose(-1, -2) @ translation[..., None])[..., 0]  # (..., 3)
    azimuth = torch.rad2deg(torch.atan2(center[..., 0], center[..., 2]))
    elevation = torch.rad2deg(torch.asin((center[..., 1] / center.norm(dim=-1).clamp_min(1e-8)).clamp(-1.0, 1.0)))
    return torch.stack([azimuth, elevation], dim=-1)


class ViewHead(nn.Module):
    """Text and camera → an estimate of the view (B, 3, S, S) in [-1, 1]: the caption's mean image from that
    viewpoint, fed to the UNet as three more input channels (the latent diffusion model's LatentHead, in 2D).

    The trainer regresses it onto the clean view, so the denoiser gets the caption spatially aligned with the
    image instead of only through cross-attention. It sees exactly what the UNet sees: the masked mean of the
    text tokens (the learned empty text when the caption is dropped, so the unconditional branch of guidance
    gets the data's mean view) and the camera features (zeros for the unknown view). Measured at the small
    budget (README): trained at its own higher rate (`conditioning.view_head_lr`, as the LDM's latent heads)
    it makes the prior read geometric words ("tall" vs "short"), which without it changed nothing.
    """

    def __init__(self, text_dim: int, image_size: int, hidden: int = 512):
        super().__init__()
        self.image_size = image_size
        self.net = nn.Sequential(nn.Linear(text_dim + CAMERA_FEATURES, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, 3 * image_size * image_size))

    def forward(self, text: TextCondition, camera: torch.Tensor) -> torch.Tensor:
        """text tokens (B, L, D) with mask (B, L), camera features (B, CAMERA_FEATURES) → (B, 3, S, S)."""
        pooled = masked_mean(text.tokens.float(), text.mask)  # (B, D)
        features = torch.cat([pooled, camera.to(pooled.dtype)], dim=1)
        return torch.tanh(self.net(features)).view(-1, 3, self.image_size, self.image_size)


class ViewPrior(DiffusionPrior):
    """Pixel-space text-to-image prior: diffusers UNet2DConditionModel + DDPMScheduler, images in [-1, 1].

    Text: per-token features of a frozen tower (cross-attention with its mask), or none at all. One learned
    "empty text" token stands for "no prompt", both for caption dropout in training and for the
    unconditional branch of guidance. Cameras (optional): sin/cos of azimuth and elevation through the
    UNet's projection class embedding. With `view_head`, a ViewHead's estimate of the view from the text and
    camera is concatenated to the noisy image (the UNet then has 6 input channels).
    """

    def __init__(self, unet: UNet2DConditionModel, scheduler: DDPMScheduler, text_tower: Any | None, *,
                 camera: bool, background: str = "white", text_tokens: int = 1, view_head: bool = False):
        super().__init__()
        self.unet, self.scheduler, self.text_tower = unet, scheduler, text_tower
        self.text_conditioned = text_tower is not None
        self.camera_conditioned = bool(camera)
        self.image_size = int(unet.config.sample_size)
        self.background = background
        self.context_dim = int(unet.config.cross_attention_dim)
        self.text_tokens = int(text_tower.max_tokens) if text_tower is not None else int(text_tokens)
        # important! one learned value for "no prompt": caption dropout trains it, guidance uses it.
        self.empty_token = nn.Parameter(0.02 * torch.randn(1, self.context_dim))
        if view_head and text_tower is None:
            raise ShapekilnError("a view head reads the text: it needs a text-conditioned prior")
        expected = 6 if view_head else 3
        if unet.config.in_channels != expected:
            raise ShapekilnError(f"the view prior's UNet takes {unet.config.in_channels} input channels, but "
                                 f"{'with' if view_head else 'without'} a view head it needs {expected}")
        self.view_head = ViewHead(self.context_dim, self.image_size) if view_head else None

    @classmethod
    def create(cls, *, image_size: int, block_out_channels: Sequence[int], layers_per_block: int,
               attention: Sequence[bool], head_dim: int, norm_groups: int, text: str | dict | None, text_tokens: int,
               camera: bool, background: str = "white", num_train_timesteps: int = 1000, beta_schedule: str = "squaredcos_cap_v2",
               beta_start: float = 1e-4, beta_end: float = 0.02, view_head: bool = False) -> ViewPrior:
        """A fresh (untrained) prior."""
        from shapekiln.models.encoders import load_text_tower

        if len(attention) != len(block_out_channels):
            raise ShapekilnError(f"attention needs one flag per level ({len(block_out_channels)}), got {len(attention)}")
        if image_size % 2 ** (len(block_out_channels) - 1):
            raise ShapekilnError(f"image_size {image_size} is not divisible by 2^{len(block_out_channels) - 1} (one halving per level)")
        if any(channels % head_dim or channels % norm_groups for channels in block_out_channels):
            raise ShapekilnError(f"block_out_channels {list(block_out_channels)} must be multiples of head_dim {head_dim} and norm_groups {norm_groups}")
        tower = load_text_tower(text, text_tokens) if text is not None else None
        down = tuple("CrossAttnDownBlock2D" if flag else "DownBlock2D" for flag in attention)
        up = tuple("CrossAttnUpBlock2D" if flag else "UpBlock2D" for flag in reversed(attention))
        unet = UNet2DConditionModel(
            sample_size=image_size, in_channels=6 if view_head else 3, out_channels=3, block_out_channels=tuple(block_out_channels),
            layers_per_block=layers_per_block, down_block_types=down, up_block_types=up, norm_num_groups=norm_groups,
            cross_attention_dim=tower.dim if tower is not None else block_out_channels[0],
            # diffusers' legacy name: this "attention_head_dim" is the number of heads per level.
            attention_head_dim=tuple(channels // head_dim for channels in block_out_channels),
            class_embed_type="projection" if camera else None,
            projection_class_embeddings_input_dim=CAMERA_FEATURES if camera else None,
        )
        scheduler = DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule,
                                  beta_start=beta_start, beta_end=beta_end, prediction_type="epsilon")
        return cls(unet, scheduler, tower, camera=camera, background=background, text_tokens=text_tokens, view_head=view_head)

    # -- the DiffusionPrior interface --

    def encode_text(self, prompts: list[str]) -> TextCondition:
        if self.text_tower is None:
            raise ShapekilnError("this prior was trained without text: give no prompt (unconditional SDS) or use a text-conditioned prior")
        if isinstance(prompts, str):
            prompts = [prompts]
        tokens, mask = self.text_tower(list(prompts))  # (B, L, D), (B, L)
        return TextCondition(tokens.to(self.empty_token.device), mask.to(self.empty_token.device))

    def empty_text(self, batch: int) -> TextCondition:
        """The learned token in position 0, zeros after it; only position 0 is attended to."""
        device = self.empty_token.device
        first = self.empty_token.expand(batch, 1, self.context_dim)
        tokens = torch.cat([first, first.new_zeros(batch, self.text_tokens - 1, self.context_dim)], dim=1)  # (B, L, D)
        mask = torch.zeros(batch, self.text_tokens, dtype=torch.bool, device=device)
        mask[:, 0] = True
        return TextCondition(tokens, mask)

    def encode_images(self, rgb: torch.Tensor) -> torch.Tensor:
        return resize_images(rgb, self.image_size) * 2.0 - 1.0  # (B, 3, S, S) in [-1, 1]

    def predict_noise(self, x_t: torch.Tensor, t: torch.Tensor, text: TextCondition | None,
                      cameras: torch.Tensor | None = None) -> torch.Tensor:
        return self(x_t, t, text, cameras)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, text: TextCondition | None, cameras: torch.Tensor | None = None,
                drop_text: torch.Tensor | None = None, drop_camera: torch.Tensor | None = None,
                return_view_estimate: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]:
        """ε̂ (B, 3, S, S). Training passes `drop_text` / `drop_camera` (B,) bool: those samples get the empty
        text and the unknown view (inside forward, so the learned empty token trains under DDP too); with
        `return_view_estimate`, also the view head's estimate (B, 3, S, S) for its loss (None without a head)."""
        batch = x_t.shape[0]
        empty = self.empty_text(batch)
        text = empty if text is None else text
        if drop_text is not None:
            text = empty.where(drop_text.to(x_t.device), text)
        features = camera_features(cameras if self.camera_conditioned else None, batch, x_t.device)
        if self.camera_conditioned and drop_camera is not None:
            features = features * (~drop_camera.to(x_t.device)).float()[:, None]
        estimate = None
        if self.view_head is not None:
            estimate = self.view_head(text, features)
            x_t = torch.cat([x_t, estimate.to(x_t.dtype)], dim=1)  # (B, 6, S, S)
        t = torch.as_tensor(t, device=x_t.device).reshape(-1).expand(batch)
        noise = self.unet(x_t, t, encoder_hidden_states=text.tokens.to(x_t.dtype), encoder_attention_mask=text.mask,
                          class_labels=features if self.camera_conditioned else None).sample
        return (noise, estimate) if return_view_estimate else noise

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        return ((x0 + 1.0) / 2.0).clamp(0.0, 1.0)

    # -- sampling (previews, tests) --

    @torch.no_grad()
    def sample(self, prompts: list[str] | int, steps: int = 25, guidance_scale: float = 3.0,
               generator: torch.Generator | None = None, cameras: torch.Tensor | None = None) -> torch.Tensor:
        """DDIM samples (N, 3, S, S) in [0, 1], for prompts (or N unconditional images when an int)."""
        unconditional = isinstance(prompts, int)
        count = prompts if unconditional else len(prompts)
        device = self.empty_token.device
        sampler = DDIMScheduler.from_config(self.scheduler.config)
        sampler.set_timesteps(steps, device=device)
        image = randn_tensor((count, 3, self.image_size, self.image_size), generator=generator, device=device)
        text = None if unconditional else self.encode_text(list(prompts))
        if cameras is not None:
            cameras = torch.as_tensor(cameras, dtype=torch.float32, device=device)
        for t in sampler.timesteps:
            noise_pred = self.guided_noise(image, t, text, guidance_scale, cameras)
            image = sampler.step(noise_pred, t, image, generator=generator).prev_sample
        return self.decode(image)

    # -- saving and loading --

    def save_pretrained(self, folder: str | Path) -> None:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.unet.save_pretrained(str(folder / "unet"), safe_serialization=True)
        self.scheduler.save_pretrained(str(folder / "scheduler"))
        save_file({"empty_token": self.empty_token.detach().float().cpu().contiguous()}, str(folder / EMPTY_TEXT_FILE))
        if self.view_head is not None:
            save_file({name: value.detach().float().cpu().contiguous() for name, value in self.view_head.state_dict().items()},
                      str(folder / VIEW_HEAD_FILE))
        description = {
            "format": VIEW_PRIOR_FORMAT,
            "text": self.text_tower.spec if self.text_tower is not None else None,
            "text_tokens": self.text_tokens,
            "image_size": self.image_size,
            "camera": self.camera_conditioned,
            "view_head": self.view_head is not None,
            "background": self.background,  # what the training views were composited over
            "prediction_type": "epsilon",
            "value_range": [-1.0, 1.0],
        }
        (folder / VIEW_PRIOR_FILE).write_text(json.dumps(description, indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, folder: str | Path, device: str | torch.device = "cpu") -> ViewPrior:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        from shapekiln.models.encoders import load_text_tower

        folder = Path(folder)
        try:
            description = json.loads((folder / VIEW_PRIOR_FILE).read_text())
            text, camera = description["text"], bool(description["camera"])
            background, text_tokens = str(description["background"]), int(description["text_tokens"])
            view_head = bool(description.get("view_head", False))  # absent in priors saved before view heads
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise ShapekilnError(f"{folder / VIEW_PRIOR_FILE} is not a view-prior description ({type(error).__name__}: {error})") from None
        for part in ("unet", "scheduler", EMPTY_TEXT_FILE) + ((VIEW_HEAD_FILE,) if view_head else ()):
            if not (folder / part).exists():
                raise ShapekilnError(f"view prior {folder} is incomplete: {part} is missing")
        try:
            unet = UNet2DConditionModel.from_pretrained(str(folder / "unet"), use_safetensors=True, local_files_only=True)
            scheduler = DDPMScheduler.from_pretrained(str(folder / "scheduler"), local_files_only=True)
            empty = load_file(str(folder / EMPTY_TEXT_FILE))["empty_token"]
            head = load_file(str(folder / VIEW_HEAD_FILE)) if view_head else None
        except (OSError, ValueError, KeyError, SafetensorError) as error:
            raise ShapekilnError(f"cannot load view prior {folder}: {first_line(error)}") from None
        tower = load_text_tower(text) if text is not None else None
        prior = cls(unet, scheduler, tower, camera=camera, background=background, text_tokens=text_tokens, view_head=view_head)
        if empty.shape != prior.empty_token.shape:
            raise ShapekilnError(f"view prior {folder}: {EMPTY_TEXT_FILE} holds shape {tuple(empty.shape)}, the UNet needs {tuple(prior.empty_token.shape)}")
        with torch.no_grad():
            prior.empty_token.copy_(empty)
        if head is not None:
            try:
                prior.view_head.load_state_dict(head)
            except RuntimeError as error:
                raise ShapekilnError(f"view prior {folder}: {VIEW_HEAD_FILE} does not fit this prior ({first_line(error)})") from None
        return prior.to(device).eval()


# ---------------------------------------------------------------------------------------------------
# Stable Diffusion


class StableDiffusionPrior(DiffusionPrior):
    """A local diffusers Stable Diffusion directory as a frozen latent-space prior.

    x0 is the VAE latent (mean of the posterior, × scaling_factor) of the render resized to the model's
    resolution; "no prompt" is the tokenizer's empty string, as SD was trained with.
    """

    text_conditioned = True
    camera_conditioned = False

    def __init__(self, unet: nn.Module, vae: nn.Module, text_encoder: nn.Module, tokenizer: Any, scheduler: DDPMScheduler):
        super().__init__()
        self.unet, self.vae, self.text_encoder, self.tokenizer, self.scheduler = unet, vae, text_encoder, tokenizer, scheduler
        for module in (unet, vae, text_encoder):
            module.requires_grad_(False).eval()
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.image_size = int(unet.config.sample_size) * self.vae_scale_factor
        self._empty: TextCondition | None = None

    @classmethod
    def from_pretrained(cls, folder: str | Path, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32) -> StableDiffusionPrior:
        from diffusers import AutoencoderKL
        from transformers import CLIPTextModel, CLIPTokenizer

        folder = Path(folder)
        for part in STABLE_DIFFUSION_PARTS:
            if not (folder / part).is_dir():
                raise ShapekilnError(f"Stable Diffusion directory {folder} has no {part}/ folder")
        try:
            unet = UNet2DConditionModel.from_pretrained(str(folder), subfolder="unet", use_safetensors=True, local_files_only=True, torch_dtype=dtype)
            vae = AutoencoderKL.from_pretrained(str(folder), subfolder="vae", use_safetensors=True, local_files_only=True, torch_dtype=dtype)
            text_encoder = CLIPTextModel.from_pretrained(str(folder / "text_encoder"), use_safetensors=True, local_files_only=True,
                                                         dtype=dtype)  # `dtype=`: transformers >= 4.56 (pyproject)
            tokenizer = CLIPTokenizer.from_pretrained(str(folder / "tokenizer"), local_files_only=True)
            # Whatever sampler the directory saved (PNDM, DDIM, ...): SDS needs only its training schedule.
            scheduler = DDPMScheduler.from_pretrained(str(folder), subfolder="scheduler", local_files_only=True)
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise ShapekilnError(f"cannot load Stable Diffusion from {folder}: {first_line(error)}") from None
        return cls(unet, vae, text_encoder, tokenizer, scheduler).to(device)

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> TextCondition:
        if isinstance(prompts, str):
            prompts = [prompts]
        ids = self.tokenizer(list(prompts), padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids.to(self.device)
        return TextCondition(self.text_encoder(ids)[0])  # (B, 77, D), no mask: SD attends to the padding too

    def empty_text(self, batch: int) -> TextCondition:
        if self._empty is None or self._empty.tokens.device != self.device:
            self._empty = self.encode_text([""])
        return TextCondition(self._empty.tokens.expand(batch, -1, -1))

    def encode_images(self, rgb: torch.Tensor) -> torch.Tensor:
        pixels = resize_images(rgb, self.image_size).to(self.device, self.vae.dtype) * 2.0 - 1.0
        return self.vae.encode(pixels).latent_dist.mean * self.vae.config.scaling_factor  # (B, 4, S/f, S/f)

    def predict_noise(self, x_t: torch.Tensor, t: torch.Tensor, text: TextCondition,
                      cameras: torch.Tensor | None = None) -> torch.Tensor:
        t = torch.as_tensor(t, device=x_t.device).reshape(-1).expand(x_t.shape[0])
        output = self.unet(x_t.to(self.unet.dtype), t, encoder_hidden_states=text.tokens.to(self.unet.dtype)).sample
        return as_epsilon(output, x_t, t, self.scheduler)

    @torch.no_grad()
    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        image = self.vae.decode(x0.to(self.vae.dtype) / self.vae.config.scaling_factor).sample
        return ((image.float() + 1.0) / 2.0).clamp(0.0, 1.0)


# ---------------------------------------------------------------------------------------------------
# Loading by folder

PRIORS: dict[str, type[DiffusionPrior]] = {"view-prior": ViewPrior, "stable-diffusion": StableDiffusionPrior}


def prior_kind(path: str | Path) -> str:
    """'view-prior' or 'stable-diffusion' from what the folder holds; a ShapekilnError otherwise."""
    path = Path(path)
    if not path.exists():
        raise ShapekilnError(f"prior not found: {path}")
    if not path.is_dir():
        raise ShapekilnError(f"prior {path} is not a directory (a view-prior folder or a diffusers Stable Diffusion directory)")
    if (path / VIEW_PRIOR_FILE).is_file():
        return "view-prior"
    if (path / "model_index.json").is_file():
        return "stable-diffusion"
    raise ShapekilnError(f"{path} is neither a view prior (no {VIEW_PRIOR_FILE}) nor a diffusers Stable Diffusion directory (no model_index.json)")


def load_prior(path: str | Path, device: str | torch.device = "cpu") -> DiffusionPrior:
    """A view-prior folder (view_prior.json) → ViewPrior; a diffusers Stable Diffusion directory
    (model_index.json + unet/ vae/ text_encoder/ tokenizer/ scheduler/) → StableDiffusionPrior."""
    return PRIORS[prior_kind(path)].from_pretrained(path, device=device)

