"""`ShapePipeline`: text / image / partial shape → TSDF grids and meshes, with multi-modal guidance.

A saved pipeline is a folder in diffusers' layout:

    unet/           UNet3DModel (config.json + safetensors)
    conditioning/   ConditionModel: projections, the image encoder, learned empty values
    vqvae/          the VQ-VAE whose latents the denoiser works in
    scheduler/      the training noise schedule (a DDPMScheduler config)
    pipeline.json   latent mean/std, grid size, truncation, sampling defaults

Guidance (DESIGN.md): eps = eps(z, ∅) + Σ_i s_i · (eps(z, c_i) − eps(z, ∅)), one weight per given
modality, the 1 + n evaluations stacked into one batch.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

import numpy as np
import torch
import trimesh
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler
from tqdm import tqdm

from shapekiln.data_prep.preview import tsdf_to_mesh
from shapekiln.errors import ShapekilnError
from shapekiln.models.conditioning import MODALITIES, ConditionModel, Conditions, LatentDiffusion, encode_partial
from shapekiln.models.io import load_pretrained
from shapekiln.models.unet3d import UNet3DModel
from shapekiln.models.vqvae import VQVAE

SCHEDULERS = ("ddim", "dpm++", "ddpm")


@dataclass
class PipelineConfig:
    """pipeline.json: what the sampler needs beyond the models' own configs."""

    latent_mean: list[float]
    latent_std: list[float]
    resolution: int
    tau: float
    steps: int = 50
    scheduler: str = "ddim"
    guidance: float = 3.0
    mc_level: float = 0.0  # marching-cubes level of the output meshes (SDFusion's paper setting: 0.02)


@dataclass
class Shape:
    """One generated shape: the TSDF grid (R, R, R), negative inside, and its marching-cubes mesh.

    After SDS refinement `unrefined` holds the sampled grid before it, and `colors` the optimized
    albedo grid (3, R, R, R) when color was refined (the mesh then has vertex colors).
    """

    tsdf: np.ndarray
    level: float = 0.0
    colors: np.ndarray | None = None
    unrefined: np.ndarray | None = None
    refine_stopped: str | None = None  # why refinement ended early (non-finite values; the grid is the last finite state)
    _mesh: trimesh.Trimesh | None = field(default=None, repr=False)

    @property
    def mesh(self) -> trimesh.Trimesh:
        if self._mesh is None:
            if self.colors is None:
                self._mesh = tsdf_to_mesh(self.tsdf, self.level)
            else:
                from shapekiln.sample.refine import colored_mesh

                self._mesh = colored_mesh(self.tsdf, self.colors, self.level)
        return self._mesh


@dataclass
class ShapeOutput:
    shapes: list[Shape]
    latents: torch.Tensor  # (N, C, r, r, r), unnormalized, before quantization


