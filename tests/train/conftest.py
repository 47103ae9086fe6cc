import pytest

from .test_train_vqvae import shapekiln


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """40 tiny synthetic shapes (16³ grids, views), prepared by the CLI once per test module."""
    out = tmp_path_factory.mktemp("tiny") / "data"
    shapekiln("prep", "synthetic", "--count", 40, "--config", "tiny", "--out", out, "--no-progress")
    return out
