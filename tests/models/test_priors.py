"""SDS and the 2D diffusion priors: the formula on an analytic prior, the view prior, and Stable Diffusion
loading on a tiny pipeline built and saved here (no download)."""

import json
import shutil

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from shapekiln.data_prep.render import look_at_origin
from shapekiln.errors import ShapekilnError
from shapekiln.models.priors import (
    DiffusionPrior, StableDiffusionPrior, TextCondition, ViewPrior, azimuth_elevation, camera_features, load_prior, sds_loss,
)

# ---------------------------------------------------------------------------------------------------
# The SDS formula on a prior with a known answer

SIGMA = 0.3  # data std of the toy distribution
MEAN_EMPTY, MEAN_TEXT = -0.5, 0.8  # unconditional and conditional data means


class GaussianPrior(DiffusionPrior):
    """Data ~ N(μ, σ²I), μ given by the text (a scalar carried in the tokens): ε̂ is the exact
    posterior mean E[ε | x_t] = √(1−ᾱ)(x_t − √ᾱ μ) / (ᾱσ² + 1 − ᾱ). x0 is the image itself."""

    text_conditioned, camera_conditioned, image_size = True, False, 4

    def __init__(self):
        super().__init__()
        self.scheduler = DDPMScheduler()
        self.calls: list[int] = []

    def encode_text(self, prompts):
        return TextCondition(torch.full((len(prompts), 1, 1), MEAN_TEXT))

    def empty_text(self, batch):
        return TextCondition(torch.full((batch, 1, 1), MEAN_EMPTY))

    def encode_images(self, rgb):
        return rgb

    def predict_noise(self, x_t, t, text, cameras=None):
        self.calls.append(x_t.shape[0])
        return exact_eps(x_t, t, text.tokens[:, 0, 0], self.scheduler)

    def decode(self, x0):
        return x0


def exact_eps(x_t, t, mean, scheduler):
    alpha = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    mean = torch.as_tensor(mean, dtype=x_t.dtype).reshape(-1, 1, 1, 1)
    return (1 - alpha).sqrt() * (x_t - alpha.sqrt() * mean) / (alpha * SIGMA**2 + 1 - alpha)


