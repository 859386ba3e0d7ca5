"""Turn any image source (path, URL, bytes, PIL image) into a validated RGB PIL image."""

from __future__ import annotations

import io
import os
import urllib.error
import urllib.request
import warnings
from pathlib import Path
from typing import Union

from PIL import Image, ImageOps, UnidentifiedImageError

ImageSource = Union[str, os.PathLike, bytes, bytearray, Image.Image]
URL_TIMEOUT_S = 20


class ImageLoadError(ValueError):
    """The image could not be loaded; the message names the source."""


def describe_source(source: ImageSource) -> str:
    """A short human name for an image source, for messages."""
    if isinstance(source, (bytes, bytearray)):
        return f"<{len(source)} bytes>"
    if isinstance(source, Image.Image):
        return f"<PIL image {source.mode} {source.size[0]}x{source.size[1]}>"
    return str(source)


def to_rgb(image: Image.Image) -> Image.Image:
    """Apply EXIF orientation, flatten transparency on white and convert any mode to RGB."""
    image = ImageOps.exif_transpose(image)
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit greyscale: scale to 8 bits instead of clipping everything above 255 to white.
        import numpy as np

        values = np.asarray(image, dtype=np.float64)
        top = values.max() or 1.0
        image = Image.fromarray((values / top * 255).round().astype("uint8"), mode="L")
    return image if image.mode == "RGB" else image.convert("RGB")


def _read_url(url: str, timeout: float) -> bytes:
    request = urllib.request.Request(url, headers={"User-Agent": "llama-vision-helpers"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.read()
    except (urllib.error.URLError, TimeoutError, OSError) as err:
        raise ImageLoadError(f"Could not download the image at {url} within {timeout:g} s: {err}") from err


def _open_bytes(data: bytes, name: str) -> Image.Image:
    if not data:
        raise ImageLoadError(f"{name} is empty: there is no image in it.")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageLoadError(f"{name} is too large to decode safely ({err}).") from err
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise ImageLoadError(f"{name} is not an image PIL can read ({err}).") from err
    return image


def load_image(source: ImageSource, *, timeout: float = URL_TIMEOUT_S) -> Image.Image:
    """Load an image from a path, an http(s) URL, bytes or a PIL image, as RGB.

    Raises `ImageLoadError`, naming the source, for a missing or empty file, a non-image, a failed
    download or a decompression bomb.
    """
    name = describe_source(source)
    if isinstance(source, Image.Image):
        return to_rgb(source)
    if isinstance(source, (bytes, bytearray)):
        return to_rgb(_open_bytes(bytes(source), name))
    if isinstance(source, (str, os.PathLike)):
        text = str(source)
        if text.startswith(("http://", "https://")):
            return to_rgb(_open_bytes(_read_url(text, timeout), text))
        path = Path(text).expanduser()
        if not path.exists():
            raise ImageLoadError(f"No such image file: {path}")
        if path.is_dir():
            raise ImageLoadError(f"{path} is a folder, not an image file.")
        return to_rgb(_open_bytes(path.read_bytes(), str(path)))
    raise ImageLoadError(
        f"Cannot load an image from a {type(source).__name__}: pass a path, an http(s) URL, bytes or a PIL image."
    )
