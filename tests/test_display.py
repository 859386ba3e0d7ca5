"""The notebooks' pictures: what is drawn is the images themselves (nbval does not compare images)."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from llama_vision_helpers.display import show_images  # noqa: E402


def test_show_images_draws_each_image_with_its_title(monkeypatch, tmp_path):
    shown = []
    monkeypatch.setattr(plt, "show", lambda *a, **k: shown.append(plt.gcf()))
    red, blue = Image.new("RGB", (40, 30), (220, 30, 30)), Image.new("RGB", (30, 40), (20, 40, 230))
    path = tmp_path / "blue.png"
    blue.save(path)
    show_images([red, path], titles=None, columns=3)
    figure = shown[0]
    drawn = [ax for ax in figure.axes if ax.get_images()]
    assert len(drawn) == 2 and drawn[1].get_title() == "blue.png"
    for ax, original in zip(drawn, (red, blue)):
        assert np.array_equal(np.asarray(ax.get_images()[0].get_array()), np.asarray(original))
    figure.canvas.draw()
    pixels = np.asarray(figure.canvas.buffer_rgba())[..., :3].reshape(-1, 3)
    for colour in ((220, 30, 30), (20, 40, 230)):  # on the rendered canvas, not only in the data
        assert (np.abs(pixels.astype(int) - colour).sum(axis=1) < 12).sum() > 500
    plt.close(figure)
