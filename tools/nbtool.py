"""Keep the notebooks clean: `check` reports problems, `clean` fixes them, `run` executes and cleans.

Rules: model cells (marked NBVAL_IGNORE_OUTPUT) have no outputs and no execution count; other code cells
are numbered 1, 2, 3... in order; notebook metadata holds only the kernel and language; cells carry no
metadata. Usage: python tools/nbtool.py check|clean|run notebooks/*.ipynb
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

IGNORE_MARK = "NBVAL_IGNORE_OUTPUT"
NOTEBOOK_METADATA = {
    "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
    "language_info": {"name": "python"},
}


def is_model_cell(cell: dict) -> bool:
    return cell["cell_type"] == "code" and IGNORE_MARK in "".join(cell["source"])


def problems(nb: dict) -> list[str]:
    """What breaks the rules, one line each."""
    found = []
    if nb.get("metadata") != NOTEBOOK_METADATA:
        found.append("notebook metadata beyond the kernel and language")
    expected = 1
    for index, cell in enumerate(nb["cells"]):
        if cell.get("metadata"):
            found.append(f"cell {index}: metadata {sorted(cell['metadata'])}")
        if cell["cell_type"] != "code":
            continue
        if is_model_cell(cell):
            if cell.get("outputs"):
                found.append(f"cell {index}: model cell committed with outputs")
            if cell.get("execution_count") is not None:
                found.append(f"cell {index}: model cell with an execution count")
        else:
            if cell.get("execution_count") != expected:
                found.append(f"cell {index}: execution count {cell.get('execution_count')}, expected {expected}")
            expected += 1
    return found


def clean(nb: dict) -> dict:
    """Apply the rules."""
    nb["metadata"] = dict(NOTEBOOK_METADATA)
    count = 1
    for cell in nb["cells"]:
        cell["metadata"] = {}
        cell.pop("id", None)
        if cell["cell_type"] != "code":
            cell.pop("outputs", None)
            cell.pop("execution_count", None)
            continue
        if is_model_cell(cell):
            cell["outputs"], cell["execution_count"] = [], None
            continue
        cell["execution_count"] = count
        for output in cell.get("outputs", []):
            if "execution_count" in output:
                output["execution_count"] = count
            output.get("metadata", {}).clear() if output.get("output_type") != "stream" else None
        count += 1
    nb["nbformat"], nb["nbformat_minor"] = 4, 4
    return nb


def write(path: Path, nb: dict) -> None:
    path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")


def run(path: Path) -> None:
    """Execute the notebook top to bottom in this environment (tiny-random unless told otherwise)."""
    import nbformat
    from nbclient import NotebookClient

    os.environ.setdefault("LLAMA_VISION_MODEL", "tiny-random")
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    write(path, clean(json.loads(nbformat.writes(nb))))


def main(argv: list[str]) -> int:
    command, paths = argv[0], [Path(p) for p in argv[1:]]
    failed = False
    for path in paths:
        if command == "run":
            run(path)
            print(f"ran {path}")
        elif command == "clean":
            write(path, clean(json.loads(path.read_text())))
        elif command == "check":
            for problem in problems(json.loads(path.read_text())):
                print(f"{path}: {problem}")
                failed = True
        else:
            print(__doc__)
            return 2
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
