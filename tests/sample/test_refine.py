"""SDS refinement on toy priors whose answer is known: the shape must move where the prior points."""

import numpy as np
import pytest
import torch
import trimesh
from diffusers import DDPMScheduler

from shapekiln.data_prep.render import framing_distance, look_at_origin
from shapekiln.data_prep.tsdf import grid_points
from shapekiln.errors import ShapekilnError
from shapekiln.models.priors import DiffusionPrior, TextCondition
from shapekiln.models.render import RenderConfig, render_tsdf
from shapekiln.models.vqvae import VQVAE
from shapekiln.sample.refine import RefineConfig, colored_mesh, load_shape, refine, write_refined

TAU = 0.2
R = 16


def sphere(radius: float, resolution: int = R) -> np.ndarray:
    distance = np.linalg.norm(grid_points(resolution), axis=1) - radius
    return np.clip(distance, -TAU, TAU).reshape((resolution,) * 3).astype(np.float32)


class GaussianImagePrior(DiffusionPrior):
    """The exact ε-predictor of images distributed N(μ, σ²I), pixel space in [-1, 1]: with the prompt μ is
    `target`, without it a plain white image. So SDS toward the prompt pulls renders to `target`."""

    def __init__(self, target: torch.Tensor, sigma: float = 0.05, text_conditioned: bool = True, nan_after: int | None = None):
        super().__init__()
        self.scheduler = DDPMScheduler(num_train_timesteps=1000)
        self.text_conditioned, self.camera_conditioned = text_conditioned, False
        self.image_size = target.shape[-1]
        self.register_buffer("target", 2 * target - 1)  # (3, S, S)
        self.sigma, self.nan_after, self.calls = sigma, nan_after, 0
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def encode_text(self, prompts):
        return TextCondition(torch.ones(len(prompts), 1, 1))

    def empty_text(self, batch):
        return TextCondition(torch.zeros(batch, 1, 1))

    def encode_images(self, rgb):
        return 2 * torch.nn.functional.interpolate(rgb, size=(self.image_size,) * 2, mode="bilinear", antialias=True) - 1

    def predict_noise(self, x_t, t, text, cameras=None):
        self.calls += 1
        alpha = self.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
        mean = torch.where(text.tokens.view(-1, 1, 1, 1) > 0, self.target, torch.ones_like(self.target))
        prediction = (1 - alpha).sqrt() * (x_t - alpha.sqrt() * mean) / (alpha * self.sigma ** 2 + 1 - alpha)
        if self.nan_after is not None and self.calls > self.nan_after:
            prediction = prediction * float("nan")
        return prediction

    def decode(self, x0):
        return (x0 + 1) / 2


def render_of(tsdf: np.ndarray, size: int) -> torch.Tensor:
    """What a shape looks like from the refinement's cameras (a sphere looks the same from all of them)."""
    camera = look_at_origin(30.0, 20.0, framing_distance(40.0), size, 40.0)
    return render_tsdf(torch.from_numpy(tsdf), [camera], config=RenderConfig(samples_per_ray=48)).rgb[0]


def occupancy_iou(a: np.ndarray, b: np.ndarray) -> float:
    return float(((a < 0) & (b < 0)).sum() / ((a < 0) | (b < 0)).sum())


FAST = dict(views_per_step=2, render_size=16, samples_per_ray=32, tv_weight=0.0, anchor_weight=0.0, guidance=1.0, color=False,
            shadings=("shaded",))


def test_refinement_grows_a_small_sphere_toward_the_big_one_the_prior_wants():
    small, big = sphere(0.3), sphere(0.6)
    prior = GaussianImagePrior(render_of(big, 16))
    result = refine(small, prior, "a big ball", RefineConfig(steps=40, lr=0.02, **FAST), tau=TAU, progress=False)
    assert result.steps == 40 and result.stopped is None
    assert (result.tsdf < 0).sum() > 2 * (small < 0).sum()
    assert occupancy_iou(result.tsdf, big) > occupancy_iou(small, big) + 0.3
    assert np.abs(result.start - small).max() == 0 and result.tsdf.dtype == np.float32
    assert result.tsdf.min() >= -TAU and result.tsdf.max() <= TAU


def test_the_anchor_keeps_the_shape_near_its_start():
    small, big = sphere(0.3), sphere(0.6)
    prior = GaussianImagePrior(render_of(big, 16))
    free = refine(small, prior, "a big ball", RefineConfig(steps=20, lr=0.02, **FAST), tau=TAU, progress=False)
    anchored = refine(small, prior, "a big ball", RefineConfig(steps=20, lr=0.02, **{**FAST, "anchor_weight": 1e4}), tau=TAU, progress=False)
    assert np.abs(anchored.tsdf - small).mean() < 0.5 * np.abs(free.tsdf - small).mean()


def test_a_run_is_reproducible_from_its_seed():
    prior = GaussianImagePrior(render_of(sphere(0.6), 16))
    runs = [refine(sphere(0.3), prior, "a big ball", RefineConfig(steps=5, seed=seed, **FAST), tau=TAU, progress=False) for seed in (3, 3, 4)]
    assert np.array_equal(runs[0].tsdf, runs[1].tsdf)
    assert not np.array_equal(runs[0].tsdf, runs[2].tsdf)


