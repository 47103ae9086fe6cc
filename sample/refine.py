"""Score Distillation Sampling: refine a shape toward a prompt with a 2D diffusion prior.

Each step renders the shape from random cameras around it (models/render.py: volume rendering of
the TSDF, gradients into the grid), asks the prior for its guided noise prediction on the noised
render, and pushes the render along w(t)·(ε̂ − ε) (models/priors.py `sds_loss`), through the
renderer, into what is optimized:

    target "grid"    a residual added to the starting TSDF grid (any input: a mesh, a grid, a sample)
    target "latent"  the shape's VQ-VAE latent, decoded by the frozen decoder (stays on the shape
                     manifold the diffusion model was trained on; needs the VQ-VAE)
    target "auto"    (the default) the latent when a VQ-VAE of the grid's size is given, else the grid:
                     only the latent moved the synthetic set's attributes (README, bench/sds.py)

and, with `color=True`, an RGB albedo grid (written as vertex colors). Regularizers keep the result
a clean distance field close to where it started: the squared distance to the starting TSDF
(`anchor_weight`), total variation of the residual (`tv_weight`) and the eikonal term |∇d| = 1 in
the band (`eikonal_weight`). The timestep range anneals linearly from `t_start` to `t_end`, large
noise first for the coarse change, small noise later for detail.

A non-finite loss or gradient stops the run; the result is then the last finite state (the best
so far), and `RefineResult.stopped` says why.
"""

from __future__ import annotations

import math
import textwrap
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import torch
import trimesh
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from shapekiln.data_prep.preview import tsdf_to_mesh
from shapekiln.errors import ShapekilnError
from shapekiln.models.priors import DiffusionPrior, sds_loss
from shapekiln.models.render import RenderConfig, random_backgrounds, random_cameras, random_lights, render_tsdf, sample_volume
from shapekiln.models.vqvae import VQVAE
from shapekiln.sample.export import MESH_FORMATS, check_formats, render_shape, write_shape, write_staged
from shapekiln.sample.partial import mesh_tsdf, read_grid

SHADINGS = ("shaded", "textureless", "albedo")


