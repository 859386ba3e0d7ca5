"""Turn any image source (path, URL, bytes, PIL image) into a validated RGB PIL image."""

from __future__ import annotations

import http.client
import io
import os
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from pathlib import Path
from typing import Union

from PIL import Image, ImageOps, UnidentifiedImageError

ImageSource = Union[str, os.PathLike, bytes, bytearray, Image.Image]
URL_TIMEOUT_S = 20  # for the whole download, not for each read
MAX_URL_BYTES = 50 * 1024 * 1024  # far above any photo the model needs; a URL cannot fill the memory
_CHUNK = 64 * 1024


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
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        image = _greyscale_to_8_bits(image)
    return image if image.mode == "RGB" else image.convert("RGB")


def _greyscale_to_8_bits(image: Image.Image) -> Image.Image:
    """16/32-bit integer or 32-bit float greyscale to 8 bits, instead of PIL's clipping (white, or black).

    Integers are scaled by their maximum. Floats within [0, 1] are intensities; other floats are stretched
    from their minimum to their maximum. Missing values (NaN, infinities) become black.
    """
    import numpy as np

    values = np.asarray(image, dtype=np.float64)
    finite = np.isfinite(values)
    values = np.where(finite, values, 0.0)
    if image.mode == "F":
        low, high = (values[finite].min(), values[finite].max()) if finite.any() else (0.0, 1.0)
        if low < 0 or high > 1:
            values = (values - low) / ((high - low) or 1.0)
    else:
        values = values / (values.max() or 1.0)
    return Image.fromarray((np.clip(values, 0, 1) * 255).round().astype("uint8"), mode="L")


def _download(url: str, timeout: float, max_bytes: int, deadline: float = float("inf")) -> bytes:
    """The body at `url`, read in chunks; refuses one over `max_bytes`, shorter than announced, or still arriving
    at `deadline` (a `time.monotonic()` time)."""
    request = urllib.request.Request(url, headers={"User-Agent": "llama-vision-helpers"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            announced = response.headers.get("Content-Length")
            if announced is not None and announced.isdigit() and int(announced) > max_bytes:
                raise ImageLoadError(f"The image at {url} is {int(announced):,} bytes, over the limit of "
                                     f"{max_bytes:,}.")
            body = bytearray()
            while chunk := response.read1(_CHUNK):  # what has arrived, so the deadline is checked as it comes
                body += chunk
                if len(body) > max_bytes:
                    raise ImageLoadError(f"The image at {url} is over the limit of {max_bytes:,} bytes.")
                if time.monotonic() > deadline:
                    raise _too_slow(url, timeout)
    except http.client.IncompleteRead as err:
        raise ImageLoadError(f"The download of {url} was cut short ({len(err.partial):,} bytes arrived, "
                             "fewer than announced): try again.") from err
    except (urllib.error.URLError, http.client.HTTPException, OSError) as err:
        raise ImageLoadError(f"Could not download the image at {url}: {err}") from err
    if announced is not None and announced.isdigit() and len(body) < int(announced):
        raise ImageLoadError(f"The download of {url} was cut short ({len(body):,} of {int(announced):,} bytes): "
                             "try again.")
    return bytes(body)


def _too_slow(url: str, timeout: float) -> ImageLoadError:
    return ImageLoadError(f"Could not download the image at {url} within {timeout:g} s.")


def _read_url(url: str, timeout: float, max_bytes: int = MAX_URL_BYTES) -> bytes:
    """Download `url` within `timeout` seconds in all (a slow server cannot stretch it read by read)."""
    outcome: dict[str, object] = {}
    deadline = time.monotonic() + timeout

    def work() -> None:
        try:
            outcome["body"] = _download(url, timeout, max_bytes, deadline)
        except BaseException as err:  # handed to the caller below
            outcome["error"] = err

    worker = threading.Thread(target=work, daemon=True)  # past the deadline it stops at its next read
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        raise _too_slow(url, timeout)
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["body"]  # type: ignore[return-value]


def _file_url_path(url: str) -> Path:
    """The local path of a file:// URL (on this machine only)."""
    parts = urllib.parse.urlparse(url)
    if parts.netloc not in ("", "localhost"):
        raise ImageLoadError(f"{url} names a file on another machine ({parts.netloc}); copy it here first.")
    return Path(urllib.request.url2pathname(parts.path))


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
    except UnidentifiedImageError as err:  # (its message names PIL's in-memory file object, which says nothing)
        raise ImageLoadError(f"{name} is not an image PIL can read: not a known image format, or not an image "
                             "at all.") from err
    except (OSError, SyntaxError) as err:
        raise ImageLoadError(f"{name} is not an image PIL can read ({err}).") from err
    return image


def load_image(source: ImageSource, *, timeout: float = URL_TIMEOUT_S, max_bytes: int = MAX_URL_BYTES) -> Image.Image:
    """Load an image from a path, a file:// or http(s) URL, bytes or a PIL image, as RGB.

    A download must finish within `timeout` seconds and hold at most `max_bytes`. Raises `ImageLoadError`,
    naming the source, for a missing or empty file, a non-image, a failed, cut-short, too slow or too large
    download, or a decompression bomb.
    """
    name = describe_source(source)
    if isinstance(source, Image.Image):
        return to_rgb(source)
    if isinstance(source, (bytes, bytearray)):
        return to_rgb(_open_bytes(bytes(source), name))
    if isinstance(source, (str, os.PathLike)):
        text = str(source)
        if text.startswith(("http://", "https://")):
            return to_rgb(_open_bytes(_read_url(text, timeout, max_bytes), text))
        path = _file_url_path(text) if text.startswith("file:") else Path(text).expanduser()
        if not path.exists():
            raise ImageLoadError(f"No such image file: {path}")
        if path.is_dir():
            raise ImageLoadError(f"{path} is a folder, not an image file.")
        return to_rgb(_open_bytes(path.read_bytes(), str(path)))
    raise ImageLoadError(
        f"Cannot load an image from a {type(source).__name__}: pass a path, a file:// or http(s) URL, bytes or a "
        "PIL image."
    )