class ShapePipeline:
    """`refine` (a sample.refine.RefineConfig) makes every call end with SDS refinement toward its prompt,
    under the 2D `prior` (a DiffusionPrior or the path of one; from_pretrained's default: the folder's view_prior/)."""

    def __init__(self, unet: UNet3DModel, conditioning: ConditionModel, vqvae: VQVAE, scheduler: DDPMScheduler,
                 config: PipelineConfig, refine: Any = None, prior: Any = None):
        self.unet, self.conditioning, self.vqvae = unet, conditioning, vqvae  # modes are the caller's (from_pretrained: eval)
        self.scheduler, self.config = scheduler, config
        self.refine, self.prior = refine, prior
        self.model = LatentDiffusion(self.unet, self.conditioning)
        self.latent_mean = torch.tensor(config.latent_mean, dtype=torch.float32)
        self.latent_std = torch.tensor(config.latent_std, dtype=torch.float32)

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(self.conditioning.config.modalities)

    @property
    def device(self) -> torch.device:
        return self.unet.device

    def to(self, device: torch.device | str) -> ShapePipeline:
        for module in (self.unet, self.conditioning, self.vqvae):
            module.to(device)
        for tower in self.conditioning.towers.values():
            tower.to(device)
        return self

    @classmethod
    def from_pretrained(cls, path: str | Path, device: torch.device | str = "cpu", refine: Any = None,
                        prior: Any = None) -> ShapePipeline:
        path = Path(path)
        if not (path / "pipeline.json").is_file():
            raise ShapekilnError(f"{path} is not a saved shape pipeline (no pipeline.json); give the folder `shapekiln train ldm` wrote")
        try:
            config = PipelineConfig(**json.loads((path / "pipeline.json").read_text()))
        except (ValueError, TypeError) as error:
            raise ShapekilnError(f"{path / 'pipeline.json'} is not a valid pipeline description ({error})") from None
        vqvae = load_pretrained(VQVAE, path / "vqvae", expect={"resolution": config.resolution})
        unet = load_pretrained(UNet3DModel, path / "unet")
        conditioning = load_pretrained(ConditionModel, path / "conditioning")
        if not (path / "scheduler" / "scheduler_config.json").is_file():
            raise ShapekilnError(f"{path} has no scheduler/scheduler_config.json")
        scheduler = DDPMScheduler.from_pretrained(str(path / "scheduler"))
        conditioning.attach_towers(device)
        if refine is not None and prior is None and (path / "view_prior").is_dir():
            prior = path / "view_prior"
        return cls(unet.eval(), conditioning.eval(), vqvae.eval(), scheduler, config, refine, prior).to(device)

    def save_pretrained(self, path: str | Path) -> Path:
        """Write the folder under a temporary name and rename it into place: never half-written."""
        path = Path(path)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        if temporary.exists():
            shutil.rmtree(temporary)
        self.unet.save_pretrained(str(temporary / "unet"))
        self.conditioning.save_pretrained(str(temporary / "conditioning"))
        self.vqvae.save_pretrained(str(temporary / "vqvae"))
        self.scheduler.save_pretrained(str(temporary / "scheduler"))
        (temporary / "pipeline.json").write_text(json.dumps(self.config.__dict__, indent=2) + "\n")
        if path.exists():
            shutil.rmtree(path)
        temporary.rename(path)
        return path

    def sampler(self, name: str) -> Any:
        """A fresh diffusers scheduler of the named kind, on this pipeline's training noise schedule."""
        # No clipping of the predicted clean latent: the latents are unit-variance, not images in [-1, 1].
        # Both ODE samplers take "trailing" steps: they start at the last training timestep, where the sampler's pure
        # noise belongs. The training schedule's "leading" starts 50 DDIM steps at t = 980 and 20 DPM-Solver++ steps at
        # t = 940; with DDIM leading, learned completions' UHD was 4% above DPM++-20's, with both trailing 0.8% (README).
        if name == "ddim":
            return DDIMScheduler.from_config(self.scheduler.config, clip_sample=False, timestep_spacing="trailing")
        if name == "dpm++":
            return DPMSolverMultistepScheduler.from_config(self.scheduler.config, algorithm_type="dpmsolver++", thresholding=False,
                                                           timestep_spacing="trailing")
        if name == "ddpm":
            return DDPMScheduler.from_config(self.scheduler.config, clip_sample=False)
        raise ShapekilnError(f"unknown scheduler {name!r} (choose one of {', '.join(SCHEDULERS)})")

    def normalize(self, latent: torch.Tensor) -> torch.Tensor:
        return (latent - self.latent_mean.to(latent).view(1, -1, 1, 1, 1)) / self.latent_std.to(latent).view(1, -1, 1, 1, 1)

    def denormalize(self, latent: torch.Tensor) -> torch.Tensor:
        return latent * self.latent_std.to(latent).view(1, -1, 1, 1, 1) + self.latent_mean.to(latent).view(1, -1, 1, 1, 1)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Latent (N, C, r, r, r), unnormalized → TSDF (N, 1, R, R, R): the VQ-VAE decodes it, clamped to ±tau."""
        return self.vqvae.decode(latent).clamp(-self.config.tau, self.config.tau)

    @torch.no_grad()
    def __call__(
        self,
        text: str | None = None,
        image: Any = None,
        partial: np.ndarray | torch.Tensor | None = None,
        known_mask: np.ndarray | torch.Tensor | None = None,
        guidance: Mapping[str, float] | None = None,
        num_samples: int = 1,
        steps: int | None = None,
        scheduler: str | None = None,
        seed: int = 0,
        completion: Literal["learned", "inpaint"] = "learned",
        batched_guidance: bool = True,
        progress: bool = True,
        refine: Any = None,
        negative_text: str | None = None,
    ) -> ShapeOutput:
        """Sample `num_samples` shapes for one set of conditions.

        text: a prompt. image: an RGB(A) image (path, PIL image, or (H, W, 3|4) uint8 array). partial
        and known_mask: a TSDF (R, R, R) and which of its voxels are known. guidance: a weight per
        given modality (default `config.guidance` each). completion: "learned" feeds the partial shape
        as a condition; "inpaint" is SDFusion's training-free completion (known latent cells are kept,
        noised to each step's level, and only the rest is diffused). refine: a RefineConfig that
        replaces the pipeline's own (SDS toward `text` after sampling; see sample/refine.py).
        negative_text: a prompt the refinement's guidance pushes away from in place of the empty text
        (diffusers' negative_prompt; say, what the shapes are now); needs `text` and a refinement.
        """
        steps = self.config.steps if steps is None else steps
        if steps < 1:
            raise ShapekilnError(f"the number of steps must be at least 1, got {steps}")
        if num_samples < 1:
            raise ShapekilnError(f"the number of samples must be at least 1, got {num_samples}")
        if completion not in ("learned", "inpaint"):
            raise ShapekilnError(f"completion must be 'learned' or 'inpaint', got {completion!r}")
        refine = refine if refine is not None else self.refine
        if negative_text is not None and (refine is None or text is None or not negative_text.strip()):
            raise ShapekilnError("a negative prompt steers the refinement: it needs a refinement, a text prompt, and must not be empty")
        given = {"text": text is not None, "image": image is not None, "partial": partial is not None and completion == "learned"}
        weights = self._guidance_weights(given, guidance)
        conditions = self._conditions(text, image, partial, known_mask, num_samples)
        known = self._known_latent(conditions.partial) if completion == "inpaint" else None
        if completion == "inpaint":
            if partial is None:
                raise ShapekilnError("completion='inpaint' needs a partial shape and its known mask")
            conditions.partial = None  # training-free: the model itself sees no partial condition

        sampler = self.sampler(scheduler or self.config.scheduler)
        sampler.set_timesteps(steps)
        generator = torch.Generator().manual_seed(seed)
        latent_shape = (num_samples, *self.vqvae.latent_shape)
        latent = torch.randn(latent_shape, generator=generator).to(self.device) * sampler.init_noise_sigma
        noise_for_known = torch.randn(latent_shape, generator=generator).to(self.device)
        timesteps = list(sampler.timesteps)
        for index, t in enumerate(tqdm(timesteps, desc="sampling", unit="step", disable=not progress)):
            model_input = sampler.scale_model_input(latent, t)
            prediction = self.guided_prediction(model_input, t, conditions, weights, batched_guidance)
            latent = sampler.step(prediction, t, latent, generator=generator).prev_sample
            if known is not None:
                known_latent, known_cells = known
                following = timesteps[index + 1] if index + 1 < len(timesteps) else None
                target = known_latent if following is None else self.scheduler.add_noise(known_latent, noise_for_known, following.reshape(1))
                latent = known_cells * target + (1 - known_cells) * latent
        latent = self.denormalize(latent)
        tsdf = self.decode(latent)  # (N, 1, R, R, R)
        shapes = [Shape(grid[0].float().cpu().numpy(), self.config.mc_level) for grid in tsdf]
        if refine is not None:
            shapes = self._refined(shapes, latent, text, refine, progress, negative_text)
        return ShapeOutput(shapes=shapes, latents=latent.cpu())

    def _refined(self, shapes: list[Shape], latents: torch.Tensor, text: str | None, config: Any, progress: bool,
                 negative: str | None = None) -> list[Shape]:
        """Each sample refined by SDS, starting from its own latent (or its grid, for config.target "grid")."""
        from shapekiln.models.priors import DiffusionPrior, load_prior
        from shapekiln.sample.refine import refine

        if self.prior is None:
            raise ShapekilnError("refinement needs a 2D prior: pass prior= (a view-prior folder from `shapekiln train view-prior`, "
                                 "or a Stable Diffusion folder), or put a view_prior/ folder in the pipeline folder")
        if not isinstance(self.prior, DiffusionPrior):
            self.prior = load_prior(self.prior, device=self.device)
        refined = []
        with torch.enable_grad():
            for shape, latent in zip(shapes, latents):
                result = refine(shape.tsdf, self.prior, text, config, tau=self.config.tau, vqvae=self.vqvae, latent=latent.cpu(),
                                progress=progress, negative=negative)
                refined.append(Shape(result.tsdf, shape.level, colors=result.colors, unrefined=shape.tsdf, refine_stopped=result.stopped))
        return refined

    def guided_prediction(self, latent: torch.Tensor, t: torch.Tensor, conditions: Conditions,
                          weights: dict[str, float], batched: bool = True) -> torch.Tensor:
        """eps(z, ∅) + Σ_i s_i (eps(z, c_i) − eps(z, ∅)); with `batched`, the 1 + n passes are one forward."""
        n = latent.shape[0]
        names = list(weights)
        passes = [self._only(conditions, None, n)] + [self._only(conditions, name, n) for name in names]
        timesteps = torch.full((n,), int(t), device=self.device, dtype=torch.long)
        if batched:
            stacked = _stack_conditions(passes)
            predictions = self.model(latent.repeat(len(passes), 1, 1, 1, 1), timesteps.repeat(len(passes)), stacked).chunk(len(passes))
        else:
            predictions = [self.model(latent, timesteps, one) for one in passes]
        unconditional = predictions[0]
        guided = unconditional.clone()
        for name, conditional in zip(names, predictions[1:]):
            guided += weights[name] * (conditional - unconditional)
        return guided

    def _guidance_weights(self, given: dict[str, bool], guidance: Mapping[str, float] | None) -> dict[str, float]:
        guidance = dict(guidance or {})
        for name in guidance:
            if name not in MODALITIES:
                raise ShapekilnError(f"unknown guidance modality {name!r} (choose from {', '.join(MODALITIES)})")
            if name not in self.modalities:
                raise ShapekilnError(f"this model was not trained with {name} conditioning (it knows {', '.join(self.modalities)})")
            if not given[name]:
                raise ShapekilnError(f"a guidance weight for {name} was given but no {name} condition")
        for name, present in given.items():
            if present and name not in self.modalities:
                raise ShapekilnError(f"this model was not trained with {name} conditioning (it knows {', '.join(self.modalities)})")
        return {name: float(guidance.get(name, self.config.guidance)) for name in MODALITIES if given[name]}

    def _conditions(self, text: str | None, image: Any, partial: Any, known_mask: Any, n: int) -> Conditions:
        conditions = Conditions()
        if text is not None:
            if not isinstance(text, str) or not text.strip():
                raise ShapekilnError("the text prompt is empty")
            if "text" in self.modalities and "text" not in self.conditioning.towers:
                raise ShapekilnError("this pipeline has no text model loaded; load it with ShapePipeline.from_pretrained")
            conditions.text = [text] * n
        if image is not None:
            conditions.image = load_image(image).to(self.device).expand(n, -1, -1, -1)  # (n, 3, H, W)
        if partial is not None:
            if known_mask is None:
                raise ShapekilnError("a partial shape needs its known-region mask")
            conditions.partial = self._partial_condition(partial, known_mask).expand(n, -1, -1, -1, -1)
        return conditions

    def _partial_condition(self, partial: Any, known_mask: Any) -> torch.Tensor:
        """(1, C + 1, r, r, r): the encoded partial TSDF and its known-cell mask."""
        r = self.config.resolution
        tsdf = torch.as_tensor(np.asarray(partial, dtype=np.float32))
        mask = torch.as_tensor(np.asarray(known_mask, dtype=bool))
        if tsdf.shape != (r, r, r) or mask.shape != (r, r, r):
            raise ShapekilnError(f"the partial shape and its mask must be {r}³ grids, got {tuple(tsdf.shape)} and {tuple(mask.shape)}")
        if not bool(mask.any()):
            raise ShapekilnError("the known-region mask keeps nothing")
        if bool(mask.all()):
            raise ShapekilnError("the known-region mask keeps everything: there is nothing to complete")
        if not bool((tsdf[mask] < 0).any()):
            raise ShapekilnError("the known region holds no part of the shape (no voxel inside the surface)")
        condition = encode_partial(self.vqvae, tsdf[None, None].to(self.device), mask[None, None].to(self.device),
                                   self.latent_mean.to(self.device), self.latent_std.to(self.device))
        if not bool(condition[:, -1].any()):
            raise ShapekilnError("the known region is too thin: no latent cell is wholly known; keep a larger region")
        return condition

    def _known_latent(self, partial: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor] | None:
        if partial is None:
            return None
        return partial[:, :-1], partial[:, -1:]  # normalized masked latent, known-cell mask

    def _only(self, conditions: Conditions, keep: str | None, n: int) -> Conditions:
        """The same conditions with every modality but `keep` dropped (all of them for keep=None)."""
        drop = {name: torch.full((n,), name != keep, dtype=torch.bool) for name in MODALITIES}
        return Conditions(text=conditions.text, image=conditions.image, partial=conditions.partial, drop=drop)


def _stack_conditions(passes: list[Conditions]) -> Conditions:
    """Concatenate per-pass conditions along the batch axis (all passes share which inputs exist)."""
    first = passes[0]
    return Conditions(
        text=[text for one in passes for text in one.text] if first.text is not None else None,
        image=torch.cat([one.image for one in passes]) if first.image is not None else None,
        partial=torch.cat([one.partial for one in passes]) if first.partial is not None else None,
        drop={name: torch.cat([one.drop[name] for one in passes]) for name in first.drop},
    )


def load_image(image: Any) -> torch.Tensor:
    """An image path, PIL image or (H, W, 3|4) uint8 array → (1, 3, H, W) float in [0, 1] over white.

    A (1, 3, H, W) float tensor (what this returns) passes through unchanged.
    """
    from PIL import Image, UnidentifiedImageError

    from shapekiln.models.encoders import rgba_to_rgb

    if isinstance(image, torch.Tensor) and image.ndim == 4 and image.shape[:2] == (1, 3) and image.is_floating_point():
        return image

    if isinstance(image, (str, Path)):
        try:
            with Image.open(image) as opened:
                image = opened.convert("RGBA")
        except FileNotFoundError:
            raise ShapekilnError(f"image not found: {image}") from None
        except (UnidentifiedImageError, OSError):
            raise ShapekilnError(f"{image} is not an image this machine can read") from None
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGBA"))
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] not in (3, 4) or array.dtype != np.uint8:
        raise ShapekilnError(f"an image must be (H, W, 3) or (H, W, 4) uint8, got {array.shape} {array.dtype}")
    if array.shape[2] == 3:
        array = np.concatenate([array, np.full(array.shape[:2] + (1,), 255, np.uint8)], axis=2)
    rgba = torch.from_numpy(array.copy()).permute(2, 0, 1)[None]  # (1, 4, H, W)
    return rgba_to_rgb(rgba)

