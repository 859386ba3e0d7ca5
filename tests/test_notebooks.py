"""The committed notebooks are clean: model cells without outputs, counts in order, no stray metadata."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def test_the_series_is_there():
    names = [p.name for p in NOTEBOOKS]
    assert names == ["00_architecture.ipynb", "01_captioning.ipynb", "02_receipt_to_json.ipynb", "03_calculator.ipynb",
                     "04_latex.ipynb", "05_watch_faces.ipynb", "06_visual_reasoning.ipynb"]


def test_notebooks_are_clean():
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "nbtool.py"), "check", *map(str, NOTEBOOKS)],
                            capture_output=True, text=True)
    assert result.returncode == 0, f"run `make notebooks-clean`:\n{result.stdout}"


def test_the_checker_catches_a_dirty_notebook(tmp_path):
    nb = json.loads(NOTEBOOKS[1].read_text())
    model_cell = next(c for c in nb["cells"] if "NBVAL_IGNORE_OUTPUT" in "".join(c["source"]))
    model_cell["outputs"] = [{"output_type": "stream", "name": "stdout", "text": ["noise"]}]
    nb["metadata"]["widgets"] = {}
    dirty = tmp_path / "dirty.ipynb"
    dirty.write_text(json.dumps(nb))
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "nbtool.py"), "check", str(dirty)],
                            capture_output=True, text=True)
    assert result.returncode == 1
    assert "model cell committed with outputs" in result.stdout and "metadata" in result.stdout


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_opens_the_same_way_and_stays_offline(path):
    nb = json.loads(path.read_text())
    first = "".join(nb["cells"][0]["source"])
    assert first.startswith("# ") and "**Goal:**" in first and "**What you will learn**" in first
    code = "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code")
    assert "http://" not in code and "https://" not in code
    assert "sys.path" not in code
    if path.name != "00_architecture.ipynb":
        setup = next(c for c in nb["cells"] if c["cell_type"] == "code")
        assert "vlm = load_model()" in "".join(setup["source"])
    last = "".join(nb["cells"][-1]["source"])
    assert "## Summary" in last
