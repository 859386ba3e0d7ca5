"""The OpenAI chat format on the wire: messages to and from the library's, images as data URLs, error bodies.

The server reads what clients send with `from_openai_messages` and `decode_image_url`; the remote backend writes
requests with `to_openai_messages`. The conversation rules themselves are `generation.check_conversation`.
"""

from __future__ import annotations

import base64
import binascii
import io
from dataclasses import dataclass
from typing import Any

from PIL import Image

from .generation import ChatError
from .images import ImageLoadError, load_image


DEFAULT_PORT = 8000
# A server bound to one of these is for this machine alone; these are also the only names it answers to, so that a
# web page elsewhere that points its own name at 127.0.0.1 (DNS rebinding) can neither use it nor read its answers.
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
API_KEY_ENV = "LLAMA_VISION_API_KEY"  # the server's key, and what a client sends
MAX_BODY_MB = 20
MAX_IMAGE_PIXELS = 40_000_000


def url_host(host: str) -> str:
    """A host as it is written in a URL and in a Host header: an IPv6 address in brackets."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


@dataclass(frozen=True)
class Limits:
    """What one request may ask of the server."""

    max_body_bytes: int = MAX_BODY_MB * 1024 * 1024
    max_image_pixels: int = MAX_IMAGE_PIXELS
    max_n: int = 16


@dataclass
class WireError(ValueError):
    """A request the server refuses: HTTP status and the fields of an OpenAI error body."""

    message: str
    status: int = 400
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None

    def __str__(self) -> str:
        return self.message

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    """An error as OpenAI's API (and vLLM's, and Ollama's) returns it."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def image_data_url(image: Image.Image) -> str:
    """A PNG data URL: lossless, so a server sees exactly the pixels the library would use locally."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def to_openai_messages(messages: list[dict], image: Image.Image | None) -> list[dict]:
    """The library's messages (an `{"type": "image"}` placeholder in the first user turn) in OpenAI's format."""
    converted = []
    for message in messages:
        content = message["content"]
        if not isinstance(content, str):
            parts = []
            for part in content:
                if part.get("type") == "image":
                    if image is None:
                        raise ChatError("The conversation shows an image but none was given.")
                    parts.append({"type": "image_url", "image_url": {"url": image_data_url(image)}})
                else:
                    parts.append({"type": "text", "text": part.get("text", "")})
            # servers that take only strings for assistant turns (and all of them do for text) get one
            content = parts if any(p["type"] == "image_url" for p in parts) else "".join(p["text"] for p in parts)
        converted.append({"role": message["role"], "content": content})
    return converted


def from_openai_messages(messages: Any) -> tuple[list[dict], list[str]]:
    """OpenAI messages as the library's (images become placeholders), and the image URLs in order.

    Raises WireError for a shape the API does not allow; the conversation rules are checked afterwards.
    """
    if not isinstance(messages, list):
        raise WireError("`messages` must be a list of {role, content} objects.", param="messages")
    converted: list[dict] = []
    urls: list[str] = []
    for number, message in enumerate(messages):
        where = f"messages[{number}]"
        if not isinstance(message, dict) or "role" not in message:
            raise WireError(f"{where} must be an object with a role and content.", param=where)
        content = message.get("content")
        if content is None:
            content = ""
        if isinstance(content, str):
            converted.append({"role": message["role"], "content": content if message["role"] == "system" else
                              [{"type": "text", "text": content}]})
            continue
        if not isinstance(content, list):
            raise WireError(f"{where}.content must be a string or a list of parts.", param=where)
        parts = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                text = part.get("text")
                if not isinstance(text, str):
                    raise WireError(f"{where} has a text part whose text is not a string.", param=where)
                parts.append({"type": "text", "text": text})
            elif kind == "image_url":
                url = part.get("image_url")
                url = url.get("url") if isinstance(url, dict) else url
                if not isinstance(url, str) or not url:
                    raise WireError(f"{where} has an image_url part without a url.", param=where)
                urls.append(url)
                parts.append({"type": "image"})
            else:
                raise WireError(f"{where} has a part of type {kind!r}; this server takes text and image_url parts.",
                                param=where)
        # the image placeholder goes first, as the model was trained
        parts.sort(key=lambda part: part["type"] != "image")
        if message["role"] == "system":
            converted.append({"role": "system", "content": "".join(p.get("text", "") for p in parts)})
        else:
            converted.append({"role": message["role"], "content": parts})
    return converted, urls


def decode_image_url(url: str, *, allow_http: bool, max_pixels: int) -> Image.Image:
    """The image behind a data: URL (or an http(s) URL when allowed); never a file."""
    if url.startswith("data:"):
        header, _, payload = url.partition(",")
        if ";base64" not in header or not payload:
            raise WireError("An image data URL must be base64: data:image/png;base64,....", param="messages",
                            code="invalid_image")
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as err:
            raise WireError(f"The image data URL is not valid base64 ({err}).", param="messages",
                            code="invalid_image") from err
        source: Any = data
    elif url.startswith(("http://", "https://")):
        if not allow_http:
            raise WireError("This server does not fetch images from the web: send the image itself as a base64 "
                            "data URL (data:image/jpeg;base64,...), or start the server with --allow-image-urls.",
                            param="messages", code="image_url_not_allowed")
        source = url
    else:
        scheme = url.split(":", 1)[0] if ":" in url else url[:20]
        raise WireError(f"Image URLs of the form {scheme!r} are not accepted: send a base64 data URL.",
                        param="messages", code="image_url_not_allowed")
    if isinstance(source, bytes):
        _check_pixels(_header_size(source), max_pixels)  # before decoding it
    try:
        image = load_image(source)
    except ImageLoadError as err:
        raise WireError(f"The image could not be read: {err}", param="messages", code="invalid_image") from err
    _check_pixels(image.size, max_pixels)
    return image


def _header_size(data: bytes) -> tuple[int, int]:
    """Width and height from the image header alone (0, 0 if PIL cannot tell; decoding then reports why)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.size
    except Exception:  # noqa: BLE001  (load_image gives the real error next)
        return 0, 0


def _check_pixels(size: tuple[int, int], max_pixels: int) -> None:
    width, height = size
    if width * height > max_pixels:
        raise WireError(f"The image is {width}x{height} pixels; this server takes at most {max_pixels:,}. Send a "
                        "smaller image (the model sees at most four 560x560 tiles anyway).", param="messages",
                        code="image_too_large")
