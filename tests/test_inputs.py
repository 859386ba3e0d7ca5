import json
import math
from pathlib import Path

import jsonschema
import numpy as np
import pytest
from PIL import Image

from llama_vision_helpers.inputs import TASKS, all_specs, load_ground_truth, render_inputs
from llama_vision_helpers.inputs.drawing import polar
from llama_vision_helpers.inputs.instruments import hand_angles
from llama_vision_helpers.scoring import load_schema

INPUT = Path(__file__).resolve().parents[1] / "input"


@pytest.fixture(scope="module")
def rendered():
    return render_inputs(progress=False)


def test_inputs_regenerate_byte_for_byte(rendered):
    committed = {p.name for p in INPUT.iterdir()}
    assert committed == set(rendered), "input/ and the generators disagree on the file list: run `make inputs`"
    for name, data in rendered.items():
        assert (INPUT / name).read_bytes() == data, f"{name} differs from what `llama-vision inputs` draws"


def test_ground_truth_validates_against_its_schema():
    jsonschema.Draft202012Validator(load_schema("ground_truth"),
                                    format_checker=jsonschema.FormatChecker()).validate(load_ground_truth(INPUT))


def test_the_required_sets_exist():
    images = load_ground_truth(INPUT)["images"]
    by_task = {task: [f for f, e in images.items() if e["task"] == task] for task in TASKS}
    for name in ("image_1.jpg", "image_2.jpg", "image_3.jpg", "receipt-1.jpeg", "receipt-2.jpeg", "calculator-1.png",
                 "watch-face-1.jpg", "watch-face-2.jpg"):
        assert name in images
    analog = [f for f in by_task["clock"] if "Analog" in images[f]["description"]]
    digital = [f for f in by_task["clock"] if "Digital" in images[f]["description"]]
    assert len(analog) >= 12 and len(digital) >= 4
    assert len(by_task["latex"]) >= 10 and len(by_task["receipt"]) >= 3 and len(by_task["calculator"]) >= 2
    assert images["watch-face-1.jpg"]["description"].startswith("Digital")
    assert images["watch-face-2.jpg"]["description"].startswith("Analog")
    assert set(images) == {p.name for p in INPUT.iterdir()} - {"ground_truth.json", "SOURCES.md"}


def test_every_file_is_named_in_sources():
    sources = (INPUT / "SOURCES.md").read_text()
    for name in load_ground_truth(INPUT)["images"]:
        assert f"`{name}`" in sources
    assert "CC0" in sources and "public domain" in sources


def _darkness(image: Image.Image, x: float, y: float) -> float:
    grey = np.asarray(image.convert("L"), dtype=float)
    patch = grey[int(y) - 1:int(y) + 2, int(x) - 1:int(x) + 2]
    return 255 - patch.mean()


@pytest.mark.parametrize("spec", [s for s in all_specs() if "Analog" in s.description], ids=lambda s: s.file)
def test_clock_hands_point_where_the_ground_truth_says(spec):
    truth = spec.questions[0]["answer"]
    image = Image.open(INPUT / spec.file)
    size = image.width
    centre = size / 2
    hour_angle, minute_angle = hand_angles(truth["hour"], truth["minute"])
    # on each hand, past the centre cap
    for angle, radius in ((hour_angle, 0.16 * size), (minute_angle, 0.30 * size)):
        assert _darkness(image, *polar(centre, centre, radius, angle)) > 150, f"no hand at {angle:.1f} degrees"
    # between the brand name and the numerals, away from both hands, the dial is bare
    for offset in range(20, 360, 20):
        probe = (hour_angle + offset) % 360
        if min(abs((probe - a + 180) % 360 - 180) for a in (hour_angle, minute_angle)) > 15:
            assert _darkness(image, *polar(centre, centre, 0.2 * size, probe)) < 60


def test_hour_hand_advances_with_the_minutes():
    assert hand_angles(3, 47) == (3 * 30 + 47 * 0.5, 47 * 6)
    assert hand_angles(12, 0) == (0, 0)
    assert math.isclose(hand_angles(15, 30)[0], 105)


def test_receipt_totals_add_up():
    for name, entry in load_ground_truth(INPUT)["images"].items():
        if entry["task"] != "receipt":
            continue
        truth = entry["questions"][0]["answer"]
        from decimal import Decimal

        lines = sum(Decimal(i["price"]) for i in truth["items"])
        assert all(Decimal(i["unit_price"]) * i["quantity"] == Decimal(i["price"]) for i in truth["items"])
        assert Decimal(truth["subtotal"]) == lines
        assert Decimal(truth["subtotal"]) + Decimal(truth["tax"]) == Decimal(truth["total"])


def test_ground_truth_file_is_pretty_and_stable():
    text = (INPUT / "ground_truth.json").read_text()
    assert json.loads(text)["version"] == 1 and text.endswith("\n")
