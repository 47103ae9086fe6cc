"""The VQ-VAE shipped in the package: loads by name offline, checked by its checksum; damaged or foreign weights are one error line."""

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from shapekiln.data_prep.process import normalize
from shapekiln.data_prep.sources.synthetic import SyntheticSource
from shapekiln.data_prep.tsdf import compute_tsdf
from shapekiln.errors import ShapekilnError
from shapekiln.models.io import load_pretrained
from shapekiln.models.pretrained import CHECKSUMS, ROOT, WEIGHTS, pretrained_names, resolve
from shapekiln.models.vqvae import VQVAE


def test_general_32_loads_by_name_and_reconstructs_a_shape_it_never_saw():
    assert "general-32" in pretrained_names() and len(CHECKSUMS["general-32"]) == 64
    model = VQVAE.from_pretrained("shapekiln/general-32").eval()
    again = load_pretrained(VQVAE, "general-32")
    assert model.config.resolution == 32 and model.config.latent_channels == 3
    for a, b in zip(model.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)
    # A synthetic shape of a seed the model was not trained on (it saw seed 1), prepared as prep does.
    source = SyntheticSource(10, seed=123, resolution=32)
    ious = []
    for item in (0, 3, 7):
        mesh, _ = normalize(source.load(item).mesh, 0.8)
        tsdf = torch.from_numpy(compute_tsdf(mesh.vertices, mesh.faces, 32, 0.2))[None, None]
        with torch.inference_mode():
            decoded = model(tsdf).reconstruction
        inside, predicted = tsdf < 0, decoded < 0
        ious.append(float((inside & predicted).sum() / (inside | predicted).sum()))
    assert np.mean(ious) > 0.85, ious


def test_a_damaged_shipped_file_fails_its_checksum(tmp_path):
    shutil.copytree(ROOT / "general-32", tmp_path / "general-32")
    weights = tmp_path / "general-32" / WEIGHTS
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ShapekilnError, match="general-32 fails its checksum"):
        resolve("general-32", root=tmp_path)
    weights.unlink()
    with pytest.raises(ShapekilnError, match="missing"):
        resolve("shapekiln/general-32", root=tmp_path)


def test_a_folder_wins_over_a_name_and_an_unknown_name_is_a_missing_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve("general-32") == ROOT / "general-32"
    (tmp_path / "general-32").mkdir()
    assert resolve("general-32") == Path("general-32") and resolve("general-32").resolve() == (tmp_path / "general-32").resolve()
    with pytest.raises(ShapekilnError, match="not a saved model folder"):
        load_pretrained(VQVAE, "general-64")


def _damaged_folders(tmp_path):
    """The shipped config with weights of another VQ-VAE, and with its own weights cut short."""
    foreign = tmp_path / "foreign"
    shutil.copytree(ROOT / "general-32", foreign)
    other = VQVAE(resolution=32, base_channels=8, channel_mult=(1, 2), latent_channels=3, codebook_size=16, attention=False)
    other.save_pretrained(tmp_path / "other")
    shutil.copy(tmp_path / "other" / WEIGHTS, foreign / WEIGHTS)
    cut = tmp_path / "cut"
    shutil.copytree(ROOT / "general-32", cut)
    (cut / WEIGHTS).write_bytes((ROOT / "general-32" / WEIGHTS).read_bytes()[:1000])
    return foreign, cut


def test_foreign_or_cut_weights_are_one_clear_error(tmp_path):
    for folder in _damaged_folders(tmp_path):
        with pytest.raises(ShapekilnError, match="cannot load the VQVAE weights"):
            load_pretrained(VQVAE, folder)
        result = subprocess.run([sys.executable, "-m", "shapekiln.cli", "encode", "--data", str(tmp_path), "--vqvae", str(folder),
                                 "--out", str(tmp_path / "latents")], capture_output=True, text=True)
        assert result.returncode == 2, result.stderr
        assert "cannot load the VQVAE weights" in result.stderr and "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
