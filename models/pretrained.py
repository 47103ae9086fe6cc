"""Models shipped inside the package, loaded by name offline: `VQVAE.from_pretrained("shapekiln/general-32")`,
`--vqvae general-32` wherever a command takes a VQ-VAE folder.

Each lives in `models/pretrained/<name>/` (config.json + diffusion_pytorch_model.safetensors, as diffusers
saves it) and is checked against the SHA-256 recorded here before it is read, so a damaged install
is one clear error, not a model that silently decodes garbage. How each was trained is in `ABOUT`.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from shapekiln.errors import ShapekilnError

ROOT = Path(__file__).resolve().parent / "pretrained"
WEIGHTS = "diffusion_pytorch_model.safetensors"

# name → SHA-256 of its weights file.
CHECKSUMS: dict[str, str] = {
    "general-32": "46059063db95f55f9d8ba83e5dcfdb5bdc654b322aa845cc6375f9fa6e8cecef",
}

ABOUT: dict[str, str] = {
    "general-32": "32³ → 3×8³, 4096 codes; configs/vqvae/general-32.yaml on 3000 procedural shapes (seed 0) and 2000 "
                  "synthetic ones (seed 1, --part-voxels 1.5), 10000 steps at batch 4 (README: Which VQ-VAE)",
}


def pretrained_names() -> list[str]:
    return sorted(CHECKSUMS)


def _name(value: str | os.PathLike) -> str | None:
    """The registered name `value` spells ("general-32" or "shapekiln/general-32"), or None."""
    text = str(value)
    name = text.removeprefix("shapekiln/")
    return name if name in CHECKSUMS else None


def resolve(value: str | os.PathLike, root: Path = ROOT) -> Path:
    """A model folder: `value` itself when it is a folder, else the shipped model it names (checked).

    A folder of that name in the current directory wins over the shipped model, as a path should.
    """
    path = Path(value)
    if path.is_dir():
        return path
    name = _name(value)
    if name is None:
        return path  # not a name: the loader says what is wrong with the path
    folder = root / name
    weights = folder / WEIGHTS
    if not weights.is_file() or not (folder / "config.json").is_file():
        raise ShapekilnError(f"the shipped model {name} is missing from {folder}; reinstall shapekiln")
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    if digest != CHECKSUMS[name]:
        raise ShapekilnError(f"the shipped model {name} fails its checksum ({weights}: sha256 {digest[:12]}…, "
                             f"expected {CHECKSUMS[name][:12]}…); reinstall shapekiln")
    return folder
