"""Differentiable volume rendering of TSDF grids (torch), for Score Distillation Sampling.

`render_tsdf` renders one TSDF grid (and optionally an albedo grid) from a batch of
`shapekiln.data_prep.render.Camera`s; gradients reach the grid values. With its defaults
(neutral gray, headlight, white background) it reproduces `data_prep.render.render_views`'s
look of the same shape: gray 200 × (AMBIENT + (1 - AMBIENT)·|n·d|).

Conventions
    grid     `tsdf[i, j, k]` is the signed distance (negative inside) at the voxel center
             (x_i, y_j, z_k) = -1 + (index + 0.5)·2/R of [-1, 1]³, as data_prep.tsdf writes it.
             Sampled trilinearly with `grid_sample(align_corners=False, padding_mode="border")`,
             whose normalized coordinates put those centers at exactly those world coordinates;
             its last grid axis is ordered (W, H, D) = (k, j, i), so points go in as (z, y, x).
    cameras  OpenCV, pixel centers at +0.5, world +Y up (`data_prep.render`); one ray per pixel
             through its center, exactly `camera_rays`.
    outputs  (B, C, H, W) tensors; normals are world-space, outward (the SDF's gradient);
             `depth` and `normal` are weight-accumulated, not divided by `alpha` (0 where empty).

Method (NeuS, Wang et al. 2021). Each ray is clipped to the [-1, 1]³ box (rays that miss it
render the background). `samples_per_ray` stratified samples (bin midpoints, or jittered
within their bins when a generator is given) cover the clipped segment; a pass without grad
finds the first interval where the sdf goes from > 0 to <= 0 (or, on rays without a crossing,
the samples around the sdf's minimum: the silhouette) and `surface_samples` more go uniformly
into that window. All samples then go through one `grid_sample` of a (1 + 3 [+ 3])-channel
volume: the sdf, its central-difference gradient (`torch.gradient` on the grid, differentiable
w.r.t. the grid; no double backward of grid_sample needed) and the albedo. The opacity of the
interval between consecutive samples is NeuS's discrete
    alpha_i = clamp((Φ(s·d_i) - Φ(s·d_{i+1})) / Φ(s·d_i), 0, 1),   Φ the logistic sigmoid,
computed in log space: log(1 - alpha_i) = min(logΦ(s·d_{i+1}) - logΦ(s·d_i), 0). Along a ray
that enters the surface the product of (1 - alpha_i) telescopes to Φ(s·d_last)/Φ(s·d_first),
so a crossing is opaque whatever the sample spacing; a ray passing at distance m > 0 from the
surface gets opacity Φ(-s·m). Each interval's color and normal are the mean of its two
endpoints'; shading is Lambert max(0, n·l) plus `ambient`, per sample, then composited.

Sharpness. `sharpness=None` means s = 4R = 8 / voxel size. Two things set it. A part is
only as opaque as its sdf gets negative: a ray through it keeps Φ(s·d_min)/Φ(s·d_entry) of its
light, and thin parts (table tops, lamp shades, chair backs: one or two voxels thick at 64³)
reach only about half a voxel inside, where s = 8/voxel gives Φ(-4) ≈ 0.02, i.e. 98% opacity
(s = 4/voxel left them at 85-95%, visibly see-through over white). And the silhouette's soft
edge, Φ(-s·m) at distance m outside, is then ≈ 0.02 half a voxel out, finer than what a
trilinearly interpolated grid resolves anyway, while still differentiable. Parts thinner than
a voxel (sdf minimum above -voxel/2) stay partly transparent: that is the grid, not the
renderer. Raise s for crisper images, lower it for wider, smoother gradients.

Sample spacing vs voxel size. A ray crosses the box over at most 2√3 ≈ 3.46, so 96 samples are
at most 0.036 apart: about one voxel at 64³ (0.031), half a voxel at 32³ (0.0625). The opacity
does not depend on the spacing (above); the 32 surface samples, ~1/30 of a coarse step apart,
put the surface's color and normal where the crossing is, not at a coarse interval's midpoint.
Details thinner than a coarse step that no coarse sample lands inside are missed by the
crossing search but not by the opacity (their dip in the sdf still contributes Φ(-s·m)).
Surfaces within half a coarse step of the box faces are not seen (normalized shapes keep a
margin: data prep's extent is 0.8).

Speed (this project's 2-core CPU, torch 2.13, one thread): a 32³ grid, 2 views at 64² (8192
rays × 128 samples), default config, forward + backward ≈ 0.33 s (0.45 s with the other core
busy; grid_sample's backward is a third of it), measured with
    python -c "import torch,time; torch.set_num_threads(1); from shapekiln.models.render import *; \
from shapekiln.data_prep.render import orbit_cameras; g=torch.randn(32,32,32)*0.1; g.requires_grad_(); \
c=orbit_cameras(2,64); render_tsdf(g,c); t=time.time(); [render_tsdf(g,c).rgb.mean().backward() for _ in range(5)]; \
print((time.time()-t)/5)"
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from shapekiln.data_prep.render import AMBIENT, NEUTRAL_GRAY, Camera, camera_rays, framing_distance, look_at_origin
from shapekiln.errors import ShapekilnError

SHADINGS = ("shaded", "albedo", "textureless", "normal")


@dataclass
class RenderConfig:
    samples_per_ray: int = 96  # stratified samples over the ray's segment inside [-1,1]^3
    surface_samples: int = 32  # extra samples in a window around the first zero crossing (found without grad); 0 disables
    sharpness: float | None = None  # NeuS inverse standard deviation s; None = 4R = 8 / voxel size (module docstring)
    ambient: float = AMBIENT


@dataclass
class RenderOutput:
    rgb: torch.Tensor  # (B, 3, H, W) in [0, 1], composited over the background
    alpha: torch.Tensor  # (B, 1, H, W) accumulated opacity
    normal: torch.Tensor  # (B, 3, H, W) world-space unit normals accumulated with the weights (0 where empty)
    depth: torch.Tensor  # (B, 1, H, W) expected distance along the ray (weights × distance, not divided by alpha)


def render_tsdf(
    tsdf: torch.Tensor,
    cameras: list[Camera],
    *,
    colors: torch.Tensor | None = None,
    shading: str = "shaded",
    light: torch.Tensor | None = None,
    background: float | torch.Tensor = 1.0,
    config: RenderConfig = RenderConfig(),
    generator: torch.Generator | None = None,
) -> RenderOutput:
    """Render a TSDF grid (R, R, R) from B cameras sharing one image size.

    colors: (3, R, R, R) albedo in [0, 1] at the voxel centers (None: neutral gray 200/255).
    shading: "shaded" (albedo × Lambert + ambient), "albedo" (no lighting), "textureless"
    (white albedo, shaded) or "normal" (world normals mapped to [0, 1]).
    light: (B, 3) directions towards a directional light; None: a headlight along each ray.
    background: a gray level, a (3,) color or (B, 3) colors.
    generator: jitters the samples within their strata (None: deterministic bin midpoints).
    """
    tsdf = _check_grid(tsdf)
    resolution = tsdf.shape[0]
    dtype, device = tsdf.dtype, tsdf.device
    height, width = _check_cameras(cameras)
    batch = len(cameras)
    if shading not in SHADINGS:
        raise ShapekilnError(f"unknown shading {shading!r}; choose from {', '.join(SHADINGS)}")
    _check_config(config)
    sharpness = float(config.sharpness) if config.sharpness is not None else 4.0 * resolution
    colors = _check_colors(colors, resolution, dtype, device)
    light = _check_light(light, batch, dtype, device)
    background = _check_background(background, batch, dtype, device)

    pixels = height * width
    origins, directions = _camera_rays(cameras, dtype, device)  # (B*H*W, 3) each
    near, far, inside = _clip_to_box(origins, directions)
    rays = torch.nonzero(inside).squeeze(1)  # (N,) the rays that enter the box
    ray_view = rays // pixels

    gradient = torch.stack(torch.gradient(tsdf, spacing=2.0 / resolution), dim=0)  # (3, R, R, R) ∂/∂x, ∂/∂y, ∂/∂z
    volume = torch.cat([tsdf[None], gradient] + ([colors] if colors is not None else []))[None]  # (1, C, R, R, R)

    out_rgb = background.repeat_interleave(pixels, dim=0)  # (B*H*W, 3) what empty rays show
    out_alpha = torch.zeros(batch * pixels, 1, dtype=dtype, device=device)
    out_normal = torch.zeros(batch * pixels, 3, dtype=dtype, device=device)
    out_depth = torch.zeros(batch * pixels, 1, dtype=dtype, device=device)
    if len(rays):
        origin, direction = origins[rays], directions[rays]  # (N, 3)
        t = _sample_distances(volume[:, :1].detach(), origin, direction, near[rays], far[rays], config, generator)  # (N, S)
        points = origin[:, None] + t[..., None] * direction[:, None]  # (N, S, 3)
        features = sample_volume(volume, points)  # (C, N, S), channels first: contiguous per channel
        sdf = features[0]
        normal = features[1:4] / torch.sqrt((features[1:4] ** 2).sum(dim=0) + 1e-12)  # (3, N, S) outward unit normals

        # NeuS opacity per interval, in log space: log(1 - alpha_i) = min(logΦ(s d_{i+1}) - logΦ(s d_i), 0).
        log_phi = F.logsigmoid(sharpness * sdf)
        log_clear = torch.clamp(log_phi[:, 1:] - log_phi[:, :-1], max=0.0)  # (N, S-1)
        log_transmittance = torch.cumsum(log_clear, dim=1) - log_clear  # exclusive: light reaching interval i
        weights = torch.exp(log_transmittance) * -torch.expm1(log_clear)  # (N, S-1) T_i · alpha_i

        if shading == "normal":
            color = (normal + 1.0) / 2.0
        else:
            if shading == "textureless":
                albedo = torch.ones((3, 1, 1), dtype=dtype, device=device)
            elif colors is not None:
                albedo = features[4:7]
            else:
                albedo = torch.as_tensor(NEUTRAL_GRAY / 255.0, dtype=dtype, device=device)[:, None, None]
            if shading == "albedo":
                color = albedo.expand_as(normal)
            else:
                towards_light = -direction if light is None else light[ray_view]  # (N, 3)
                lambert = torch.clamp((normal * towards_light.T[:, :, None]).sum(dim=0), min=0.0)  # (N, S)
                color = albedo * (config.ambient + (1.0 - config.ambient) * lambert)  # (3, N, S)

        def composite(per_sample: torch.Tensor) -> torch.Tensor:  # (C, N, S) at samples → (N, C)
            per_interval = (per_sample[..., 1:] + per_sample[..., :-1]) / 2.0
            return (weights * per_interval).sum(dim=-1).T

        alpha = weights.sum(dim=1, keepdim=True)  # (N, 1)
        out_rgb = out_rgb.index_put((rays,), composite(color) + (1.0 - alpha) * background[ray_view])
        out_alpha = out_alpha.index_put((rays,), alpha)
        out_normal = out_normal.index_put((rays,), composite(normal))
        out_depth = out_depth.index_put((rays,), composite(t[None]))

    def image(flat: torch.Tensor) -> torch.Tensor:  # (B*H*W, C) → (B, C, H, W)
        return flat.reshape(batch, height, width, -1).permute(0, 3, 1, 2).contiguous()

    return RenderOutput(rgb=image(out_rgb), alpha=image(out_alpha), normal=image(out_normal), depth=image(out_depth))


def random_cameras(
    n: int,
    size: int,
    generator: torch.Generator,
    *,
    elevation_deg: tuple[float, float] = (0.0, 45.0),
    azimuth_deg: tuple[float, float] = (0.0, 360.0),
    fov_deg: float = 40.0,
    distance: float | None = None,
) -> list[Camera]:
    """`n` square cameras looking at the origin, elevation and azimuth drawn uniformly from the ranges.

    The default distance frames the unit sphere's margin (`framing_distance(fov_deg)`), as data prep's views do.
    """
    for name, (low, high) in (("elevation_deg", elevation_deg), ("azimuth_deg", azimuth_deg)):
        if not low <= high:
            raise ShapekilnError(f"random_cameras: {name} must be a (low, high) range, got {(low, high)}")
    if not (-90.0 < elevation_deg[0] and elevation_deg[1] < 90.0):
        raise ShapekilnError(f"random_cameras: elevation_deg must lie strictly within (-90, 90), got {elevation_deg}")
    if distance is None:
        distance = framing_distance(fov_deg)
    draws = torch.rand(n, 2, generator=generator, dtype=torch.float64, device=generator.device).cpu()
    elevations = elevation_deg[0] + draws[:, 0] * (elevation_deg[1] - elevation_deg[0])
    azimuths = azimuth_deg[0] + draws[:, 1] * (azimuth_deg[1] - azimuth_deg[0])
    return [look_at_origin(float(a), float(e), distance, size, fov_deg) for a, e in zip(azimuths, elevations)]


def random_lights(cameras: list[Camera], generator: torch.Generator, spread_deg: float = 45.0) -> torch.Tensor:
    """(B, 3) unit directions towards a light, uniform on the cap of half-angle `spread_deg` around each camera.

    DreamFusion's light sits near the camera, so the side in view is lit but not flatly.
    """
    if not 0.0 <= spread_deg <= 180.0:
        raise ShapekilnError(f"random_lights: spread_deg must lie in [0, 180], got {spread_deg}")
    axes = torch.as_tensor(np.stack([c.center / np.linalg.norm(c.center) for c in cameras]) if cameras
                           else np.zeros((0, 3)))  # (B, 3) origin → camera
    draws = torch.rand(len(cameras), 2, generator=generator, dtype=torch.float64, device=generator.device).cpu()
    cos_polar = 1.0 - draws[:, 0] * (1.0 - math.cos(math.radians(spread_deg)))  # uniform area on the cap
    sin_polar = torch.sqrt(torch.clamp(1.0 - cos_polar**2, min=0.0))
    azimuth = 2.0 * math.pi * draws[:, 1]
    helper = torch.where(axes[:, 1:2].abs() < 0.9, torch.tensor([[0.0, 1.0, 0.0]], dtype=torch.float64),
                         torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.float64))
    first = F.normalize(torch.cross(axes, helper, dim=1), dim=1)
    second = torch.cross(axes, first, dim=1)
    lights = (cos_polar[:, None] * axes
              + sin_polar[:, None] * (torch.cos(azimuth)[:, None] * first + torch.sin(azimuth)[:, None] * second))
    return F.normalize(lights, dim=1).float()


def random_backgrounds(n: int, generator: torch.Generator) -> torch.Tensor:
    """(n, 3) solid background colors, uniform in [0, 1]³."""
    return torch.rand(n, 3, generator=generator, device=generator.device).cpu()


# ---------------------------------------------------------------- rays and samples


def _camera_rays(cameras: list[Camera], dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Every pixel's ray of every view, row-major per view: origins and unit directions, (B*H*W, 3) each."""
    rays = [camera_rays(c) for c in cameras]
    origins = np.concatenate([o for o, _ in rays])
    directions = np.concatenate([d for _, d in rays])
    return (torch.as_tensor(origins, dtype=dtype, device=device),
            torch.as_tensor(directions, dtype=dtype, device=device))


