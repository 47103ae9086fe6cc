from pathlib import Path

import pytest
import torch

from shapekiln.config import load_config, to_dict
from shapekiln.models.conditioning import LatentDiffusion
from shapekiln.models.vqvae import VQVAE
from shapekiln.train.ldm import LDMConfig, build_models, make_pipeline
from shapekiln.train.vqvae import VQVAEConfig


def randomize_zero_parameters(module: torch.nn.Module, seed: int = 0) -> None:
    """Untrained diffusion UNets are zero-initialized at their outputs (they predict 0); give every
    all-zero parameter noise so that conditions visibly change predictions."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            if not parameter.any():
                parameter.copy_(0.1 * torch.randn(parameter.shape, generator=generator))


def tiny_pipeline(modalities=("text", "image", "partial")):
    """A real ShapePipeline at the tiny configs, untrained but with every weight non-zero."""
    torch.manual_seed(0)
    vqvae = VQVAE(**to_dict(load_config(VQVAEConfig, "tiny", "vqvae").model)).eval()
    config = load_config(LDMConfig, "tiny", "ldm")
    config.conditioning.modalities = tuple(modalities)
    config.conditioning.latent_heads = tuple(name for name in config.conditioning.latent_heads if name in modalities)
    unet, conditioning = build_models(config, vqvae)
    randomize_zero_parameters(unet)
    randomize_zero_parameters(conditioning, seed=1)
    channels = vqvae.config.latent_channels
    pipeline = make_pipeline(LatentDiffusion(unet, conditioning), vqvae, config.diffusion.scheduler(),
                             torch.zeros(channels), torch.ones(channels), config)
    for module in (pipeline.unet, pipeline.conditioning, pipeline.vqvae):
        module.eval()
    return pipeline


@pytest.fixture(scope="session")
def pipeline():
    return tiny_pipeline()


@pytest.fixture(scope="session")
def pipeline_dir(pipeline, tmp_path_factory) -> Path:
    return pipeline.save_pretrained(tmp_path_factory.mktemp("pipeline") / "pipeline")
