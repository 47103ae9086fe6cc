"""The VQ-VAE model: tensor shapes at every config, the quantizer's updates, save/load."""

import json

import pytest
import torch

from shapekiln.config import load_config, to_dict
from shapekiln.errors import ShapekilnError
from shapekiln.models.io import load_pretrained
from shapekiln.models.vqvae import Upsample, VectorQuantizer, VQVAE, fold_patches, unfold_patches
from shapekiln.train.vqvae import VQVAEConfig


def model_for(size: str) -> VQVAE:
    return VQVAE(**to_dict(load_config(VQVAEConfig, size, "vqvae").model))


@pytest.mark.parametrize("size", ["tiny", "small"])
def test_shapes_through_encoder_quantizer_decoder(size):
    torch.manual_seed(0)
    model = model_for(size)
    r, c = model.config.resolution, model.config.latent_channels
    tsdf = 0.2 * torch.tanh(torch.randn(2, 1, r, r, r))
    output = model(tsdf)
    assert output.latent.shape == (2, c, r // 4, r // 4, r // 4) == (2, *model.latent_shape)
    assert output.indices.shape == (2, r // 4, r // 4, r // 4) and output.indices.dtype == torch.int64
    assert 0 <= int(output.indices.min()) and int(output.indices.max()) < model.config.codebook_size
    assert output.reconstruction.shape == tsdf.shape
    assert output.commitment_loss.ndim == 0 and output.commitment_loss > 0
    assert model.encode(tsdf).shape == output.latent.shape
    assert model.decode(output.latent).shape == tsdf.shape


def test_paper_config_is_sdfusion_sized():
    """64³ → 3×16³, codebook 8192×3, shapes checked on the meta device (no memory, no compute)."""
    with torch.device("meta"):
        model = model_for("paper")
        latent = model.encoder(torch.empty(1, 1, 64, 64, 64))
        assert latent.shape == (1, 3, 16, 16, 16)
        assert model.decoder(latent).shape == (1, 1, 64, 64, 64)
    assert model.quantizer.codebook.shape == (8192, 3)
    assert list(model.config.channel_mult) == [1, 2, 4] and model.config.base_channels == 64


def test_resolution_must_divide_by_the_downsampling():
    with pytest.raises(ValueError, match="not divisible"):
        VQVAE(resolution=18, base_channels=8, norm_groups=4)


def test_folded_patches_unfold_back_and_keep_each_block_in_one_cell():
    x = torch.arange(2 * 3 * 8**3, dtype=torch.float32).reshape(2, 3, 8, 8, 8)
    folded = fold_patches(x, 2)
    assert folded.shape == (2, 24, 4, 4, 4)
    torch.testing.assert_close(unfold_patches(folded, 2), x, rtol=0, atol=0)
    # cell (1, 2, 3) holds exactly the voxels of block [2:4, 4:6, 6:8], channel by channel
    block = x[:, :, 2:4, 4:6, 6:8].reshape(2, 3, 8)
    torch.testing.assert_close(folded[:, :, 1, 2, 3].reshape(2, 3, 8), block, rtol=0, atol=0)


def test_a_patch_model_folds_2_cubed_voxels_before_its_levels():
    """patch_size 2 with two levels: 32³ → 8³ like three levels without patches, and no conv at 32³."""
    torch.manual_seed(0)
    model = VQVAE(resolution=32, base_channels=8, channel_mult=(2, 4), norm_groups=4, upsample="transpose", patch_size=2)
    assert model.latent_resolution == 8 and model.latent_shape == (3, 8, 8, 8)
    assert model.encoder.conv_in.in_channels == 8 and model.decoder.conv_out.out_channels == 8
    tsdf = 0.2 * torch.tanh(torch.randn(2, 1, 32, 32, 32))
    output = model(tsdf)
    assert output.latent.shape == (2, 3, 8, 8, 8) and output.reconstruction.shape == tsdf.shape
    with pytest.raises(ValueError, match="not divisible by 8"):
        VQVAE(resolution=36, base_channels=8, channel_mult=(2, 4), norm_groups=4, patch_size=4)
    with pytest.raises(ValueError, match="patch_size must be at least 1"):
        VQVAE(resolution=32, base_channels=8, norm_groups=4, patch_size=0)


def test_transposed_upsampling_writes_each_voxel_its_own_block():
    """A 2³ stride-2 transposed conv: output voxel (2i+a, 2j+b, 2k+c) depends on input voxel (i, j, k) only."""
    torch.manual_seed(0)
    model = VQVAE(resolution=16, base_channels=8, norm_groups=4, upsample="transpose")
    (upsample,) = [module for module in model.decoder.modules() if isinstance(module, Upsample)][:1]
    channels = upsample.conv.in_channels
    x = torch.zeros(1, channels, 4, 4, 4)
    x[0, :, 1, 2, 3] = torch.randn(channels)
    y = upsample(x) - upsample(torch.zeros_like(x))  # remove the bias
    assert y.shape == (1, channels, 8, 8, 8)
    changed = y.abs().sum(1)[0] > 0
    assert changed[2:4, 4:6, 6:8].all() and changed.sum() == 8
    with pytest.raises(ValueError, match="upsample must be"):
        VQVAE(resolution=16, base_channels=8, norm_groups=4, upsample="bilinear")


def test_quantizer_gradient_passes_straight_through():
    torch.manual_seed(0)
    quantizer = VectorQuantizer(16, 3, commitment_weight=0.5, decay=0.9, restart_dead_codes=False).eval()
    latent = torch.randn(2, 3, 4, 4, 4, requires_grad=True)
    output = quantizer(latent)
    (output.quantized * torch.arange(3.0).view(1, 3, 1, 1, 1)).sum().backward()
    expected = torch.arange(3.0).view(1, 3, 1, 1, 1).expand_as(latent)
    assert torch.equal(latent.grad, expected)
    nearest = quantizer.codebook[output.indices]  # (2, 4, 4, 4, 3)
    assert torch.allclose(output.quantized.detach(), nearest.permute(0, 4, 1, 2, 3))
    assert torch.allclose(output.commitment_loss, 0.5 * ((latent - output.quantized) ** 2).mean())


def test_quantizer_starts_from_data_and_follows_it_by_ema():
    torch.manual_seed(0)
    quantizer = VectorQuantizer(8, 3, commitment_weight=1.0, decay=0.5, restart_dead_codes=False).train()
    centers = torch.tensor([[5.0, 0.0, 0.0], [-5.0, 0.0, 0.0]])
    latent = centers[torch.arange(64) % 2].T.reshape(1, 3, 4, 4, 4)  # two clusters of 32
    quantizer(latent)
    assert bool(quantizer.initialized)
    # Initialized from the batch (jittered): every code is near one of the two centers.
    assert torch.cdist(quantizer.codebook, centers).min(dim=1).values.max() < 0.1
    shifted = latent + 1.0
    for _ in range(20):
        output = quantizer(shifted)
    used = output.indices.unique()
    assert torch.cdist(quantizer.codebook[used], centers + 1.0).min(dim=1).values.max() < 1e-3


def test_dead_codes_restart_from_the_batch():
    torch.manual_seed(0)
    quantizer = VectorQuantizer(4, 3, commitment_weight=1.0, decay=0.5, restart_dead_codes=True).train()
    quantizer(torch.zeros(1, 3, 2, 2, 2))  # initialize
    quantizer.codebook[3] = torch.tensor([100.0, 100.0, 100.0])  # a code no latent will pick
    quantizer.embed_sum[3] = quantizer.codebook[3]
    data = torch.randn(1, 3, 4, 4, 4)
    for _ in range(12):  # cluster size 1 · 0.5^n falls below the threshold
        quantizer(data)
    assert quantizer.codebook[3].abs().max() < 10.0


def test_save_and_load_round_trip(tmp_path):
    torch.manual_seed(0)
    model = model_for("tiny").train()
    tsdf = 0.2 * torch.tanh(torch.randn(2, 1, 16, 16, 16))
    model(tsdf)  # initializes and moves the codebook: buffers must round-trip too
    model.eval()
    model.save_pretrained(tmp_path / "vq")
    assert {p.name for p in (tmp_path / "vq").iterdir()} == {"config.json", "diffusion_pytorch_model.safetensors"}
    loaded = load_pretrained(VQVAE, tmp_path / "vq", expect={"resolution": 16}).eval()
    assert torch.equal(loaded.quantizer.codebook, model.quantizer.codebook) and bool(loaded.quantizer.initialized)
    with torch.no_grad():
        assert torch.equal(loaded(tsdf).reconstruction, model(tsdf).reconstruction)


def test_loading_the_wrong_folder_says_why(tmp_path):
    model_for("tiny").save_pretrained(tmp_path / "vq")
    with pytest.raises(ShapekilnError, match="resolution=16, but 32 is needed"):
        load_pretrained(VQVAE, tmp_path / "vq", expect={"resolution": 32})
    with pytest.raises(ShapekilnError, match="not a saved model folder"):
        load_pretrained(VQVAE, tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    with pytest.raises(ShapekilnError, match="holds a UNet2DModel model, not a VQVAE"):
        load_pretrained(VQVAE, other)
    (tmp_path / "vq" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(ShapekilnError, match="no .safetensors"):
        load_pretrained(VQVAE, tmp_path / "vq")