def _clip_to_box(origins: torch.Tensor, directions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Slab test against [-1, 1]³: entry and exit distances (in front of the origin) and whether the ray enters, (M,) each."""
    safe = torch.where(directions.abs() < 1e-12, torch.full_like(directions, 1e-12), directions)
    low, high = (-1.0 - origins) / safe, (1.0 - origins) / safe  # (M, 3)
    near = torch.clamp(torch.minimum(low, high).amax(dim=1), min=0.0)
    far = torch.maximum(low, high).amin(dim=1)
    return near, far, far > near


def sample_volume(volume: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Trilinear samples of a (1, C, R, R, R) volume indexed [x, y, z] at world points (N, S, 3) → (C, N, S)."""
    count, samples = points.shape[:2]
    grid = points.flip(-1).reshape(1, count, samples, 1, 3)  # grid_sample wants (W, H, D) = (z, y, x)
    values = F.grid_sample(volume, grid, mode="bilinear", padding_mode="border", align_corners=False)  # (1, C, N, S, 1)
    return values[0, :, :, :, 0]


def _strata(count: int, samples: int, like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """(count, samples) positions in [0, 1): one per equal bin, at its midpoint or jittered within it."""
    if generator is None:
        jitter = torch.full((count, samples), 0.5, dtype=like.dtype, device=like.device)
    else:
        jitter = torch.rand(count, samples, generator=generator, dtype=like.dtype, device=generator.device).to(like.device)
    return (torch.arange(samples, dtype=like.dtype, device=like.device) + jitter) / samples


@torch.no_grad()
def _sample_distances(sdf_volume: torch.Tensor, origin: torch.Tensor, direction: torch.Tensor,
                      near: torch.Tensor, far: torch.Tensor, config: RenderConfig,
                      generator: torch.Generator | None) -> torch.Tensor:
    """Sorted sample distances along each ray, (N, samples_per_ray + surface_samples); no grad (positions are not learned)."""
    count = len(origin)
    t = near[:, None] + _strata(count, config.samples_per_ray, near, generator) * (far - near)[:, None]  # (N, S)
    if config.surface_samples == 0:
        return t
    sdf = sample_volume(sdf_volume, origin[:, None] + t[..., None] * direction[:, None])[0]  # (N, S)
    crossing = (sdf[:, :-1] > 0) & (sdf[:, 1:] <= 0)  # (N, S-1) entering the surface
    first = crossing.to(torch.uint8).argmax(dim=1)  # the first crossing (0 where there is none)
    lowest = sdf.argmin(dim=1)  # no crossing: look closer where the ray passes nearest (silhouettes)
    has_crossing = crossing.any(dim=1)
    last = config.samples_per_ray - 1
    start = torch.where(has_crossing, first, torch.clamp(lowest - 1, min=0))
    stop = torch.where(has_crossing, first + 1, torch.clamp(lowest + 1, max=last))
    low, high = t.gather(1, start[:, None]), t.gather(1, stop[:, None])  # (N, 1)
    fine = low + _strata(count, config.surface_samples, near, generator) * (high - low)  # (N, M)
    return torch.sort(torch.cat([t, fine], dim=1), dim=1).values


# ---------------------------------------------------------------- input checks


def _check_grid(tsdf) -> torch.Tensor:
    if isinstance(tsdf, np.ndarray):
        tsdf = torch.from_numpy(np.ascontiguousarray(tsdf))
    if not isinstance(tsdf, torch.Tensor):
        raise ShapekilnError(f"render_tsdf: tsdf must be a tensor, got {type(tsdf).__name__}")
    if tsdf.ndim != 3 or len(set(tsdf.shape)) != 1 or tsdf.shape[0] < 2:
        raise ShapekilnError(f"render_tsdf: tsdf must be a cubic (R, R, R) grid with R >= 2, got shape {tuple(tsdf.shape)}")
    if tsdf.dtype not in (torch.float32, torch.float64):
        tsdf = tsdf.float()  # float16 grids from shards: grid_sample wants float32 on CPU
    return tsdf


def _check_cameras(cameras: list[Camera]) -> tuple[int, int]:
    if not cameras or not all(isinstance(c, Camera) for c in cameras):
        raise ShapekilnError("render_tsdf needs a non-empty list of data_prep.render.Camera")
    height, width = cameras[0].height, cameras[0].width
    if any((c.height, c.width) != (height, width) for c in cameras):
        sizes = sorted({(c.height, c.width) for c in cameras})
        raise ShapekilnError(f"render_tsdf needs cameras that share one image size, got (H, W) {sizes}")
    return height, width


def _check_config(config: RenderConfig) -> None:
    if config.samples_per_ray < 2 or config.surface_samples < 0:
        raise ShapekilnError(
            f"render config: samples_per_ray >= 2 and surface_samples >= 0 are required, "
            f"got {config.samples_per_ray} and {config.surface_samples}")
    if config.sharpness is not None and not config.sharpness > 0:
        raise ShapekilnError(f"render config: sharpness must be positive (or None), got {config.sharpness}")


def _check_colors(colors, resolution: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
    if colors is None:
        return None
    if isinstance(colors, np.ndarray):
        colors = torch.from_numpy(np.ascontiguousarray(colors))
    if not isinstance(colors, torch.Tensor) or tuple(colors.shape) != (3,) + (resolution,) * 3:
        shape = tuple(colors.shape) if hasattr(colors, "shape") else type(colors).__name__
        raise ShapekilnError(f"render_tsdf: colors must be a (3, {resolution}, {resolution}, {resolution}) grid "
                             f"matching the tsdf, got {shape}")
    return colors.to(dtype=dtype, device=device)


def _check_light(light, batch: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
    if light is None:
        return None
    light = torch.as_tensor(light, dtype=dtype, device=device)
    if tuple(light.shape) != (batch, 3):
        raise ShapekilnError(f"render_tsdf: light must be ({batch}, 3) directions, one per camera, got {tuple(light.shape)}")
    return F.normalize(light, dim=1)


def _check_background(background, batch: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    background = torch.as_tensor(background, dtype=dtype, device=device)
    if background.ndim == 0 or tuple(background.shape) == (3,):
        return background.expand(batch, 3)
    if tuple(background.shape) != (batch, 3):
        raise ShapekilnError(
            f"render_tsdf: background must be a gray level, a (3,) color or ({batch}, 3) colors, got {tuple(background.shape)}")
    return background