def toy_inputs(batch=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    rgb = torch.rand(batch, 3, 4, 4, generator=generator).requires_grad_(True)
    noise = torch.randn(batch, 3, 4, 4, generator=generator)
    t = torch.tensor([50, 400, 900][:batch])
    return rgb, noise, t


@pytest.mark.parametrize("weighting", ["sds", "uniform"])
def test_sds_grad_is_the_guided_noise_residual_weighted_by_w_t(weighting):
    prior = GaussianPrior()
    rgb, noise, t = toy_inputs()
    scale = 7.5
    out = sds_loss(prior, rgb, prior.encode_text(["x"] * 3), guidance_scale=scale, t=t, noise=noise, weighting=weighting)

    alpha = prior.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    x_t = alpha.sqrt() * rgb.detach() + (1 - alpha).sqrt() * noise
    eps_empty, eps_text = exact_eps(x_t, t, MEAN_EMPTY, prior.scheduler), exact_eps(x_t, t, MEAN_TEXT, prior.scheduler)
    guided = eps_empty + scale * (eps_text - eps_empty)
    weight = 1 - alpha if weighting == "sds" else torch.ones_like(alpha)
    torch.testing.assert_close(out.noise_pred, guided)
    torch.testing.assert_close(out.grad, weight * (guided - noise))
    assert not out.grad.requires_grad
    assert prior.calls == [6]  # both branches in one call of batch 2B

    out.loss.backward()  # autograd through the surrogate gives exactly grad w.r.t. x0 (= the image here)
    torch.testing.assert_close(rgb.grad, out.grad, rtol=0, atol=1e-6)
    assert out.loss.ndim == 0


def test_guidance_one_is_the_conditional_branch_in_one_pass():
    prior = GaussianPrior()
    rgb, noise, t = toy_inputs()
    out = sds_loss(prior, rgb, prior.encode_text(["x"] * 3), guidance_scale=1.0, t=t, noise=noise)
    alpha = prior.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    x_t = alpha.sqrt() * rgb.detach() + (1 - alpha).sqrt() * noise
    torch.testing.assert_close(out.noise_pred, exact_eps(x_t, t, MEAN_TEXT, prior.scheduler))
    assert prior.calls == [3]
    nearly_one = sds_loss(GaussianPrior(), rgb, prior.encode_text(["x"] * 3), guidance_scale=1.0 + 1e-6, t=t, noise=noise)
    torch.testing.assert_close(nearly_one.grad, out.grad, rtol=1e-4, atol=1e-5)


def test_no_text_is_unconditional_sds_and_noise_comes_from_the_generator():
    prior = GaussianPrior()
    rgb, noise, t = toy_inputs()
    out = sds_loss(prior, rgb, None, guidance_scale=7.5, t=t, noise=noise)
    alpha = prior.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    x_t = alpha.sqrt() * rgb.detach() + (1 - alpha).sqrt() * noise
    torch.testing.assert_close(out.grad, (1 - alpha) * (exact_eps(x_t, t, MEAN_EMPTY, prior.scheduler) - noise))
    assert prior.calls == [3]  # the empty branch only, whatever the guidance scale
    first = sds_loss(prior, rgb, None, guidance_scale=7.5, t=t, generator=torch.Generator().manual_seed(3))
    again = sds_loss(prior, rgb, None, guidance_scale=7.5, t=t, generator=torch.Generator().manual_seed(3))
    other = sds_loss(prior, rgb, None, guidance_scale=7.5, t=t, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(first.grad, again.grad)
    assert not torch.allclose(first.grad, other.grad)


def test_a_negative_prompt_takes_the_place_of_the_empty_text_in_one_pass():
    """ε̂ = ε(x_t, n) + s·(ε(x_t, c) − ε(x_t, n)): guidance pushes away from the negative prompt n."""
    prior = GaussianPrior()
    rgb, noise, t = toy_inputs()
    mean_negative = 0.1
    negative = TextCondition(torch.full((3, 1, 1), mean_negative))
    out = sds_loss(prior, rgb, prior.encode_text(["x"] * 3), guidance_scale=5.0, t=t, noise=noise, negative=negative)
    alpha = prior.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    x_t = alpha.sqrt() * rgb.detach() + (1 - alpha).sqrt() * noise
    eps_negative, eps_text = exact_eps(x_t, t, mean_negative, prior.scheduler), exact_eps(x_t, t, MEAN_TEXT, prior.scheduler)
    torch.testing.assert_close(out.grad, (1 - alpha) * (eps_negative + 5.0 * (eps_text - eps_negative) - noise))
    assert prior.calls == [6]
    with pytest.raises(ShapekilnError, match="1 negative text conditions for 3 images"):
        sds_loss(prior, rgb, prior.encode_text(["x"] * 3), guidance_scale=5.0, t=t, negative=TextCondition(torch.zeros(1, 1, 1)))


@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_sds_steps_move_the_image_to_the_guided_mean(scale):
    """E[ε̂ − ε] ∝ x0 − μ for this prior, with μ = μ_∅ + s(μ_c − μ_∅) under guidance s: SDS descends to it."""
    prior = GaussianPrior()
    image = torch.full((4, 3, 4, 4), MEAN_EMPTY, requires_grad=True)
    optimizer = torch.optim.SGD([image], lr=0.05)
    generator = torch.Generator().manual_seed(0)
    text = prior.encode_text(["x"] * 4)
    target = MEAN_EMPTY + scale * (MEAN_TEXT - MEAN_EMPTY)
    start = (image.detach() - target).abs().mean().item()
    for _ in range(300):
        t = torch.randint(20, 980, (4,), generator=generator)
        optimizer.zero_grad()
        sds_loss(prior, image, text, guidance_scale=scale, t=t, generator=generator).loss.backward()
        optimizer.step()
    assert (image.detach().mean() - target).abs() < 0.05 * start
    assert (image.detach() - target).abs().mean() < 0.1 * start


def test_bad_sds_arguments_are_shapekiln_errors():
    prior = GaussianPrior()
    rgb, noise, t = toy_inputs()
    text = prior.encode_text(["x"] * 3)
    with pytest.raises(ShapekilnError, match="weighting"):
        sds_loss(prior, rgb, text, guidance_scale=3, t=t, weighting="linear")
    with pytest.raises(ShapekilnError, match="timesteps must lie"):
        sds_loss(prior, rgb, text, guidance_scale=3, t=torch.tensor([0, 1, 1000]))
    with pytest.raises(ShapekilnError, match="noise must have the shape"):
        sds_loss(prior, rgb, text, guidance_scale=3, t=t, noise=noise[:1])
    with pytest.raises(ShapekilnError, match="2 text conditions for 3 images"):
        sds_loss(prior, rgb, prior.encode_text(["x"] * 2), guidance_scale=3, t=t)


# ---------------------------------------------------------------------------------------------------
# The view prior


def tiny_view_prior(text="minilm", camera=True, seed=0, view_head=False):
    torch.manual_seed(seed)
    return ViewPrior.create(image_size=16, block_out_channels=(16, 32), layers_per_block=1, attention=(False, True),
                            head_dim=16, norm_groups=8, text=text, text_tokens=8, camera=camera, view_head=view_head)


def test_camera_angles_from_world_to_camera_follow_look_at_origin():
    for azimuth, elevation in [(0.0, 30.0), (135.0, 15.0), (-90.0, -20.0), (179.0, 60.0)]:
        camera = look_at_origin(azimuth, elevation, 2.5, 32, 40.0)
        angles = azimuth_elevation(torch.tensor(camera.world_to_camera, dtype=torch.float32))
        np.testing.assert_allclose(angles.numpy(), [azimuth, elevation], atol=1e-3)


def test_view_prior_saves_and_loads_back_with_identical_predictions(tmp_path):
    prior = tiny_view_prior().eval()
    with torch.no_grad():
        prior.empty_token.add_(1.0)  # a learned value, not the initial one
    prior.save_pretrained(tmp_path / "prior")
    description = json.loads((tmp_path / "prior" / "view_prior.json").read_text())
    assert description["text"]["kind"] == "minilm" and description["image_size"] == 16 and description["camera"] is True
    assert not [p for p in (tmp_path / "prior").rglob("*") if p.suffix in (".bin", ".pkl", ".pt", ".ckpt")]

    loaded = load_prior(tmp_path / "prior")
    assert isinstance(loaded, ViewPrior) and loaded.text_conditioned and loaded.camera_conditioned
    x_t, t = torch.randn(2, 3, 16, 16), torch.tensor([10, 700])
    cameras = torch.tensor([[0.0, 20.0], [90.0, 30.0]])
    with torch.no_grad():
        for text in (prior.encode_text(["a tall lamp", "a table with four legs"]), prior.empty_text(2)):
            torch.testing.assert_close(loaded.predict_noise(x_t, t, text, cameras), prior.predict_noise(x_t, t, text, cameras), rtol=0, atol=0)
    torch.testing.assert_close(loaded.empty_text(2).tokens, prior.empty_text(2).tokens)
    images = loaded.sample(["a tall lamp"], steps=3, generator=torch.Generator().manual_seed(0), cameras=[[0.0, 20.0]])
    again = prior.sample(["a tall lamp"], steps=3, generator=torch.Generator().manual_seed(0), cameras=[[0.0, 20.0]])
    assert images.shape == (1, 3, 16, 16) and 0 <= images.min() and images.max() <= 1
    torch.testing.assert_close(images, again)


def test_text_less_prior_refuses_prompts_but_runs_unconditional_sds():
    prior = tiny_view_prior(text=None, camera=False)
    assert not prior.text_conditioned
    with pytest.raises(ShapekilnError, match="trained without text"):
        prior.encode_text(["a tall lamp"])
    rgb = torch.rand(2, 3, 24, 24, requires_grad=True)
    out = sds_loss(prior, rgb, None, guidance_scale=7.5, t=torch.tensor([100, 800]))
    out.loss.backward()
    assert torch.isfinite(rgb.grad).all() and rgb.grad.abs().sum() > 0
    assert prior.sample(2, steps=2).shape == (2, 3, 16, 16)


def test_camera_conditioning_changes_the_prediction():
    prior = tiny_view_prior().eval()
    with torch.no_grad():  # a fresh UNet zero-initializes its output conv: give it weights that pass the signal
        for parameter in prior.unet.conv_out.parameters():
            parameter.normal_(0, 0.1)
    x_t, t = torch.randn(1, 3, 16, 16), torch.tensor([300])
    text = prior.encode_text(["a tall lamp"])
    with torch.no_grad():
        front = prior.predict_noise(x_t, t, text, torch.tensor([[0.0, 20.0]]))
        back = prior.predict_noise(x_t, t, text, torch.tensor([[180.0, 20.0]]))
        unknown = prior.predict_noise(x_t, t, text, None)
        around = prior.predict_noise(x_t, t, text, torch.tensor([[360.0, 20.0]]))
    assert (front - back).abs().max() > 1e-4 and (front - unknown).abs().max() > 1e-4
    torch.testing.assert_close(front, around, rtol=0, atol=1e-5)  # azimuth is periodic
    with pytest.raises(ShapekilnError, match="cameras must be"):
        prior.predict_noise(x_t, t, text, torch.tensor([0.0, 20.0]))


def test_dropped_captions_and_cameras_train_the_learned_empty_text_and_unknown_view():
    prior = tiny_view_prior()
    x_t, t = torch.randn(2, 3, 16, 16), torch.tensor([10, 500])
    text, cameras = prior.encode_text(["a tall lamp", "a round vase"]), torch.tensor([[0.0, 20.0], [90.0, 20.0]])
    everything = torch.ones(2, dtype=torch.bool)
    dropped = prior(x_t, t, text, cameras, drop_text=everything, drop_camera=everything)
    torch.testing.assert_close(dropped, prior(x_t, t, prior.empty_text(2), None))
    dropped.square().mean().backward()
    assert prior.empty_token.grad is not None and prior.empty_token.grad.abs().sum() > 0
    prior.zero_grad()
    prior(x_t, t, text, cameras, drop_text=~everything).square().mean().backward()
    assert prior.empty_token.grad is None or prior.empty_token.grad.abs().sum() == 0


def test_view_prior_sds_gives_finite_gradients_into_the_render():
    prior = tiny_view_prior()
    rgb = torch.rand(2, 3, 40, 40, requires_grad=True)  # another size than the prior's: resized inside
    text = prior.encode_text(["a tall lamp", "a round vase"])
    out = sds_loss(prior, rgb, text, guidance_scale=10.0, t=torch.tensor([200, 600]),
                   cameras=torch.tensor([[0.0, 20.0], [45.0, 10.0]]), generator=torch.Generator().manual_seed(0))
    out.loss.backward()
    assert out.grad.shape == (2, 3, 16, 16) and torch.isfinite(rgb.grad).all() and rgb.grad.abs().sum() > 0
    assert all(p.grad is None for p in prior.parameters())  # no gradient through the denoiser
    with pytest.raises(ShapekilnError, match=r"\(B, 3, H, W\)"):
        prior.encode_images(torch.rand(2, 4, 16, 16))


def test_view_head_reads_what_the_unet_reads_and_saves_with_the_prior(tmp_path):
    prior = tiny_view_prior(view_head=True).eval()
    assert prior.unet.config.in_channels == 6
    x_t, t = torch.randn(2, 3, 16, 16), torch.tensor([10, 500])
    text, cameras = prior.encode_text(["a tall lamp", "a round vase"]), torch.tensor([[0.0, 20.0], [90.0, 20.0]])
    noise, estimate = prior(x_t, t, text, cameras, return_view_estimate=True)
    assert noise.shape == estimate.shape == (2, 3, 16, 16) and estimate.abs().max() <= 1.0
    # The estimate is the head of the pooled text and the camera features, and it changes with each.
    pooled = (text.tokens * text.mask.unsqueeze(-1)).sum(1) / text.mask.sum(1, keepdim=True)
    by_hand = torch.tanh(prior.view_head.net(torch.cat([pooled, camera_features(cameras, 2, "cpu")], 1))).view(2, 3, 16, 16)
    torch.testing.assert_close(estimate, by_hand)
    _, turned = prior(x_t, t, text, cameras.flip(0), return_view_estimate=True)
    _, dropped = prior(x_t, t, text, cameras, drop_text=torch.ones(2, dtype=torch.bool), return_view_estimate=True)
    _, empty = prior(x_t, t, prior.empty_text(2), cameras, return_view_estimate=True)
    assert (turned - estimate).abs().max() > 1e-4 and (dropped - estimate).abs().max() > 1e-4
    torch.testing.assert_close(dropped, empty)  # a dropped caption is the empty text for the head too
    # Its loss trains the head and the empty text.
    _, estimate = prior(x_t, t, text, cameras, drop_text=torch.tensor([True, False]), return_view_estimate=True)
    estimate.square().mean().backward()
    assert prior.view_head.net[0].weight.grad.abs().sum() > 0 and prior.empty_token.grad.abs().sum() > 0

    with torch.no_grad():
        for parameter in prior.unet.conv_out.parameters():
            parameter.normal_(0, 0.1)
    prior.save_pretrained(tmp_path / "prior")
    assert json.loads((tmp_path / "prior" / "view_prior.json").read_text())["view_head"] is True
    loaded = load_prior(tmp_path / "prior")
    with torch.no_grad():
        torch.testing.assert_close(loaded.predict_noise(x_t, t, text, cameras), prior.predict_noise(x_t, t, text, cameras), rtol=0, atol=0)
    (tmp_path / "prior" / "view_head.safetensors").unlink()
    with pytest.raises(ShapekilnError, match="view_head.safetensors is missing"):
        load_prior(tmp_path / "prior")
    with pytest.raises(ShapekilnError, match="needs a text-conditioned prior"):
        tiny_view_prior(text=None, view_head=True)


def test_load_prior_refuses_what_it_cannot_load(tmp_path):
    with pytest.raises(ShapekilnError, match="prior not found"):
        load_prior(tmp_path / "nowhere")
    (tmp_path / "other").mkdir()
    with pytest.raises(ShapekilnError, match="neither a view prior"):
        load_prior(tmp_path / "other")
    tiny_view_prior(text=None).save_pretrained(tmp_path / "prior")
    shutil.rmtree(tmp_path / "prior" / "unet")
    with pytest.raises(ShapekilnError, match="unet is missing"):
        load_prior(tmp_path / "prior")


# ---------------------------------------------------------------------------------------------------
# Stable Diffusion, from a tiny pipeline saved here


def byte_level_chars():
    """CLIP's byte → printable-character table (GPT-2's bytes_to_unicode)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    codes, extra = printable[:], 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return [chr(code) for code in codes]


def tiny_clip_tokenizer(max_length=16):
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for char in byte_level_chars():
            vocab[char + suffix] = len(vocab)
    merges = [("a", "l"), ("al", "l</w>"), ("l", "a"), ("la", "m")]
    for first, second in merges:
        vocab[first + second] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    tokenizer = tiny_clip_tokenizer()
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
        max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    ))
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=2,
    )
    with torch.no_grad():
        unet.conv_out.weight.normal_(0, 0.1)  # not the zero init: let the text reach the output
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(8, 16), latent_channels=4, norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, sample_size=16,
    )
    # SD ships a PNDM sampler config; the prior reads its training schedule as DDPM.
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True,
                              steps_offset=1)
    pipeline = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    folder = tmp_path_factory.mktemp("sd") / "tiny-sd"
    pipeline.save_pretrained(folder, safe_serialization=True)
    return folder


def test_stable_diffusion_directory_loads_and_gives_sds_gradients(tiny_sd):
    assert (tiny_sd / "model_index.json").is_file()
    assert not [p for p in tiny_sd.rglob("*") if p.suffix in (".bin", ".pkl", ".pt", ".ckpt")]
    prior = load_prior(tiny_sd)
    assert isinstance(prior, StableDiffusionPrior) and prior.text_conditioned and not prior.camera_conditioned
    assert prior.image_size == 16  # UNet sample size 8 × VAE scale factor 2
    assert type(prior.scheduler).__name__ == "DDPMScheduler" and prior.scheduler.config.beta_schedule == "scaled_linear"
    assert not any(p.requires_grad for p in prior.parameters())

    text = prior.encode_text(["a tall lamp", "a lamp"])
    assert text.tokens.shape == (2, 16, 32) and text.mask is None
    torch.testing.assert_close(prior.empty_text(2).tokens, prior.encode_text(["", ""]).tokens)
    rgb = torch.rand(2, 3, 24, 24, requires_grad=True)
    out = sds_loss(prior, rgb, text, guidance_scale=7.5, t=torch.tensor([100, 900]), generator=torch.Generator().manual_seed(0))
    out.loss.backward()
    assert out.grad.shape == (2, 4, 8, 8)
    assert torch.isfinite(rgb.grad).all() and rgb.grad.abs().sum() > 0
    with torch.no_grad():
        x_t, t = torch.randn(1, 4, 8, 8), torch.tensor([500])
        conditional = prior.predict_noise(x_t, t, prior.encode_text(["a tall lamp"]))
        unconditional = prior.predict_noise(x_t, t, prior.empty_text(1))
    assert (conditional - unconditional).abs().max() > 1e-5  # the text reaches the prediction
    preview = prior.decode(out.grad)
    assert preview.shape == (2, 3, 16, 16) and 0 <= preview.min() and preview.max() <= 1


@pytest.mark.parametrize("part", ["vae", "unet", "tokenizer"])
def test_stable_diffusion_directory_missing_a_component_is_one_clear_error(tiny_sd, tmp_path, part):
    broken = tmp_path / "sd"
    shutil.copytree(tiny_sd, broken)
    shutil.rmtree(broken / part)
    with pytest.raises(ShapekilnError, match=rf"has no {part}/ folder") as error:
        load_prior(broken)
    assert "\n" not in str(error.value)


def test_stable_diffusion_weights_that_do_not_load_are_one_clear_error(tiny_sd, tmp_path):
    broken = tmp_path / "sd"
    shutil.copytree(tiny_sd, broken)
    for weights in (broken / "vae").glob("*.safetensors"):
        weights.write_bytes(b"not safetensors")
    with pytest.raises(ShapekilnError, match="cannot load Stable Diffusion") as error:
        load_prior(broken)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
def test_a_prior_that_predicts_v_or_x0_gives_the_epsilon_sds_needs(tiny_sd, tmp_path, prediction_type):
    """SD 2.x at 768 predicts v: the SDS direction must use ε = √ᾱ·v + √(1−ᾱ)·x_t, not v itself."""
    folder = tmp_path / "sd-v"
    shutil.copytree(tiny_sd, folder)
    config_file = folder / "scheduler" / "scheduler_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "prediction_type": prediction_type}))
    prior, epsilon_prior = load_prior(folder), load_prior(tiny_sd)
    assert prior.scheduler.config.prediction_type == prediction_type
    x_t, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([100, 700])
    text = prior.encode_text(["a tall lamp", "a lamp"])
    with torch.no_grad():
        raw = epsilon_prior.predict_noise(x_t, t, text)  # the same UNet read as ε: its raw output
        epsilon = prior.predict_noise(x_t, t, text)
    alpha = prior.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    expected = (alpha.sqrt() * raw + (1 - alpha).sqrt() * x_t if prediction_type == "v_prediction"
                else (x_t - alpha.sqrt() * raw) / (1 - alpha).sqrt())
    torch.testing.assert_close(epsilon, expected)
    assert (epsilon - raw).abs().max() > 1e-3
    out = sds_loss(prior, torch.rand(2, 3, 16, 16), text, guidance_scale=1.0, t=t, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out.grad).all() and out.grad.shape == (2, 4, 8, 8)
