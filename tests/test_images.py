import io

import pytest
from PIL import Image

from llama_vision_helpers import ImageLoadError, load_image


def encode(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def test_path_bytes_and_pil_give_the_same_rgb_image(tmp_path):
    original = Image.new("RGB", (30, 20), (10, 200, 30))
    path = tmp_path / "a.png"
    original.save(path)
    for source in (path, str(path), path.read_bytes(), original):
        image = load_image(source)
        assert image.mode == "RGB" and image.size == (30, 20)
        assert image.getpixel((5, 5)) == (10, 200, 30)


def test_exif_orientation_is_applied():
    image = Image.new("RGB", (40, 10), "red")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    loaded = load_image(encode(image, "JPEG", exif=exif))
    assert loaded.size == (10, 40)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "PA"])
def test_transparency_is_flattened_on_white(mode):
    image = Image.new("RGBA", (8, 8), (0, 0, 0, 0)).convert(mode) if mode != "PA" else None
    if image is None:
        image = Image.new("P", (8, 8), 0)
        image.putpalette([0, 0, 0] * 256)
        image.info["transparency"] = 0
    assert load_image(image).getpixel((1, 1)) == (255, 255, 255)


def test_palette_greyscale_cmyk_and_16_bit_become_rgb():
    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    assert load_image(palette).getpixel((0, 0)) == (255, 0, 0)
    assert load_image(Image.new("L", (4, 4), 128)).getpixel((0, 0)) == (128, 128, 128)
    assert load_image(Image.new("CMYK", (4, 4), (0, 0, 0, 0))).getpixel((0, 0)) == (255, 255, 255)
    deep = Image.new("I;16", (4, 4), 0)
    deep.putpixel((0, 0), 65535)
    rgb = load_image(deep)
    assert rgb.mode == "RGB" and rgb.getpixel((0, 0)) == (255, 255, 255) and rgb.getpixel((1, 1)) == (0, 0, 0)


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(ImageLoadError, match="no-such.png"):
        load_image(tmp_path / "no-such.png")


def test_empty_file_is_rejected(tmp_path):
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    with pytest.raises(ImageLoadError, match="empty"):
        load_image(empty)


def test_non_image_is_rejected(tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("this is not a picture")
    with pytest.raises(ImageLoadError, match="notes.png"):
        load_image(text)
    with pytest.raises(ImageLoadError, match="folder"):
        load_image(tmp_path)
    with pytest.raises(ImageLoadError, match="int"):
        load_image(42)


def test_decompression_bomb_is_rejected(monkeypatch):
    data = encode(Image.new("RGB", (200, 200)))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ImageLoadError, match="too large"):
        load_image(data)


def test_unreachable_url_gives_a_clear_error():
    # Port 9 (discard) on loopback has no listener: the connection is refused at once.
    with pytest.raises(ImageLoadError, match="127.0.0.1"):
        load_image("http://127.0.0.1:9/cat.jpg", timeout=2)
