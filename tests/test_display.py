"""The notebooks' pictures: what is drawn is the images themselves, and the text summary that notebooks print
under deterministic figures tells pictures apart (nbval does not compare images)."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from llama_vision_helpers.display import figure_summary, show_images  # noqa: E402


def test_summary_names_each_panel_and_changes_when_a_picture_goes_black(tmp_path):
    pictures = []
    for name, colour in (("a.png", (200, 30, 30)), ("b.png", (30, 30, 200))):
        Image.new("RGB", (40, 30), colour).save(tmp_path / name)
        pictures.append(tmp_path / name)
    shown = figure_summary(show_images(pictures, columns=2))
    assert shown.splitlines()[0] == "a.png: 30x40x3 mean 86.7"
    assert shown.splitlines()[1].startswith("b.png: 30x40x3")
    assert shown == figure_summary(show_images(pictures, columns=2))  # same pictures, same text

    Image.new("RGB", (40, 30), (0, 0, 0)).save(tmp_path / "a.png")
    assert figure_summary(show_images(pictures, columns=2)) != shown
    plt.close("all")


def test_a_blank_figure_has_no_ink():
    fig, ax = plt.subplots(figsize=(2, 1))
    ax.axis("off")
    assert figure_summary(fig) == "figure 80x40 px at 40 dpi, 0% not background"
    ax.imshow(np.zeros((10, 10, 3), dtype=np.uint8))
    assert "0% not background" not in figure_summary(fig).splitlines()[-1]
    plt.close("all")


def test_a_published_answer_is_printed_whole_with_its_source_and_both_grades(capsys):
    from llama_vision_helpers.display import print_published
    from llama_vision_helpers.published import grade_published, published_answer

    answer = published_answer("rocm-invoice-no-template")
    print_published(answer.id)
    shown = capsys.readouterr().out
    assert answer.citation in shown and answer.prompt in shown
    assert " ".join(answer.answer.split()) in " ".join(shown.split())
    assert f"our verdict: {grade_published(answer).verdict}; a person's grade: {answer.grade}" in shown


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
