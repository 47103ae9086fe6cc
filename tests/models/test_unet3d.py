"""The 3D UNet denoiser: shapes at every size, timestep forms, context and its mask, batch
independence (classifier-free guidance batches its passes), gradients, save/load, zero-init."""

import pytest
import torch
from shapekiln.models.io import load_pretrained
from shapekiln.models.unet3d import UNet3DModel

# 3 noisy latent + 3 masked partial-shape latent + 1 known mask, as the latent diffusion trainer feeds it.
IN_CHANNELS = 7
TINY = {"latent_resolution": 4, "model_channels": 16, "channel_mult": (1, 2), "attention_resolutions": (2,),
        "cross_attention_dim": 32, "num_heads": 2, "norm_groups": 4}
SMALL = {"latent_resolution": 8, "model_channels": 64, "channel_mult": (1, 2, 4), "attention_resolutions": (4, 2),
         "cross_attention_dim": 256, "num_heads": 4}
PAPER = {"latent_resolution": 16, "model_channels": 224, "channel_mult": (1, 2, 4), "num_res_blocks": 2,
         "attention_resolutions": (8, 4), "cross_attention_dim": 512, "num_heads": 8}


def tiny_model(trained_like: bool = True, **overrides) -> UNet3DModel:
    """A tiny UNet; `trained_like` fills the zero-initialized weights with noise so the output depends on the inputs."""
    torch.manual_seed(0)
    model = UNet3DModel(in_channels=IN_CHANNELS, out_channels=3, **{**TINY, **overrides}).eval()
    if trained_like:
        with torch.no_grad():
            for parameter in model.parameters():
                if not parameter.any():
                    parameter.normal_(0.0, 0.1)
    return model


def inputs(batch: int = 2, tokens: int = 5, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, IN_CHANNELS, 4, 4, 4, generator=generator)
    context = torch.randn(batch, tokens, TINY["cross_attention_dim"], generator=generator)
    return sample, context


@pytest.mark.parametrize("config", [TINY, SMALL], ids=["tiny", "small"])
def test_output_shape(config):
    torch.manual_seed(0)
    model = UNet3DModel(in_channels=IN_CHANNELS, out_channels=3, **config).eval()
    r = config["latent_resolution"]
    context = torch.randn(2, 6, config["cross_attention_dim"])
    mask = torch.tensor([[True] * 6, [True, True, False, False, False, False]])
    with torch.no_grad():
        out = model(torch.randn(2, IN_CHANNELS, r, r, r), torch.tensor([10, 900]), context, mask)
    assert out.shape == (2, 3, r, r, r)


def test_paper_config_shapes_on_meta_device():
    """SDFusion-sized (16³ latent, 224 channels), checked on the meta device (no memory, no compute)."""
    with torch.device("meta"):
        model = UNet3DModel(in_channels=IN_CHANNELS, out_channels=3, **PAPER)
        out = model(torch.empty(2, IN_CHANNELS, 16, 16, 16), torch.empty(2), torch.empty(2, 77, 512),
                    torch.ones(2, 77, dtype=torch.bool))
    assert out.shape == (2, 3, 16, 16, 16)
    assert sum(p.numel() for p in model.parameters()) > 100_000_000


def test_timestep_forms_agree():
    model = tiny_model()
    sample, context = inputs()
    with torch.no_grad():
        reference = model(sample, 250, context)
        for timestep in (torch.tensor(250), torch.tensor(250.0), torch.tensor([250, 250]), torch.tensor([250.0] * 2)):
            assert torch.allclose(model(sample, timestep, context), reference, atol=1e-6)
        mixed = model(sample, torch.tensor([250, 900]), context)
        assert torch.allclose(mixed[:1], reference[:1], atol=1e-6)
        assert not torch.allclose(mixed[1:], reference[1:], atol=1e-3)
        assert torch.allclose(mixed[1:], model(sample[1:], 900, context[1:]), atol=1e-5)


def test_context_changes_the_output():
    model = tiny_model()
    sample, context = inputs()
    with torch.no_grad():
        with_context = model(sample, 100, context)
        assert not torch.allclose(with_context, model(sample, 100, context + 1.0), atol=1e-3)
        assert not torch.allclose(with_context, model(sample, 100), atol=1e-3)


