"""objaverse is an extra: shapekiln imports without it, and `prep objaverse` then says which extra to install."""

import subprocess
import sys

# Runs the CLI with the objaverse package hidden (an entry of None in sys.modules makes its import fail,
# as on an install without the extra).
HIDDEN = "import sys; sys.modules['objaverse'] = None; from shapekiln.cli import main; sys.exit(main(sys.argv[1:]))"


def test_without_the_extra_prep_objaverse_is_one_line_naming_it(tmp_path):
    result = subprocess.run([sys.executable, "-c", HIDDEN, "prep", "objaverse", "--cache-dir", str(tmp_path), "--out", str(tmp_path / "out")],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip() == 'shapekiln: error: the objaverse source needs the objaverse package, which is an extra: pip install -e ".[objaverse]"'
    assert not (tmp_path / "out").exists()


def test_without_the_extra_everything_else_imports_and_runs(tmp_path):
    code = HIDDEN.replace("from shapekiln.cli import main", "import shapekiln.cli, shapekiln.data_prep.sources.objaverse; from shapekiln.cli import main")
    result = subprocess.run([sys.executable, "-c", code, "prep", "synthetic", "--count", "2", "--config", "tiny", "--views", "0",
                             "--out", str(tmp_path / "out"), "--no-progress"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "2 shapes written" in result.stdout
