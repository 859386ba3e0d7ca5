"""Every notebook passes strict nbval with LLAMA_VISION_MODEL pointing at a server this test run starts."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
NBVAL = ["--nbval", "--nbval-current-env", "--nbval-sanitize-with", str(ROOT / "tests" / "sanitize.cfg")]


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.name)
def test_the_notebook_runs_against_a_server(server, notebook):
    env = {**os.environ, "LLAMA_VISION_MODEL": server.url, "LLAMA_VISION_TRIALS": "2", "HF_HUB_OFFLINE": "1"}
    before = server.health()["completed"]
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *NBVAL, str(notebook)],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    if notebook.name != "00_architecture.ipynb":  # 00 looks at the architecture and asks nothing
        assert server.health()["completed"] > before, "the notebook did not use the server"
