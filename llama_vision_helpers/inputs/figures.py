"""Equations, charts, a scene of shapes and an infographic, drawn with matplotlib and PIL."""

from __future__ import annotations

import numpy as np
from PIL import Image

from .drawing import add_noise, canvas, figure_png, finish, png_to_image


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), facecolor="white")


def equation(mathtext: str, *, fontsize: int = 30) -> bytes:
    """A formula typeset by matplotlib's mathtext in Computer Modern, at print resolution (200 dpi)."""
    import matplotlib

    with matplotlib.rc_context({"mathtext.fontset": "cm"}):
        fig = _figure(8, 1.6)
        fig.text(0.5, 0.5, f"${mathtext}$", fontsize=fontsize, ha="center", va="center")
        return figure_png(fig, dpi=200, crop=True)


def shapes_scene(counts: dict[str, int], *, seed: int, size=(640, 480)) -> Image.Image:
    """Red circles, blue squares and green triangles scattered without overlapping."""
    rng = np.random.default_rng(seed)
    image, draw = canvas(*size, (246, 244, 238))
    s = 2
    placed: list[tuple[float, float]] = []
    colors = {"red circle": (214, 48, 49), "blue square": (9, 99, 186), "green triangle": (39, 160, 72)}
    for kind, count in counts.items():
        for _ in range(count):
            while True:
                x, y = rng.uniform(60, size[0] - 60), rng.uniform(60, size[1] - 60)
                if all((x - px) ** 2 + (y - py) ** 2 > 95 ** 2 for px, py in placed):
                    break
            placed.append((x, y))
            r = rng.uniform(26, 36) * s
            cx, cy = x * s, y * s
            if kind == "red circle":
                draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colors[kind])
            elif kind == "blue square":
                draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=colors[kind])
            else:
                draw.polygon([(cx, cy - r), (cx + r, cy + 0.8 * r), (cx - r, cy + 0.8 * r)], fill=colors[kind])
    return add_noise(finish(image), seed, strength=2, blur=0.3)


def bar_chart(title: str, labels: list[str], values: list[float], *, ylabel: str, color: str) -> bytes:
    """A bar chart with the value written on each bar."""
    fig = _figure(7, 4.5)
    ax = fig.add_subplot()
    bars = ax.bar(labels, values, color=color, width=0.6)
    ax.bar_label(bars, padding=3, fontsize=11)
    ax.set_title(title, fontsize=15, pad=12)
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, max(values) * 1.15)
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    return figure_png(fig)


def line_chart(title: str, years: list[int], series: dict[str, list[float]], *, ylabel: str) -> bytes:
    """Lines with markers, one per series, and a legend."""
    fig = _figure(7.5, 4.5)
    ax = fig.add_subplot()
    for (name, values), color in zip(series.items(), ("#1f77b4", "#d62728")):
        ax.plot(years, values, marker="o", linewidth=2.5, color=color, label=name)
    ax.set_title(title, fontsize=15, pad=12)
    ax.set_ylabel(ylabel)
    ax.set_xticks(years)
    ax.grid(alpha=0.3)
    ax.legend(frameon=False)
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    return figure_png(fig)


def infographic(title: str, milestones: list[tuple[int, str]], facts: list[tuple[str, str]],
                capacity: dict[int, float]) -> bytes:
    """A poster: a timeline of milestones, three headline numbers and a small capacity chart."""
    fig = _figure(9, 7.5)
    fig.patch.set_facecolor("#fdf8ee")
    fig.text(0.5, 0.94, title, ha="center", fontsize=20, weight="bold", color="#7a4b00")
    timeline = fig.add_axes([0.05, 0.58, 0.9, 0.26])
    timeline.axis("off")
    years = [year for year, _ in milestones]
    timeline.plot([min(years) - 1, max(years) + 1], [0, 0], color="#b07a1a", linewidth=3)
    for i, (year, text) in enumerate(milestones):
        up = 1 if i % 2 == 0 else -1
        timeline.plot([year, year], [0, 0.45 * up], color="#b07a1a", linewidth=1.5)
        timeline.scatter([year], [0], s=120, color="#f0a500", zorder=3)
        timeline.text(year, 0.55 * up, f"{year}\n{text}", ha="center", va="bottom" if up > 0 else "top", fontsize=10)
    timeline.set_ylim(-1.3, 1.3)
    for i, (number, caption) in enumerate(facts):
        x = 0.17 + i * 0.33
        fig.text(x, 0.47, number, ha="center", fontsize=26, weight="bold", color="#d35400")
        fig.text(x, 0.42, caption, ha="center", fontsize=11, color="#444444")
    ax = fig.add_axes([0.12, 0.07, 0.8, 0.27])
    ax.set_facecolor("#fdf8ee")
    bars = ax.bar([str(y) for y in capacity], list(capacity.values()), color="#f0a500")
    ax.bar_label(bars, fmt="%g MW", fontsize=9)
    ax.set_title("Installed solar capacity (MW)", fontsize=11)
    ax.set_ylim(0, max(capacity.values()) * 1.25)
    ax.spines[["top", "right"]].set_visible(False)
    return figure_png(fig, dpi=110)


__all__ = ["bar_chart", "equation", "infographic", "line_chart", "png_to_image", "shapes_scene"]