def test_masked_tokens_have_no_effect():
    model = tiny_model()
    sample, context = inputs(tokens=6)
    mask = torch.tensor([[True, True, True, False, False, False], [True, False, True, False, True, True]])
    changed = torch.where(mask[..., None], context, torch.randn_like(context) * 10)
    with torch.no_grad():
        reference = model(sample, 100, context, mask)
        assert torch.allclose(model(sample, 100, changed, mask), reference, atol=1e-6)
        # ... while an attended token does matter.
        changed_attended = context.clone()
        changed_attended[0, 0] += 5.0
        assert not torch.allclose(model(sample, 100, changed_attended, mask)[0], reference[0], atol=1e-3)


def test_an_all_false_mask_row_means_no_cross_attention():
    model = tiny_model()
    sample, context = inputs()
    mask = torch.tensor([[False] * 5, [True] * 5])
    with torch.no_grad():
        out = model(sample, 100, context, mask)
        assert torch.isfinite(out).all()
        assert torch.equal(out[0], model(sample, 100)[0])  # exactly as if no context were given
        assert torch.equal(out[0], model(sample, 100, torch.randn_like(context), mask)[0])
        assert torch.allclose(out[1], model(sample[1:], 100, context[1:])[0], atol=1e-5)


def test_each_sample_is_independent_of_the_rest_of_the_batch():
    """Classifier-free guidance batches the conditional and unconditional passes: they must not mix."""
    model = tiny_model()
    sample, context = inputs(batch=3)
    mask = torch.tensor([[True] * 5, [False] * 5, [True, True, False, False, False]])
    timestep = torch.tensor([5, 500, 999])
    with torch.no_grad():
        batched = model(sample, timestep, context, mask)
        for i in range(3):
            single = model(sample[i:i + 1], timestep[i:i + 1], context[i:i + 1], mask[i:i + 1])
            assert torch.allclose(batched[i:i + 1], single, atol=1e-5)


@pytest.mark.parametrize("trained_like", [False, True], ids=["untrained", "trained-like"])
def test_every_parameter_gets_a_gradient(trained_like):
    """No unused parameters (distributed data parallel would fail on them), even when a row drops its context."""
    model = tiny_model(trained_like=trained_like).train()
    sample, context = inputs()
    mask = torch.tensor([[True] * 5, [False] * 5])
    out = model(sample, torch.tensor([3, 800]), context, mask)
    ((out - torch.randn_like(out)) ** 2).mean().backward()
    missing = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing
    if trained_like:  # with every weight non-zero, every gradient is too: nothing is disconnected
        zero = [name for name, p in model.named_parameters() if not p.grad.any()]
        assert not zero


def test_untrained_model_predicts_zero():
    model = tiny_model(trained_like=False)
    sample, context = inputs()
    with torch.no_grad():
        assert torch.equal(model(sample, 500, context), torch.zeros(2, 3, 4, 4, 4))


def test_save_and_load_round_trip(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path / "unet")
    assert {p.name for p in (tmp_path / "unet").iterdir()} == {"config.json", "diffusion_pytorch_model.safetensors"}
    loaded = load_pretrained(UNet3DModel, tmp_path / "unet", expect={"latent_resolution": 4}).eval()
    assert list(loaded.config.attention_resolutions) == [2] and loaded.config.in_channels == IN_CHANNELS
    sample, context = inputs()
    with torch.no_grad():
        assert torch.equal(loaded(sample, 42, context), model(sample, 42, context))


def test_bad_configs_name_the_problem():
    with pytest.raises(ValueError, match=r"attention resolution 3 is not a level resolution; valid: \[4, 2\]"):
        UNet3DModel(**{**TINY, "attention_resolutions": (3,)})
    with pytest.raises(ValueError, match="latent_resolution 6 is not divisible by 4"):
        UNet3DModel(**{**SMALL, "latent_resolution": 6, "model_channels": 8})
    with pytest.raises(ValueError, match="do not split into 3 attention heads"):
        UNet3DModel(**{**TINY, "num_heads": 3})


def test_bad_inputs_name_the_problem():
    model = tiny_model(trained_like=False)
    sample, context = inputs()
    with pytest.raises(ValueError, match=r"sample must be \(B, 7, 4, 4, 4\)"):
        model(sample[:, :3], 1, context)
    with pytest.raises(ValueError, match="context must be"):
        model(sample, 1, context[..., :8])
    with pytest.raises(ValueError, match="context_mask must be bool"):
        model(sample, 1, context, torch.ones(2, 5))
    with pytest.raises(ValueError, match="timestep must be"):
        model(sample, torch.tensor([1, 2, 3]), context)
    with pytest.raises(ValueError, match="no cross-attention"):
        tiny_model(trained_like=False, cross_attention_dim=None)(sample, 1, context)
