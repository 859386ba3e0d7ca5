"""Pictures for the notebooks: input images in a grid, a predicted formula beside the true one, and a text
summary of a figure that nbval can compare (it compares text, not pictures)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from .images import ImageSource, load_image


def show_images(sources: Sequence[ImageSource], titles: Sequence[str] | None = None, *, columns: int = 4,
                width: float = 3.2):
    """Show images in a grid with titles (file names by default); return the figure."""
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
    return fig


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


SUMMARY_DPI = 40  # low and fixed, so the summary does not depend on the screen's or the backend's resolution


def figure_summary(fig) -> str:
    """What a figure shows, in a few lines of text that stay the same from run to run on one machine.

    One line per picture panel (title, shape and mean value of the pixels shown) and one for the whole figure
    drawn at a fixed resolution (size, and the share of pixels that are not white background). A notebook
    prints it under a deterministic figure so that a blank, black or different picture fails the check.
    """
    import io

    import numpy as np

    lines = []
    for ax in fig.axes:
        for image in ax.get_images():
            pixels = np.asarray(image.get_array(), dtype=float)
            lines.append(f"{ax.get_title() or '(untitled)'}: {'x'.join(map(str, pixels.shape))} "
                         f"mean {pixels.mean():.1f}")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="rgba", dpi=SUMMARY_DPI)
    width, height = (round(v * SUMMARY_DPI) for v in fig.get_size_inches())
    drawn = np.frombuffer(buffer.getvalue(), dtype=np.uint8).reshape(height, width, 4)[..., :3]
    ink = float((drawn.min(axis=-1) < 250).mean())
    lines.append(f"figure {width}x{height} px at {SUMMARY_DPI} dpi, {ink:.0%} not background")
    return "\n".join(lines)


def print_published(answer, width: int = 110) -> None:
    """Print a real answer from a published run (a `PublishedAnswer` or its id) with its source, picture and
    prompt, then what our parser reads in it and our verdict beside a person's grade."""
    import textwrap

    from .published import grade_published, published_answer

    answer = published_answer(answer) if isinstance(answer, str) else answer
    graded = grade_published(answer)
    print(f"source:  {answer.citation}")
    print(f"picture: {answer.picture}")
    print(f"prompt:  {answer.prompt}")
    print("answer (verbatim, lines wrapped to fit):")
    for line in answer.answer.split("\n"):
        print(textwrap.fill(line, width, initial_indent="    ", subsequent_indent="    ") if line else "")
    print(f"our parser reads: {graded.read_as}")
    print(f"our verdict: {graded.verdict}; a person's grade: {answer.grade} ({answer.grade_reason})")