def test_color_refinement_moves_the_albedo_toward_the_prompted_color():
    small = sphere(0.5)
    red = render_of(small, 16).clone()
    mask = red.mean(0) < 0.99  # the ball's pixels
    red[:, mask] = torch.tensor([0.9, 0.1, 0.1]).view(3, 1)
    prior = GaussianImagePrior(red)
    config = RefineConfig(steps=30, lr=1e-6, color_lr=0.1, **{**FAST, "color": True, "shadings": ("albedo",)})
    result = refine(small, prior, "a red ball", config, tau=TAU, progress=False)
    surface = np.abs(result.tsdf) < 2.0 / R
    rgb = result.colors[:, surface].mean(axis=1)
    assert rgb[0] > 0.85 and rgb[1] < 0.6 and rgb[2] < 0.6, rgb
    mesh = colored_mesh(result.tsdf, result.colors)
    assert mesh.visual.kind == "vertex" and mesh.visual.vertex_colors[:, 0].mean() > 2 * mesh.visual.vertex_colors[:, 1].mean()


def test_the_default_target_is_the_latent_when_a_vqvae_of_the_grid_size_is_given():
    """"auto" chooses what to optimize, and each target gets its own measured lr and anchor unless they are given."""
    torch.manual_seed(0)
    vqvae = VQVAE(resolution=R, tau=TAU, base_channels=8, channel_mult=(1, 2, 4), latent_channels=3, codebook_size=32, norm_groups=4).eval()
    prior = GaussianImagePrior(render_of(sphere(0.6), 16))
    defaults = {**FAST, "anchor_weight": None}
    chosen = {}
    for name, start, model, config in (
        ("vqvae", sphere(0.3), vqvae, RefineConfig(steps=1, **defaults)),
        ("none", sphere(0.3), None, RefineConfig(steps=1, **defaults)),
        ("other size", sphere(0.3, 8), vqvae, RefineConfig(steps=1, **defaults)),
        ("grid asked", sphere(0.3), vqvae, RefineConfig(steps=1, target="grid", **defaults)),
        ("given", sphere(0.3), vqvae, RefineConfig(steps=1, lr=0.1, **FAST)),
    ):
        used = refine(start, prior, "a big ball", config, tau=TAU, vqvae=model, progress=False).config
        chosen[name] = (used.target, used.lr, used.anchor_weight)
    assert chosen == {"vqvae": ("latent", 0.02, 0.03), "none": ("grid", 0.005, 0.3), "other size": ("grid", 0.005, 0.3),
                      "grid asked": ("grid", 0.005, 0.3), "given": ("latent", 0.1, 0.0)}
    assert RefineConfig().target == "auto" and RefineConfig().anchor_weight is None


def test_latent_refinement_moves_the_decoded_shape_and_keeps_the_vqvae_frozen():
    torch.manual_seed(0)
    vqvae = VQVAE(resolution=R, tau=TAU, base_channels=8, channel_mult=(1, 2, 4), latent_channels=3, codebook_size=32, norm_groups=4).eval()
    before = {name: p.clone() for name, p in vqvae.named_parameters()}
    prior = GaussianImagePrior(render_of(sphere(0.6), 16))
    start = sphere(0.3)
    result = refine(start, prior, "a big ball", RefineConfig(steps=3, target="latent", **FAST), tau=TAU, vqvae=vqvae, progress=False)
    with torch.no_grad():
        decoded = vqvae.decode(vqvae.encode(torch.from_numpy(start)[None, None]), quantize=False)[0, 0].clamp(-TAU, TAU).numpy()
    assert result.steps == 3 and not np.allclose(result.tsdf, decoded)
    assert all(torch.equal(before[name], p) for name, p in vqvae.named_parameters())
    with pytest.raises(ShapekilnError, match="VQ-VAE works on 16³"):
        refine(sphere(0.3, 8), prior, "a big ball", RefineConfig(steps=1, target="latent", **FAST), tau=TAU, vqvae=vqvae, progress=False)


def test_nan_gradients_stop_the_run_and_keep_the_last_finite_state():
    target = render_of(sphere(0.6), 16)
    config = RefineConfig(steps=10, t_start=(0.2, 0.8), t_end=(0.2, 0.8), **FAST)  # no annealing: 3 steps of 10 = a 3-step run
    stopped = refine(sphere(0.3), GaussianImagePrior(target, nan_after=3), "a big ball", config, tau=TAU, progress=False)
    assert stopped.steps == 3 and "NaN" in stopped.stopped and np.isfinite(stopped.tsdf).all()
    three = refine(sphere(0.3), GaussianImagePrior(target), "a big ball", RefineConfig(**{**config.__dict__, "steps": 3}), tau=TAU, progress=False)
    assert np.array_equal(stopped.tsdf, three.tsdf)


