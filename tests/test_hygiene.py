"""The suite's own commands write only into the output folder they are given.

CI runs on a machine that is kept from one run to the next, so a command that leaves files in the
working directory, the home folder (caches), the temporary folder or the checkout fills it run by run.
Here every command runs with its working directory, HOME, XDG_CACHE_HOME and TMPDIR pointed at empty
folders of its own, and each of those must still be empty afterwards.
"""

import os
import subprocess
import sys
from pathlib import Path

from .conftest import REPO


def _files(root: Path) -> set[str]:
    """Every file below root, relative, ignoring bytecode caches (Python writes them beside the sources)."""
    return {
        str(path.relative_to(root)) for path in root.rglob("*")
        if path.is_file() and "__pycache__" not in path.parts and ".pytest_cache" not in path.parts
    }


def test_the_quickstart_prep_train_and_sample_leave_nothing_outside_their_output(tmp_path):
    cwd, home, temp, out = (tmp_path / name for name in ("cwd", "home", "tmp", "out"))
    for folder in (cwd, home, temp):
        folder.mkdir()
    env = {**os.environ, "HOME": str(home), "XDG_CACHE_HOME": str(home / ".cache"), "TMPDIR": str(temp),
           "PYTHONDONTWRITEBYTECODE": "1"}
    for name in ("HF_HOME", "TRANSFORMERS_CACHE", "SENTENCE_TRANSFORMERS_HOME", "TORCH_HOME", "MPLCONFIGDIR"):
        env.pop(name, None)
    checkout_before = _files(REPO)

    def run(*args):
        result = subprocess.run([sys.executable, "-m", "shapekiln.cli", *map(str, args)], cwd=cwd, env=env,
                                capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-2000:]

    quick = out / "qs"
    run("quickstart", "--config", "tiny", "--out", quick, "--count", 40, "--vqvae-steps", 4, "--ldm-steps", 4,
        "--samples", 1, "--no-progress")
    run("prep", "synthetic", "--config", "tiny", "--count", 8, "--out", out / "data", "--no-progress")
    run("train", "vqvae", "--config", "tiny", "--data", quick / "data", "--output-dir", out / "vqvae", "--max-steps", 2,
        "--no-progress")
    run("sample", "--ckpt", quick / "ldm" / "pipeline", "--text", "a tall lamp", "--n", 1, "--steps", 2,
        "--out", out / "samples", "--no-progress")

    assert (quick / "preview.png").is_file() and any((out / "samples").iterdir())
    leftovers = {name: sorted(_files(folder)) for name, folder in (("cwd", cwd), ("HOME", home), ("TMPDIR", temp))}
    assert leftovers == {"cwd": [], "HOME": [], "TMPDIR": []}
    assert sorted(_files(REPO) - checkout_before) == []
