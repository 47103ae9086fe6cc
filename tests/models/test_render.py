"""Differentiable TSDF renderer: gradients vs finite differences, agreement with data prep's mesh renderer,
analytic spheres, shading modes, the random camera/light/background draws and input checks."""
import math

import numpy as np
import pytest
import torch
import trimesh

from shapekiln.data_prep.process import normalize
from shapekiln.data_prep.render import (
    AMBIENT,
    NEUTRAL_GRAY,
    camera_rays,
    look_at_origin,
    orbit_cameras,
    render_normals,
    render_views,
)
from shapekiln.data_prep.sources.synthetic import build_mesh
from shapekiln.data_prep.tsdf import compute_tsdf, grid_points
from shapekiln.errors import ShapekilnError
from shapekiln.models.render import RenderConfig, random_backgrounds, random_cameras, random_lights, render_tsdf

GRAY = NEUTRAL_GRAY[0] / 255.0


def sphere_tsdf(resolution: int, radius: float, tau: float = 0.2, dtype=torch.float32) -> torch.Tensor:
    """(R, R, R) TSDF of a sphere at the origin, at data prep's voxel centers, indexed [x, y, z]."""
    points = grid_points(resolution).reshape(resolution, resolution, resolution, 3)
    return torch.as_tensor(np.clip(np.linalg.norm(points, axis=-1) - radius, -tau, tau), dtype=dtype)


def to_hwc(image: torch.Tensor) -> np.ndarray:
    """(B, C, H, W) tensor → (B, H, W, C) numpy."""
    return image.detach().permute(0, 2, 3, 1).numpy()


# ---------------------------------------------------------------- gradients


def test_gradients_match_finite_differences():
    resolution = 7
    generator = torch.Generator().manual_seed(0)
    points = torch.as_tensor(grid_points(resolution).reshape(resolution, resolution, resolution, 3))
    # A smooth blob: a sphere with a gentle random wobble, no clipping (kinks) near the surface.
    wobble = torch.randn(3, generator=generator, dtype=torch.float64)
    base = points.norm(dim=-1) - 0.55 + 0.08 * torch.sin(points @ wobble * 3.0)
    base_colors = torch.rand(3, resolution, resolution, resolution, generator=generator, dtype=torch.float64)
    camera = look_at_origin(30.0, 20.0, 3.0, 6, 40.0)
    config = RenderConfig(samples_per_ray=24, surface_samples=8)
    light = torch.tensor([[0.3, 0.8, 0.5]], dtype=torch.float64)
    weights = torch.rand(1, 3, 6, 6, generator=generator, dtype=torch.float64)  # a random scalar of the image

    def render(tsdf: torch.Tensor, colors: torch.Tensor) -> torch.Tensor:
        out = render_tsdf(tsdf, [camera], colors=colors, light=light, background=0.3, config=config)
        return (out.rgb * weights).sum() + (out.alpha * weights[:, :1]).sum()

    # Check the entries that matter most (visible voxels next to the surface), plus a few more.
    full_tsdf, full_colors = base.clone().requires_grad_(), base_colors.clone().requires_grad_()
    grad_tsdf, grad_colors = torch.autograd.grad(render(full_tsdf, full_colors), [full_tsdf, full_colors])
    order = grad_tsdf.abs().flatten().argsort(descending=True)
    voxels = [np.unravel_index(int(i), base.shape) for i in torch.cat([order[:4], order[20:40:10]])]
    color_entries = [np.unravel_index(int(i), base_colors.shape)
                     for i in grad_colors.abs().flatten().argsort(descending=True)[:12:4]]

    def scalar(sdf_values: torch.Tensor, color_values: torch.Tensor) -> torch.Tensor:
        tsdf = base.clone()
        colors = base_colors.clone()
        for value, index in zip(sdf_values, voxels):
            tsdf[index] = value
        for value, index in zip(color_values, color_entries):
            colors[index] = value
        return render(tsdf, colors)

    sdf_values = torch.stack([base[v] for v in voxels]).requires_grad_()
    color_values = torch.stack([base_colors[c] for c in color_entries]).requires_grad_()
    analytic = torch.autograd.grad(scalar(sdf_values, color_values), [sdf_values, color_values])
    assert all(g.abs().min() > 1e-6 for g in analytic)  # every chosen entry really reaches the image
    assert torch.autograd.gradcheck(scalar, (sdf_values, color_values), eps=1e-6, atol=1e-6, rtol=1e-4)


# ---------------------------------------------------------------- agreement with data prep