@dataclass
class RefineConfig:
    """What `refine` optimizes and how; the defaults suit the small view prior on a 32³ grid."""

    steps: int = 300
    target: Literal["auto", "grid", "latent"] = "auto"  # auto: latent when refine() gets a VQ-VAE of the grid's size, else grid
    # Also optimize an albedo grid (exported as vertex colors). On by default: the view prior only ever saw
    # colored objects, and measured here a gray render is what it erases (thin gray parts vanished, colored ones stayed).
    color: bool = True
    lr: float | None = None  # Adam; None: 0.005 for a grid residual (τ/40 per step), 0.02 for a latent
    color_lr: float = 0.05
    guidance: float = 20.0  # classifier-free guidance weight of the prompt
    t_start: tuple[float, float] = (0.2, 0.8)  # timestep range (fractions of the prior's schedule) at the first step...
    t_end: tuple[float, float] = (0.02, 0.4)  # ...and at the last, linearly in between
    weighting: Literal["sds", "uniform"] = "sds"  # w(t) = 1 − ᾱ_t (DreamFusion) or 1
    views_per_step: int = 2
    render_size: int = 64  # renders are resized to the prior's own image size
    samples_per_ray: int = 64
    elevation_deg: tuple[float, float] = (5.0, 40.0)  # camera elevations drawn per step (the data's views: 15 and 30)
    light: Literal["headlight", "random"] = "headlight"  # headlight: the lighting the view prior saw in training
    background: Literal["white", "random"] = "white"
    shadings: tuple[str, ...] = ("shaded", "albedo")  # drawn per step (DreamFusion mixes albedo/shaded/textureless)
    anchor_weight: float | None = None  # mean squared change of the TSDF, in units of τ²; None: 0.03 for a latent, 0.3 for a grid
    tv_weight: float = 0.1  # mean |∇ residual| (grid target), in units of τ per voxel
    eikonal_weight: float = 0.0  # mean (|∇d| − 1)² over voxels in the band |d| < τ/2
    seed: int = 0

    def resolved(self, target: str) -> RefineConfig:
        """This config with `target` ("grid" or "latent") and its defaults filled in: lr 0.02 for a latent and
        0.005 for a grid (τ/40 per step); anchor 0.03 for a latent (the measured setting that flips attributes,
        bench/sds.py) and 0.3 for a grid, whose residual has no decoder keeping it shape-like."""
        return replace(self, target=target, lr=self.lr or (0.02 if target == "latent" else 0.005),
                       anchor_weight=self.anchor_weight if self.anchor_weight is not None else (0.03 if target == "latent" else 0.3))

    @staticmethod
    def shadings_for(color: bool) -> tuple[str, ...]:
        """The default shadings for a run with or without an albedo grid (an albedo render needs one)."""
        return RefineConfig.shadings if color else ("shaded",)

    def validate(self) -> None:
        if self.steps < 1 or self.views_per_step < 1 or self.render_size < 8 or self.samples_per_ray < 2:
            raise ShapekilnError("refine: steps and views_per_step must be at least 1, render_size at least 8, samples_per_ray at least 2")
        if self.target not in ("auto", "grid", "latent"):
            raise ShapekilnError(f"refine: target must be auto, grid or latent, got {self.target!r}")
        for name in ("t_start", "t_end"):
            low, high = getattr(self, name)
            if not 0.0 < low <= high < 1.0:
                raise ShapekilnError(f"refine: {name} must be (low, high) with 0 < low ≤ high < 1, got {(low, high)}")
        if self.guidance < 0 or min(self.anchor_weight or 0.0, self.tv_weight, self.eikonal_weight) < 0:
            raise ShapekilnError("refine: guidance and the regularizer weights must not be negative")
        if (self.lr is not None and self.lr <= 0) or self.color_lr <= 0:
            raise ShapekilnError("refine: learning rates must be positive")
        unknown = set(self.shadings) - set(SHADINGS)
        if not self.shadings or unknown:
            raise ShapekilnError(f"refine: shadings must be some of {', '.join(SHADINGS)}")
        if not self.color and "albedo" in self.shadings:
            raise ShapekilnError("refine: 'albedo' shading needs color=True (a gray albedo render carries no shape)")


@dataclass
class RefineResult:
    tsdf: np.ndarray  # (R, R, R) float32, clipped to ±τ
    start: np.ndarray  # the starting grid, for before/after comparisons
    colors: np.ndarray | None  # (3, R, R, R) albedo in [0, 1] when color was optimized
    losses: list[dict[str, float]] = field(default_factory=list)  # per finished step
    stopped: str | None = None  # why the run ended early (non-finite values), None when it ran all steps
    seconds_per_step: float = 0.0
    config: RefineConfig | None = None  # what ran: the target "auto" chose and the defaults it filled in

    @property
    def steps(self) -> int:
        return len(self.losses)

    def mesh(self, level: float = 0.0) -> trimesh.Trimesh:
        """The refined iso-surface, with vertex colors from the albedo grid when there is one."""
        return colored_mesh(self.tsdf, self.colors, level)


def colored_mesh(tsdf: np.ndarray, colors: np.ndarray | None, level: float = 0.0) -> trimesh.Trimesh:
    """The `level` iso-surface of `tsdf`, its vertices colored from an albedo grid (3, R, R, R) in [0, 1] when given."""
    mesh = tsdf_to_mesh(tsdf, level)
    if colors is not None and len(mesh.vertices):
        vertices = torch.from_numpy(np.asarray(mesh.vertices, dtype=np.float32))[:, None]  # (N, 1, 3)
        rgb = sample_volume(torch.from_numpy(np.asarray(colors, dtype=np.float32))[None], vertices)[:, :, 0].T  # (N, 3)
        rgba = np.concatenate([(rgb.clamp(0, 1).numpy() * 255).round().astype(np.uint8), np.full((len(rgb), 1), 255, np.uint8)], axis=1)
        mesh.visual = trimesh.visual.ColorVisuals(mesh, vertex_colors=rgba)
    return mesh