def test_a_negative_prompt_replaces_the_empty_text_of_guidance():
    """With the prompt itself as the negative, ε̂ = ε(c) + s·(ε(c) − ε(c)) = ε(c): the run equals guidance 1."""
    prior = GaussianImagePrior(render_of(sphere(0.6), 16))
    config = dict(FAST, guidance=5.0)
    same = refine(sphere(0.3), prior, "a big ball", RefineConfig(steps=5, **config), tau=TAU, progress=False, negative="a big ball")
    conditional = refine(sphere(0.3), prior, "a big ball", RefineConfig(steps=5, **FAST), tau=TAU, progress=False)
    guided = refine(sphere(0.3), prior, "a big ball", RefineConfig(steps=5, **config), tau=TAU, progress=False)
    np.testing.assert_allclose(same.tsdf, conditional.tsdf, atol=1e-6)
    assert np.abs(guided.tsdf - conditional.tsdf).max() > 1e-3
    with pytest.raises(ShapekilnError, match="negative prompt needs a prompt"):
        refine(sphere(0.3), prior, None, RefineConfig(steps=1, **FAST), progress=False, negative="a small ball")


def test_bad_inputs_are_one_clear_error(tmp_path):
    prior = GaussianImagePrior(render_of(sphere(0.6), 16), text_conditioned=False)
    with pytest.raises(ShapekilnError, match="trained without text"):
        refine(sphere(0.3), prior, "a big ball", RefineConfig(steps=1, **FAST), progress=False)
    with pytest.raises(ShapekilnError, match="cubic"):
        refine(np.zeros((8, 8, 4), np.float32), prior, None, RefineConfig(steps=1, **FAST), progress=False)
    with pytest.raises(ShapekilnError, match="NaN"):
        refine(np.full((8, 8, 8), np.nan, np.float32), prior, None, RefineConfig(steps=1, **FAST), progress=False)
    with pytest.raises(ShapekilnError, match="needs the VQ-VAE"):
        refine(sphere(0.3), prior, None, RefineConfig(steps=1, target="latent", **FAST), progress=False)
    with pytest.raises(ShapekilnError, match="t_start"):
        RefineConfig(t_start=(0.5, 0.2)).validate()
    with pytest.raises(ShapekilnError, match="'albedo' shading needs color"):
        RefineConfig(color=False, shadings=RefineConfig.shadings_for(True)).validate()
    RefineConfig(color=False, shadings=RefineConfig.shadings_for(False)).validate()  # what --no-color asks for
    (tmp_path / "notes.txt").write_text("not a mesh")
    with pytest.raises(ShapekilnError):
        load_shape(tmp_path / "notes.txt", None, TAU)
    (tmp_path / "cloud.xyz").write_text("0 0 0\n0.1 0 0\n")
    with pytest.raises(ShapekilnError, match="point cloud"):
        load_shape(tmp_path / "cloud.xyz", None, TAU)
    np.save(tmp_path / "flat.npy", np.zeros((4, 4), np.float32))
    with pytest.raises(ShapekilnError, match="TSDF grid"):
        load_shape(tmp_path / "flat.npy", None, TAU)


def test_load_shape_reads_grids_of_any_size_and_meshes_at_the_asked_resolution(tmp_path):
    np.save(tmp_path / "ball.npy", sphere(0.4, 12))
    assert load_shape(tmp_path / "ball.npy", None, TAU).shape == (12, 12, 12)
    trimesh.creation.icosphere(subdivisions=3, radius=0.5).export(tmp_path / "ball.obj")
    grid = load_shape(tmp_path / "ball.obj", None, TAU, mesh_resolution=20)
    assert grid.shape == (20, 20, 20) and occupancy_iou(grid, sphere(0.5, 20)) > 0.9


def test_vertex_colors_are_the_albedo_grid_at_the_vertices():
    tsdf = sphere(0.5)
    colors = np.zeros((3, R, R, R), np.float32)
    colors[0] = (grid_points(R)[:, 0] > 0).reshape(R, R, R)  # red where x > 0
    mesh = colored_mesh(tsdf, colors)
    right = mesh.vertices[:, 0] > 0.2
    assert (mesh.visual.vertex_colors[right, 0] > 200).all() and (mesh.visual.vertex_colors[mesh.vertices[:, 0] < -0.2, 0] < 50).all()


def test_write_refined_writes_meshes_grids_colors_and_a_before_after_preview(tmp_path):
    prior = GaussianImagePrior(render_of(sphere(0.6), 16))
    result = refine(sphere(0.3), prior, "a big ball", RefineConfig(steps=2, **{**FAST, "color": True, "shadings": ("albedo", "shaded")}),
                    tau=TAU, progress=False, log_dir=tmp_path / "logs")
    written = write_refined(result, tmp_path / "out", "a big ball")
    names = sorted(path.name for path in written)
    assert names == ["preview.png", "refined.glb", "refined.npy", "refined.obj", "refined.ply", "refined_colors.npy"]
    assert np.array_equal(np.load(tmp_path / "out" / "refined.npy"), result.tsdf)
    assert trimesh.load(tmp_path / "out" / "refined.ply").visual.kind == "vertex"
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]  # no staging left behind
    assert list((tmp_path / "logs").glob("events.out.tfevents.*"))