def test_matches_data_prep_renderer_on_a_synthetic_table():
    mesh = build_mesh("table", {"height": "tall", "top": "square", "legs": "four", "color": "red"},
                      np.random.default_rng(0))
    mesh, _ = normalize(mesh, 0.8)  # PrepConfig's default extent
    mesh = trimesh.Trimesh(mesh.vertices, mesh.faces, process=False)  # no colors: data prep's neutral gray
    tsdf = compute_tsdf(mesh.vertices, mesh.faces, 64, 0.2)
    cameras = orbit_cameras(3, size=64)

    views = render_views(mesh, cameras)  # (K, H, W, 4) uint8
    mesh_normals, mask = render_normals(mesh, cameras)
    np.testing.assert_array_equal(mask, views[..., 3] == 255)
    out = render_tsdf(torch.from_numpy(tsdf.astype(np.float16)), cameras)  # as stored in shards

    rendered = to_hwc(out.alpha)[..., 0] > 0.5
    iou = (rendered & mask).sum() / (rendered | mask).sum()
    assert iou >= 0.9  # measured 0.949

    normals = to_hwc(out.normal)[mask]
    cosine = (normals / np.linalg.norm(normals, axis=-1, keepdims=True).clip(1e-9) * mesh_normals[mask]).sum(-1)
    assert cosine.mean() >= 0.9  # measured 0.98

    # Same gray, same headlight over white: differences come from the grid's rounded edges and soft silhouette.
    gray = to_hwc(out.rgb) * 255.0
    difference = np.abs(gray - views[..., :3]).mean(-1)
    assert difference[mask].mean() < 15.0  # measured 10.3 gray levels of 255, thin legs missing in part
    assert difference[mask & rendered].mean() < 8.0  # measured 6.2
    assert np.abs(gray[~mask & ~rendered] - 255.0).mean() < 1.0  # white around it (only a soft edge's halo)


# ---------------------------------------------------------------- spheres


def test_sphere_renders_the_projected_disc():
    radius = 0.6
    camera = look_at_origin(40.0, 25.0, 3.0, 48, 40.0)
    out = render_tsdf(sphere_tsdf(48, radius), [camera])
    _, directions = camera_rays(camera)
    forward = -camera.center / np.linalg.norm(camera.center)
    disc = (directions @ forward > math.sqrt(1.0 - (radius / camera.distance) ** 2)).reshape(48, 48)
    rendered = out.alpha[0, 0].numpy() > 0.5
    iou = (rendered & disc).sum() / (rendered | disc).sum()
    assert iou > 0.97
    assert out.alpha[0, 0].numpy()[disc].min() > 0.5 and out.alpha.max() <= 1.0 + 1e-6


def test_sphere_centre_pixel_depth_and_normal():
    radius, distance = 0.5, 3.0
    camera = look_at_origin(120.0, -10.0, distance, 33, 40.0)  # odd size: pixel (16, 16) looks at the origin
    out = render_tsdf(sphere_tsdf(32, radius), [camera])
    assert out.alpha[0, 0, 16, 16] > 0.999
    assert out.depth[0, 0, 16, 16].item() == pytest.approx(distance - radius, abs=0.01)
    towards_camera = camera.center / distance
    np.testing.assert_allclose(out.normal[0, :, 16, 16].numpy(), towards_camera, atol=0.02)


# ---------------------------------------------------------------- shading modes


@pytest.fixture(scope="module")
def sphere_scene():
    cameras = [look_at_origin(0.0, 10.0, 3.0, 25, 40.0), look_at_origin(200.0, 30.0, 3.0, 25, 40.0)]
    return sphere_tsdf(32, 0.6), cameras


def test_albedo_ignores_light_and_textureless_is_white_shaded(sphere_scene):
    tsdf, cameras = sphere_scene
    front = torch.tensor(np.stack([c.center / c.distance for c in cameras]), dtype=torch.float32)
    albedo_lit = render_tsdf(tsdf, cameras, shading="albedo", light=front)
    albedo_dark = render_tsdf(tsdf, cameras, shading="albedo", light=-front)
    torch.testing.assert_close(albedo_lit.rgb, albedo_dark.rgb)
    solid = albedo_lit.alpha[:, 0] > 0.999
    np.testing.assert_allclose(albedo_lit.rgb.permute(0, 2, 3, 1)[solid].numpy(), GRAY, atol=2e-3)

    # The light matters in "shaded": lit from behind, the visible side gets only the ambient term.
    shaded_dark = render_tsdf(tsdf, cameras, light=-front, background=0.0)
    np.testing.assert_allclose(shaded_dark.rgb[:, :, 12, 12].numpy(), GRAY * AMBIENT, atol=2e-3)

    # textureless = shaded with white albedo: over black the two differ by exactly the albedo's factor.
    shaded = render_tsdf(tsdf, cameras, background=0.0)
    textureless = render_tsdf(tsdf, cameras, shading="textureless", background=0.0)
    torch.testing.assert_close(textureless.rgb * GRAY, shaded.rgb, rtol=1e-5, atol=1e-6)
    assert torch.equal(textureless.rgb[:, 0], textureless.rgb[:, 1])  # no tint
    assert textureless.rgb[:, :, 12, 12].min() > 0.98  # head-on under a headlight: full white

    normal = render_tsdf(tsdf, cameras, shading="normal", background=0.0)
    torch.testing.assert_close(normal.rgb[:, :, 12, 12], (normal.normal[:, :, 12, 12] + 1.0) / 2.0, atol=2e-3, rtol=0)