def refine(start: np.ndarray | torch.Tensor, prior: DiffusionPrior, text: str | None, config: RefineConfig | None = None, *,
           tau: float = 0.2, vqvae: VQVAE | None = None, latent: torch.Tensor | None = None, log_dir: str | Path | None = None,
           progress: bool = True, negative: str | None = None) -> RefineResult:
    """Refine the TSDF grid `start` (R, R, R) toward `text` with SDS; see the module docstring.

    `negative`: a prompt guidance pushes away from, in place of the empty text (say, the shape's present
    caption, so that the push is the difference between what it is and what it should be).

    With target "latent" the latent of `vqvae` is optimized: `latent` (C, r, r, r,
    pre-quantization, as `ShapePipeline` returns them) when given, else the encoding of `start`.
    `log_dir`: TensorBoard scalars (the loss curve) and before/after images.
    """
    config = config or RefineConfig()
    config.validate()
    start_tsdf = _as_grid(start)
    target = config.target
    if target == "auto":
        target = "latent" if vqvae is not None and start_tsdf.shape[0] == vqvae.config.resolution else "grid"
    if target == "latent" and vqvae is None:
        raise ShapekilnError("refine: target 'latent' needs the VQ-VAE (give --vqvae or --ckpt)")
    if target == "latent" and start_tsdf.shape[0] != vqvae.config.resolution:
        raise ShapekilnError(f"refine: the VQ-VAE works on {vqvae.config.resolution}³ grids, the input is {start_tsdf.shape[0]}³")
    config = config.resolved(target)
    if text is not None and not prior.text_conditioned:
        raise ShapekilnError("this prior was trained without text; refine without a prompt or use a text-conditioned prior")
    if text is not None and not text.strip():
        raise ShapekilnError("the prompt is empty")
    if negative is not None and (text is None or not negative.strip()):
        raise ShapekilnError("a negative prompt needs a prompt and must not be empty")

    # Everything lives where the prior does (its parameters' device); random draws come from one CPU generator.
    device = next(iter(prior.parameters()), torch.empty(0)).device
    start_tsdf = start_tsdf.to(device)
    generator = torch.Generator().manual_seed(config.seed)
    with torch.no_grad():
        text_condition = prior.encode_text([text] * config.views_per_step) if text is not None else prior.empty_text(config.views_per_step)
        negative_condition = prior.encode_text([negative] * config.views_per_step) if negative is not None else None
    parameters, decode = _parameterize(start_tsdf, target, vqvae, latent)
    groups = [{"params": parameters, "lr": config.lr}]
    colors_logit = None
    if config.color:
        colors_logit = torch.full((3, *start_tsdf.shape), math.log(200 / 55), device=device, requires_grad=True)  # sigmoid → 200/255 gray
        groups.append({"params": [colors_logit], "lr": config.color_lr})
    optimizer = torch.optim.Adam(groups)
    render_config = RenderConfig(samples_per_ray=config.samples_per_ray)
    writer = _writer(log_dir)
    num_train_timesteps = prior.scheduler.config.num_train_timesteps

    losses: list[dict[str, float]] = []
    stopped = None
    started = time.perf_counter()
    bar = tqdm(range(config.steps), desc="refine", unit="step", disable=not progress)
    for step in bar:
        fraction = step / max(config.steps - 1, 1)
        t_low, t_high = (a + fraction * (b - a) for a, b in zip(config.t_start, config.t_end))
        t = torch.randint(int(t_low * num_train_timesteps), int(t_high * num_train_timesteps) + 1,
                          (config.views_per_step,), generator=generator).to(device)
        cameras = random_cameras(config.views_per_step, config.render_size, generator, elevation_deg=config.elevation_deg)
        light = random_lights(cameras, generator).to(device) if config.light == "random" else None
        background = random_backgrounds(config.views_per_step, generator).to(device) if config.background == "random" else 1.0
        shading = config.shadings[int(torch.randint(len(config.shadings), (1,), generator=generator))]

        tsdf = decode()
        colors = torch.sigmoid(colors_logit) if colors_logit is not None else None
        render = render_tsdf(tsdf, cameras, colors=colors, shading=shading, light=light, background=background,
                             config=render_config, generator=generator)
        camera_angles = torch.tensor([[c.azimuth_deg, c.elevation_deg] for c in cameras], dtype=torch.float32, device=device)
        sds = sds_loss(prior, render.rgb, text_condition, guidance_scale=config.guidance, t=t, cameras=camera_angles,
                       weighting=config.weighting, generator=generator, negative=negative_condition)
        # per element of x0, so the regularizer weights mean the same at any render size and view count
        terms = {"sds": sds.loss / sds.grad.numel(), **_regularizers(tsdf, start_tsdf, tau, config)}
        loss = sum(terms.values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        gradients = [p.grad for group in groups for p in group["params"] if p.grad is not None]
        if not torch.isfinite(loss) or not all(torch.isfinite(g).all() for g in gradients):
            # the update is skipped, so the parameters still hold the last finite state
            stopped = f"the loss or its gradient became NaN or infinite at step {step + 1}; kept the state after step {step}"
            break
        optimizer.step()
        values = {name: float(value.detach()) for name, value in terms.items()} | {"loss": float(loss.detach()), "t": float(t.float().mean()) / num_train_timesteps}
        losses.append(values)
        if writer is not None:
            for name, value in values.items():
                writer.add_scalar(f"refine/{name}", value, step)
        bar.set_postfix(loss=f"{values['loss']:.4g}", t=f"{values['t']:.2f}")
    bar.close()
    seconds_per_step = (time.perf_counter() - started) / max(len(losses), 1)
    with torch.no_grad():
        result = RefineResult(tsdf=decode().clamp(-tau, tau).float().cpu().numpy(), start=start_tsdf.cpu().numpy(),
                              colors=torch.sigmoid(colors_logit).cpu().numpy() if colors_logit is not None else None,
                              losses=losses, stopped=stopped, seconds_per_step=seconds_per_step, config=config)
    if writer is not None:
        sheet = before_after_sheet(tsdf_to_mesh(result.start), result.mesh(), text, cell=160)
        writer.add_image("refine/before_after", np.asarray(sheet), result.steps, dataformats="HWC")
        writer.close()
    return result


def load_shape(path: str | Path, resolution: int | None, tau: float, normalize_input: bool = False,
               mesh_resolution: int = 32) -> np.ndarray:
    """The shape to refine: a TSDF grid .npy (of `resolution`³ when given, else any cube) or a mesh file
    (its TSDF at `resolution`, else at `mesh_resolution`)."""
    path = Path(path)
    if not path.is_file():
        raise ShapekilnError(f"input not found: {path}")
    if path.suffix.lower() == ".npy":
        return read_grid(path, resolution)
    if path.suffix.lower() == ".xyz":
        raise ShapekilnError(f"{path}: a point cloud has no inside; refine takes a TSDF .npy or a mesh (complete a point cloud first)")
    return mesh_tsdf(path, resolution or mesh_resolution, tau, normalize_input)


def _as_grid(start: np.ndarray | torch.Tensor) -> torch.Tensor:
    grid = torch.as_tensor(np.asarray(start, dtype=np.float32) if not isinstance(start, torch.Tensor) else start).float().detach().cpu()
    if grid.ndim != 3 or len(set(grid.shape)) != 1:
        raise ShapekilnError(f"refine needs a cubic TSDF grid (R, R, R), got shape {tuple(grid.shape)}")
    if not torch.isfinite(grid).all():
        raise ShapekilnError("refine: the starting grid has NaN or infinite values")
    return grid


def _parameterize(start: torch.Tensor, target: str, vqvae: VQVAE | None, latent: torch.Tensor | None):
    """The tensors to optimize and a function that turns them into the current TSDF grid (R, R, R)."""
    if target == "grid":
        residual = torch.zeros_like(start, requires_grad=True)
        return [residual], lambda: start + residual
    vqvae.eval().requires_grad_(False)
    with torch.no_grad():
        initial = latent.float().reshape(1, *vqvae.latent_shape).to(start.device) if latent is not None else vqvae.encode(start[None, None])
    code = initial.clone().requires_grad_(True)  # (1, C, r, r, r)
    # No quantization while optimizing (it would stop the gradient); the exported grid is decoded the same way.
    return [code], lambda: vqvae.decode(code, quantize=False)[0, 0]


def _regularizers(tsdf: torch.Tensor, start: torch.Tensor, tau: float, config: RefineConfig) -> dict[str, torch.Tensor]:
    terms = {}
    if config.anchor_weight:
        terms["anchor"] = config.anchor_weight * ((tsdf - start) / tau).square().mean()
    if config.tv_weight:
        residual = tsdf - start
        terms["tv"] = config.tv_weight * sum(torch.diff(residual, dim=axis).abs().mean() for axis in range(3)) / tau
    if config.eikonal_weight:
        voxel = 2.0 / tsdf.shape[0]
        # forward differences, cropped to the (R-1)³ voxels where all three exist
        gradient = torch.stack([torch.diff(tsdf, dim=axis)[tuple(slice(None) if a == axis else slice(0, -1) for a in range(3))]
                                for axis in range(3)]) / voxel
        band = (tsdf[:-1, :-1, :-1].detach().abs() < tau / 2).float()
        norm = gradient.square().sum(0).clamp_min(1e-12).sqrt()
        terms["eikonal"] = config.eikonal_weight * ((norm - 1.0).square() * band).sum() / band.sum().clamp_min(1.0)
    return terms


def _writer(log_dir: str | Path | None):
    if log_dir is None:
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(log_dir))


