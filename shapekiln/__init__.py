"""shapekiln: latent SDF diffusion for 3D shapes (data preparation, VQ-VAE, latent diffusion, SDS)."""

__version__ = "0.1.0"
