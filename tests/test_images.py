import http.server
import io
import threading
import time

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


class ImageServer(http.server.BaseHTTPRequestHandler):
    """A local web server with the ways a download goes wrong; it listens on 127.0.0.1 only."""

    body = b""
    client_left_slow_download = threading.Event()

    def do_GET(self):
        if self.path == "/ok.png":
            self._send(self.body, len(self.body))
        elif self.path == "/truncated.png":
            self._send(self.body[: len(self.body) // 2], len(self.body))  # announces more than it sends
        elif self.path == "/big.png":
            self._send(self.body, len(self.body))
        elif self.path == "/big-unannounced.png":
            self._send(self.body, None)
        elif self.path == "/slow.png":  # every read is quick, the whole takes 30 s
            self.send_response(200)
            self.send_header("Content-Length", str(len(self.body)))
            self.end_headers()
            for start in range(0, 60):
                try:
                    self.wfile.write(self.body[start: start + 1])
                    self.wfile.flush()
                except OSError:
                    type(self).client_left_slow_download.set()
                    return
                time.sleep(0.5)

    def _send(self, data, length):
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        if length is not None:
            self.send_header("Content-Length", str(length))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)
        self.wfile.flush()

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def web():
    ImageServer.body = encode(Image.effect_noise((120, 120), 60).convert("RGB"))
    ImageServer.client_left_slow_download.clear()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), ImageServer)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_a_url_gives_the_image(web):
    assert load_image(f"{web}/ok.png").size == (120, 120)


def test_a_file_url_is_a_local_path(tmp_path):
    path = tmp_path / "a folder" / "photo.png"
    path.parent.mkdir()
    Image.new("RGB", (7, 5), (1, 2, 3)).save(path)
    image = load_image(path.as_uri())
    assert image.size == (7, 5) and image.getpixel((0, 0)) == (1, 2, 3)
    with pytest.raises(ImageLoadError, match="No such image file"):
        load_image((tmp_path / "missing.png").as_uri())


def test_a_truncated_download_is_reported_as_cut_short(web):
    with pytest.raises(ImageLoadError, match="cut short"):
        load_image(f"{web}/truncated.png")


def test_a_slow_server_cannot_stretch_the_deadline(web):
    start = time.monotonic()
    with pytest.raises(ImageLoadError, match="within 1 s"):
        load_image(f"{web}/slow.png", timeout=1)
    assert time.monotonic() - start < 15  # each read is quick: a per-read timeout would wait the full 30 s
    # and the download itself stops (it does not go on reading in the background for the remaining 29 s)
    assert ImageServer.client_left_slow_download.wait(5)


@pytest.mark.parametrize("name", ["big.png", "big-unannounced.png"])
def test_a_download_over_the_size_limit_is_refused(web, name):
    with pytest.raises(ImageLoadError, match="over the limit of 1,000"):
        load_image(f"{web}/{name}", max_bytes=1000)


def test_a_32_bit_float_tiff_is_scaled_not_black(tmp_path):
    import numpy as np

    ramp = np.tile(np.linspace(0.0, 1.0, 64, dtype=np.float32), (8, 1))
    path = tmp_path / "ramp.tiff"
    Image.fromarray(ramp, mode="F").save(path)
    image = load_image(path)
    row = [image.getpixel((x, 4))[0] for x in range(64)]
    assert row[0] == 0 and row[-1] == 255 and row == sorted(row) and len(set(row)) > 32
    wide = Image.fromarray(ramp * 4000 - 1000, mode="F")  # not intensities: stretched end to end
    stretched = [load_image(wide).getpixel((x, 4))[0] for x in (0, 63)]
    assert stretched == [0, 255]
