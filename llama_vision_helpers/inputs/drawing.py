"""Shared drawing helpers: fonts shipped with matplotlib, supersampled canvases, paper effects, PNG bytes."""

from __future__ import annotations

import io
import math
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

SUPERSAMPLE = 2  # draw at twice the size and shrink: smooth edges without a vector renderer


@lru_cache(maxsize=None)
def font(name: str, size: int) -> ImageFont.FreeTypeFont:
    """A DejaVu font from matplotlib's own data folder (so every machine draws the same glyphs)."""
    import matplotlib

    path = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / f"{name}.ttf"
    return ImageFont.truetype(str(path), size)


def canvas(width: int, height: int, color) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    image = Image.new("RGB", (width * SUPERSAMPLE, height * SUPERSAMPLE), color)
    return image, ImageDraw.Draw(image)


def finish(image: Image.Image) -> Image.Image:
    """Shrink a supersampled canvas to its final size."""
    return image.resize((image.width // SUPERSAMPLE, image.height // SUPERSAMPLE), Image.LANCZOS)


def polar(cx: float, cy: float, radius: float, degrees_from_twelve: float) -> tuple[float, float]:
    """A point on a dial: angle measured clockwise from 12 o'clock."""
    theta = math.radians(degrees_from_twelve)
    return cx + radius * math.sin(theta), cy - radius * math.cos(theta)


def add_noise(image: Image.Image, seed: int, strength: float = 6.0, blur: float = 0.4) -> Image.Image:
    """Sensor noise and a little softness, seeded, so a drawing looks photographed."""
    rng = np.random.default_rng(seed)
    pixels = np.asarray(image, dtype=np.float32)
    pixels = pixels + rng.normal(0, strength, pixels.shape[:2])[..., None]
    noisy = Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8))
    return noisy.filter(ImageFilter.GaussianBlur(blur)) if blur else noisy


def on_table(paper: Image.Image, angle: float, margin: int, table=(112, 98, 84)) -> Image.Image:
    """Lay a document on a darker surface, slightly rotated, with a soft shadow."""
    width, height = paper.width + 2 * margin, paper.height + 2 * margin
    background = Image.new("RGB", (width, height), table)
    shadow = Image.new("L", (width, height), 0)
    ImageDraw.Draw(shadow).rectangle([margin + 6, margin + 8, margin + paper.width + 6, margin + paper.height + 8], fill=110)
    background.paste((60, 52, 44), mask=shadow.filter(ImageFilter.GaussianBlur(8)))
    background.paste(paper, (margin, margin))
    return background.rotate(angle, resample=Image.BICUBIC, fillcolor=table)


def figure_png(fig, dpi: int = 150, crop: bool = False) -> bytes:
    """PNG bytes of a matplotlib figure, with no version stamp so the bytes do not change between runs.

    `crop` trims the figure to what is drawn, with a small margin."""
    buffer = io.BytesIO()
    extra = {"bbox_inches": "tight", "pad_inches": 0.3} if crop else {}
    fig.savefig(buffer, format="png", dpi=dpi, facecolor=fig.get_facecolor(), metadata={"Software": None}, **extra)
    return buffer.getvalue()


def png_to_image(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")
