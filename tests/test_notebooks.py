"""The committed notebooks are clean: model cells without outputs, counts in order, no stray metadata; each ends
with exercises whose worked solutions are notebooks too."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
SOLUTIONS = sorted((ROOT / "notebooks" / "solutions").glob("*.ipynb"))


def test_the_series_is_there():
    names = [p.name for p in NOTEBOOKS]
    assert names == ["00_architecture.ipynb", "01_captioning.ipynb", "02_receipt_to_json.ipynb", "03_calculator.ipynb",
                     "04_latex.ipynb", "05_watch_faces.ipynb", "06_visual_reasoning.ipynb"]


def test_notebooks_are_clean():
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "nbtool.py"), "check", *map(str, NOTEBOOKS + SOLUTIONS)],
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


def _text(cell: dict) -> str:
    return "".join(cell["source"])


def _offline(nb: dict) -> None:
    code = "\n".join(_text(c) for c in nb["cells"] if c["cell_type"] == "code")
    assert "http://" not in code and "https://" not in code
    assert "sys.path" not in code


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_opens_the_same_way_and_stays_offline(path):
    nb = json.loads(path.read_text())
    first = _text(nb["cells"][0])
    assert first.startswith("# ") and "**Goal:**" in first and "**What you will learn**" in first
    _offline(nb)
    if path.name != "00_architecture.ipynb":
        setup = next(c for c in nb["cells"] if c["cell_type"] == "code")
        assert "vlm = load_model()" in _text(setup)
    assert any("## Summary" in _text(c).splitlines() for c in nb["cells"] if c["cell_type"] == "markdown")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_ends_with_exercises_and_their_solutions_exist(path):
    last = _text(json.loads(path.read_text())["cells"][-1])
    assert last.startswith("## Exercises")
    exercises = [line for line in last.splitlines() if line[:2] in {f"{n}." for n in range(1, 10)}]
    assert 2 <= len(exercises) <= 3, exercises
    assert f"(solutions/{path.name})" in last
    assert (ROOT / "notebooks" / "solutions" / path.name).is_file()


@pytest.mark.parametrize("path", SOLUTIONS, ids=lambda p: p.name)
def test_solutions_answer_one_notebook_each_and_stay_offline(path):
    nb = json.loads(path.read_text())
    first = _text(nb["cells"][0])
    assert first.startswith(f"# Solutions · {path.name[:2]} ") and f"(../{path.name})" in first
    assert (ROOT / "notebooks" / path.name).is_file()
    _offline(nb)
    headings = [_text(c).split("\n")[0] for c in nb["cells"] if _text(c).startswith("## ")]
    assert headings and all(h[3].isdigit() for h in headings), headings
