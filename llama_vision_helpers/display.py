"""Pictures for the notebooks: input images in a grid, and a predicted formula beside the true one."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from .images import ImageSource, load_image


def show_images(sources: Sequence[ImageSource], titles: Sequence[str] | None = None, *, columns: int = 4,
                width: float = 3.2) -> None:
    """Show images in a grid with titles (file names by default)."""
    import matplotlib.pyplot as plt

    rows = -(-len(sources) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(columns * width, rows * width), squeeze=False)
    titles = list(titles) if titles is not None else [Path(str(s)).name for s in sources]
    for ax in axes.flat:
        ax.axis("off")
    for ax, source, title in zip(axes.flat, sources, titles):
        ax.imshow(load_image(source))
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    plt.show()


def show_latex_pair(predicted: str | None, truth: str, ax=None, title: str = ""):
    """Typeset the model's formula above the true one; an unparseable or unrenderable one is said so."""
    import matplotlib.pyplot as plt

    from .scoring import latex_renders, to_mathtext

    ax = ax or plt.subplots(figsize=(8, 1.6))[1]
    ax.axis("off")
    ax.set_title(title, fontsize=10, loc="left")
    readable = isinstance(predicted, str) and predicted and latex_renders(predicted)
    shown = f"${to_mathtext(predicted)}$" if readable else "(no formula that renders)"
    ax.text(0.0, 0.7, "model:", fontsize=10, color="#555555", va="center")
    ax.text(0.12, 0.7, shown, fontsize=15, va="center")
    truth_shown = f"${to_mathtext(truth)}$" if latex_renders(truth) else truth
    ax.text(0.0, 0.2, "truth:", fontsize=10, color="#555555", va="center")
    ax.text(0.12, 0.2, truth_shown, fontsize=15 if truth_shown.startswith("$") else 9, va="center")
    return ax