def test_background_shows_where_empty_and_colors_tint(sphere_scene):
    tsdf, cameras = sphere_scene
    backgrounds = torch.tensor([[0.1, 0.5, 0.9], [1.0, 0.0, 0.2]])
    out = render_tsdf(tsdf, cameras, background=backgrounds)
    empty = out.alpha[:, 0] < 1e-6  # (B, H, W)
    assert empty[:, 0, 0].all() and (~empty).any()
    for view in range(2):
        pixels = out.rgb[view].permute(1, 2, 0)[empty[view]]
        torch.testing.assert_close(pixels, backgrounds[view].expand_as(pixels))
    gray_over = render_tsdf(tsdf, cameras, background=0.25).rgb.permute(0, 2, 3, 1)[empty]
    torch.testing.assert_close(gray_over, torch.full_like(gray_over, 0.25))

    teal = torch.tensor([0.1, 0.6, 0.5])
    colors = teal[:, None, None, None].expand(3, 32, 32, 32)
    tinted = render_tsdf(tsdf, cameras, colors=colors, shading="albedo")
    expected = tinted.alpha * teal[None, :, None, None] + (1.0 - tinted.alpha) * 1.0
    torch.testing.assert_close(tinted.rgb, expected, atol=1e-5, rtol=0)
    assert not torch.allclose(tinted.rgb, render_tsdf(tsdf, cameras, shading="albedo").rgb)


def test_jittered_samples_are_seeded_and_close_to_midpoints(sphere_scene):
    tsdf, cameras = sphere_scene
    first = render_tsdf(tsdf, cameras, generator=torch.Generator().manual_seed(3))
    again = render_tsdf(tsdf, cameras, generator=torch.Generator().manual_seed(3))
    midpoints = render_tsdf(tsdf, cameras)
    torch.testing.assert_close(first.rgb, again.rgb)
    assert not torch.equal(first.rgb, midpoints.rgb)
    assert (first.rgb - midpoints.rgb).abs().mean() < 0.01


# ---------------------------------------------------------------- random cameras, lights, backgrounds


def test_random_draws_are_seeded_and_in_range():
    def draw(seed: int):
        generator = torch.Generator().manual_seed(seed)
        cameras = random_cameras(16, 32, generator, elevation_deg=(10.0, 40.0), azimuth_deg=(-90.0, 90.0))
        return cameras, random_lights(cameras, generator, spread_deg=30.0), random_backgrounds(16, generator)

    cameras, lights, backgrounds = draw(7)
    cameras_again, lights_again, backgrounds_again = draw(7)
    assert [c.azimuth_deg for c in cameras] == [c.azimuth_deg for c in cameras_again]
    torch.testing.assert_close(lights, lights_again)
    torch.testing.assert_close(backgrounds, backgrounds_again)
    assert [c.azimuth_deg for c in draw(8)[0]] != [c.azimuth_deg for c in cameras]

    for camera in cameras:
        assert 10.0 <= camera.elevation_deg <= 40.0 and -90.0 <= camera.azimuth_deg <= 90.0
        assert (camera.width, camera.height) == (32, 32)
        np.testing.assert_allclose(camera.project(np.zeros((1, 3))), [[16.0, 16.0]], atol=1e-9)
    assert lights.shape == (16, 3)
    torch.testing.assert_close(lights.norm(dim=1), torch.ones(16))
    towards_cameras = torch.tensor(np.stack([c.center / c.distance for c in cameras]), dtype=torch.float32)
    angles = torch.rad2deg(torch.arccos((lights * towards_cameras).sum(1).clamp(-1, 1)))
    assert angles.max() <= 30.0 + 1e-3 and angles.max() > 10.0
    assert backgrounds.shape == (16, 3) and backgrounds.min() >= 0 and backgrounds.max() <= 1


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("case", [
    "non-cubic", "colors shape", "camera sizes", "shading", "light shape", "background shape", "no cameras"])
def test_bad_input_is_a_shapekiln_error(case):
    tsdf = sphere_tsdf(8, 0.5)
    cameras = [look_at_origin(0.0, 10.0, 3.0, 8, 40.0)]
    kwargs = {}
    if case == "non-cubic":
        tsdf = tsdf[:, :, :6]
    elif case == "colors shape":
        kwargs["colors"] = torch.rand(3, 8, 8, 6)
    elif case == "camera sizes":
        cameras = cameras + [look_at_origin(0.0, 10.0, 3.0, 10, 40.0)]
    elif case == "shading":
        kwargs["shading"] = "phong"
    elif case == "light shape":
        kwargs["light"] = torch.ones(2, 3)
    elif case == "background shape":
        kwargs["background"] = torch.ones(1, 4)
    elif case == "no cameras":
        cameras = []
    with pytest.raises(ShapekilnError) as error:
        render_tsdf(tsdf, cameras, **kwargs)
    assert "\n" not in str(error.value)