def before_after_sheet(before: trimesh.Trimesh, after: trimesh.Trimesh, text: str | None, cell: int = 192,
                       azimuths: Sequence[float] = (45.0, 135.0, 225.0, 315.0)) -> Image.Image:
    """Two rows of shaded renders from `azimuths` (before, after), a label column with the prompt."""
    label_width = cell
    sheet = Image.new("RGB", (label_width + cell * len(azimuths), 2 * cell), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for row, (name, mesh) in enumerate((("before", before), ("after", after))):
        for column, azimuth in enumerate(azimuths):
            sheet.paste(Image.fromarray(render_shape(mesh, cell, azimuth=azimuth)), (label_width + column * cell, row * cell))
        lines = [name] + ([f"“{line}”" if i == 0 else line for i, line in enumerate(textwrap.wrap(text, 22)[:6])] if text and row == 1 else [])
        draw.multiline_text((8, row * cell + 8), "\n".join(lines), fill=(0, 0, 0), font=font)
    return sheet


def write_refined(result: RefineResult, out: str | Path, text: str | None, formats: Sequence[str] = MESH_FORMATS,
                  level: float = 0.0, prefix: str = "refined") -> list[Path]:
    """`{prefix}.{npy,obj,glb,ply}` (+ `{prefix}_colors.npy`) and `preview.png` (before/after), staged then moved into `out`."""
    check_formats(formats)

    def write(staging: Path) -> list[str]:
        mesh = result.mesh(level)
        names = write_shape(staging, prefix, mesh, result.tsdf, formats)
        if result.colors is not None:
            np.save(staging / f"{prefix}_colors.npy", result.colors.astype(np.float32), allow_pickle=False)
            names.append(f"{prefix}_colors.npy")
        before_after_sheet(tsdf_to_mesh(result.start, level), mesh, text).save(staging / "preview.png")
        return names + ["preview.png"]

    return write_staged(out, write)
