"""The input images and their ground truth, generated deterministically.

`write_inputs("input")` (or `llama-vision inputs`) rewrites every image, `ground_truth.json` and `SOURCES.md`
byte for byte. Photos come from scikit-image's bundled data; everything else is drawn here.
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass
from datetime import date
from decimal import Decimal
from importlib import resources
from pathlib import Path
from typing import Callable

from PIL import Image

from ..defaults import DEFAULT_INSTRUCTION
from ..scoring import to_mathtext
from . import documents, figures, instruments
from .drawing import png_to_image

GROUND_TRUTH_VERSION = 1
SYNTHETIC = "drawn by `llama_vision_helpers.inputs` (this project, MIT licence)"


@dataclass
class InputSpec:
    """One input image: its file name, how to draw it, and what a right answer is."""

    file: str
    task: str
    description: str
    questions: list[dict]
    draw: Callable[[], Image.Image | bytes]
    source: str = SYNTHETIC
    style: str | None = None  # clocks: "analog" or "digital"

    def entry(self) -> dict:
        entry = {"task": self.task, "description": self.description, "source": self.source}
        if self.style:
            entry["style"] = self.style
        return {**entry, "questions": self.questions}


# --- questions and their prompt variants ------------------------------------------------------------

# The published runs' own wording, verbatim (`llama_vision_helpers.published` quotes the answers it produced;
# all three are from the AMD ROCm blog's runs of the 90B model).
SOURCE_STEP_BY_STEP = "Please walk through your reasoning step by step to arrive at the solution."
SOURCE_STEP_EXPLANATION = "Please provide a step-by-step explanation of your reasoning."
SOURCE_CAPTION = "Please provide a caption for the image."
SOURCE_REVENUE = ("Help me understand the revenue shown in this chart and sort the items in descending order based "
                  "on their revenue.")
SOURCE_INVOICE = "How long does it take from invoice date to due date? Be short and concise."

# "short": our scored prompt (the answer alone, in a stated format); "step_by_step": the same question asking
# for the reasoning in the source's words; "source": a published run's exact prompt, where one fits our picture.
PROMPT_VARIANTS = ("short", "step_by_step", "source")
_ANSWER_FORMAT = re.compile(r"\s*Answer with [^.]*\.$")
_REASONED_KINDS = ("number", "choice", "order", "clock")


def question(qid: str, prompt: str, kind: str, answer, *, source_prompt: str | None = None, **extra) -> dict:
    """A question in ground-truth form, with its prompt variants (see PROMPT_VARIANTS)."""
    variants = {}
    if kind in _REASONED_KINDS:
        variants["step_by_step"] = f"{_ANSWER_FORMAT.sub('', prompt)} {SOURCE_STEP_BY_STEP}"
    if source_prompt:
        variants["source"] = source_prompt
    return {"id": qid, "prompt": prompt, "kind": kind, "answer": answer, **extra, "variants": variants}


def question_prompt(question: dict, variant: str = "short") -> str | None:
    """The question's prompt in one of PROMPT_VARIANTS; None when the question has no such variant."""
    if variant not in PROMPT_VARIANTS:
        raise ValueError(f"Unknown prompt variant {variant!r}; choose from {', '.join(PROMPT_VARIANTS)}.")
    return question["prompt"] if variant == "short" else question.get("variants", {}).get(variant)


# --- photos ---------------------------------------------------------------------------------------

PHOTOS = {
    "image_1.jpg": ("astronaut.png", "Eileen Collins, NASA astronaut, in her flight suit with the US flag behind her",
                    "scikit-image `skimage/data/astronaut.png`; NASA photograph, public domain",
                    ["astronaut|space|nasa", "woman|person|she|her", "flag"]),
    "image_2.jpg": ("coffee.png", "A cup of coffee with latte art on a saucer with a spoon, on a wooden table",
                    "scikit-image `skimage/data/coffee.png`; photograph by Rachel Michetti, CC0",
                    ["coffee|latte|cappuccino|espresso", "cup|mug", "saucer|plate", "spoon"]),
    "image_3.jpg": ("chelsea.png", "Chelsea the cat, a tabby, looking to the side",
                    "scikit-image `skimage/data/chelsea.png`; photograph by Stefan van der Walt, CC0",
                    ["cat|kitten|feline", "tabby|striped|stripes|brown|orange"]),
}


def _photo(name: str) -> Callable[[], Image.Image]:
    def load() -> Image.Image:
        try:
            data = resources.files("skimage").joinpath("data", name).read_bytes()
        except ModuleNotFoundError as err:
            raise RuntimeError("Regenerating the photos needs scikit-image: pip install -e .[test]") from err
        return Image.open(io.BytesIO(data)).convert("RGB")

    return load


def photo_specs() -> list[InputSpec]:
    return [
        InputSpec(file, "caption", description, [question("caption", DEFAULT_INSTRUCTION, "keywords", keywords,
                                                          source_prompt=SOURCE_CAPTION)],
                  _photo(name), source)
        for file, (name, description, source, keywords) in PHOTOS.items()
    ]


# --- receipts and invoice -------------------------------------------------------------------------

RECEIPT_PROMPT = (
    "Extract the receipt as JSON with the keys store, date (YYYY-MM-DD), time (HH:MM), items (a list of "
    "objects with name, quantity and price), subtotal, tax and total. Answer with the JSON only."
)
RECEIPTS = [
    ("receipt-1.jpeg", "Corner Market", "1234 Elm Street, Springfield", "555-0142", "VISA ****4821", "2024-03-15", "14:32",
     [("Whole Milk 1L", 2, "1.89"), ("Sourdough Bread", 1, "4.25"), ("Bananas", 6, "0.29"), ("Cheddar 200g", 1, "3.99"),
      ("Orange Juice", 1, "3.49")], "8.0", -1.2),
    ("receipt-2.jpeg", "Blue Door Cafe", "88 Harbor Ave, Bayview", "555-0199", "CASH", "2024-07-02", "08:47",
     [("Cappuccino", 2, "3.80"), ("Blueberry Muffin", 1, "2.95"), ("Avocado Toast", 1, "7.50")], "6.5", 1.4),
    ("receipt-3.jpeg", "Hillside Hardware", "5 Quarry Lane, Millbrook", "555-0173", "MC ****0097", "2023-11-28", "17:05",
     [("Wood Screws 50pk", 2, "5.49"), ("Claw Hammer", 1, "14.99"), ("Masking Tape", 3, "2.19"),
      ("Sandpaper Assort", 1, "6.75"), ("Paint Brush 2in", 2, "3.25"), ("Work Gloves", 1, "8.90")], "7.25", -0.8),
]


def receipt_specs() -> list[InputSpec]:
    specs = []
    for i, (file, store, address, phone, card, when, time, items, rate, angle) in enumerate(RECEIPTS):
        truth = documents.receipt_truth(store, when, time, items, rate)
        answer = {k: v for k, v in truth.items() if k != "tax_rate"}
        draw = (lambda t=truth, a=address, p=phone, c=card, ang=angle, s=i:
                documents.receipt(t, address=a, phone=p, card=c, angle=ang, seed=100 + s))
        specs.append(InputSpec(file, "receipt", f"A thermal receipt from {store}",
                               [question("json", RECEIPT_PROMPT, "receipt", answer)], draw))
    return specs


def invoice_spec() -> InputSpec:
    items = [("Website redesign", 1, "2400.00"), ("Hosting (12 months)", 1, "180.00"), ("Logo variations", 3, "75.00")]
    truth = documents.receipt_truth("Tidewater Studio", "2024-03-04", "09:00", items, "10")
    invoice_day, due_day = date(2024, 3, 4), date(2024, 4, 3)
    truth.update(seller="Tidewater Studio", number="INV-2024-0113", invoice_date=invoice_day.isoformat(),
                 due_date=due_day.isoformat(), terms_days=(due_day - invoice_day).days,
                 bill_to=["Harbour Lights Bakery", "2 Quay Street", "Portsmouth PO1 2AB"])
    return InputSpec(
        "invoice.png", "invoice", "A one-page invoice with invoice date, due date and line items",
        [question("days_to_due", "How many days are there from the invoice date to the due date? Answer with a number.",
                  "number", (due_day - invoice_day).days, source_prompt=SOURCE_INVOICE),
         question("total_due", "What is the total amount due on this invoice?", "number", float(Decimal(truth["total"])),
                  tolerance=0.01)],
        lambda: documents.invoice(truth))


# --- instruments ----------------------------------------------------------------------------------

CLOCK_PROMPT = "What time does the watch show? Answer with the time as HH:MM."
ANALOG_TIMES = [(10, 10), (3, 47), (8, 22), (1, 5), (12, 55), (6, 30), (4, 37), (11, 8), (7, 45), (2, 50), (9, 15), (5, 23), (12, 0)]
DIGITAL_TIMES = [(22, 27, "TUE", 14), (7, 5, "SAT", 3), (13, 58, "MON", 21), (0, 41, "FRI", 9)]


def _clock_question(hour: int, minute: int) -> dict:
    return question("time", CLOCK_PROMPT, "clock", {"hour": hour, "minute": minute}, tolerance=1)


def clock_specs() -> list[InputSpec]:
    specs = []
    for i, (hour, minute) in enumerate(ANALOG_TIMES):
        file = "watch-face-2.jpg" if i == 0 else f"clock-analog-{i:02d}.jpg"
        numerals = i % 3 != 2  # every third face has ticks only
        specs.append(InputSpec(
            file, "clock", f"Analog watch face at {hour}:{minute:02d} ({'numerals' if numerals else 'ticks only'})",
            [_clock_question(hour, minute)],
            lambda h=hour, m=minute, n=numerals, s=i: instruments.analog_clock(h, m, numerals=n, seed=200 + s),
            style="analog"))
    for i, (hour, minute, weekday, day) in enumerate(DIGITAL_TIMES):
        file = "watch-face-1.jpg" if i == 0 else f"clock-digital-{i:02d}.jpg"
        specs.append(InputSpec(
            file, "clock", f"Digital watch showing {hour:02d}:{minute:02d}", [_clock_question(hour, minute)],
            lambda h=hour, m=minute, w=weekday, d=day, s=i: instruments.digital_watch(h, m, weekday=w, day=d, seed=300 + s),
            style="digital"))
    return specs


CALCULATORS = [("calculator-1.png", "128 × 7", "896", "multiplication", "5", (52, 54, 60)),
               ("calculator-2.png", "1,024 ÷ 16", "64", "division", "2", (28, 58, 92))]


def calculator_specs() -> list[InputSpec]:
    specs = []
    for i, (file, expression, result, operation, key, body) in enumerate(CALCULATORS):
        display_result = result.replace(",", "")
        specs.append(InputSpec(
            file, "calculator", f"A calculator showing {expression} = {result}",
            [question("result", "What is the result shown on the calculator display? Answer with the number only.",
                      "number", float(display_result)),
             question("operation", "Which arithmetic operation is shown on the display: addition, subtraction, "
                      "multiplication or division?", "choice", operation,
                      options=["addition", "subtraction", "multiplication", "division"]),
             question("key_above", f"On the keypad, which key is directly above the {key} key? Answer with the key's label.",
                      "number", float(instruments.key_above(key)))],
            lambda e=expression, r=display_result, b=body, s=i: instruments.calculator(e, r, body=b, seed=400 + s)))
    return specs


# --- equations ------------------------------------------------------------------------------------

# LaTeX as a person would write it; the images are typeset from the same text by way of `to_mathtext`.
EQUATIONS = [
    r"E = mc^2",
    r"a^2 + b^2 = c^2",
    r"\frac{a}{b} + \frac{c}{d} = \frac{ad + bc}{bd}",
    r"x = \frac{-b \pm \sqrt{b^2 - 4ac}}{2a}",
    r"\sum_{i=1}^{n} i = \frac{n(n+1)}{2}",
    r"e^{i\pi} + 1 = 0",
    r"\int_0^\infty e^{-x^2} dx = \frac{\sqrt{\pi}}{2}",
    r"\lim_{x \to 0} \frac{\sin x}{x} = 1",
    r"\sigma = \sqrt{\frac{1}{N} \sum_{i=1}^{N} (x_i - \mu)^2}",
    r"\begin{pmatrix} a & b \\ c & d \end{pmatrix}^{-1} = \frac{1}{ad - bc} \begin{pmatrix} d & -b \\ -c & a \end{pmatrix}",
]
LATEX_PROMPT = "Write the LaTeX for the equation in the image. Put it between $$ and $$."


def equation_specs() -> list[InputSpec]:
    return [
        InputSpec(f"equation-{i:02d}.png", "latex", f"Equation {i} of {len(EQUATIONS)} (easy to hard)",
                  [question("latex", LATEX_PROMPT, "latex", latex)],
                  lambda m=to_mathtext(latex): figures.equation(m))
        for i, latex in enumerate(EQUATIONS, start=1)
    ]


# --- scenes, charts, infographic -------------------------------------------------------------------

SHAPES = {"red circle": 4, "blue square": 3, "green triangle": 2}
TRANSPORT = {"Car": 48, "Bus": 22, "Bike": 15, "Walk": 12, "Train": 18}
MARKET_YEARS = list(range(2016, 2025))
MARKET = {"Company A": [62, 59, 57, 53, 50, 46, 44, 42, 41], "Company B": [30, 33, 36, 41, 47, 51, 53, 55, 57]}
REVENUE = {"Alder": 42.5, "Birch": 67.0, "Cedar": 18.2, "Maple": 88.9, "Oak": 55.3, "Willow": 30.7}
SOLAR_MILESTONES = [(2010, "First rooftop\npanels"), (2014, "Solar farm\nopens"), (2017, "Schools go\nsolar"),
                    (2020, "Battery storage\nadded"), (2024, "40% of city\npower")]
SOLAR_FACTS = [("12 MW", "installed capacity"), ("3,200", "homes powered"), ("40%", "of the city's power")]
SOLAR_CAPACITY = {2012: 1.5, 2015: 4.0, 2018: 6.5, 2021: 9.0, 2024: 12.0}


def _first_year_ahead(series: dict[str, list[float]], leader: str, other: str) -> int:
    return next(year for year, a, b in zip(MARKET_YEARS, series[leader], series[other]) if a > b)


def scene_specs() -> list[InputSpec]:
    total = sum(SHAPES.values())
    car_minus_walk = TRANSPORT["Car"] - TRANSPORT["Walk"]
    return [
        InputSpec("shapes.png", "shapes", "Red circles, blue squares and green triangles",
                  [question("total", "How many shapes are there in the image? Answer with a number.", "number", total),
                   question("without_red", "If you take away all the red circles, how many shapes are left? "
                            "Answer with a number.", "number", total - SHAPES["red circle"])],
                  lambda: figures.shapes_scene(SHAPES, seed=500)),
        InputSpec("chart-transport.png", "charts", "Bar chart of how people get to work",
                  [question("car_minus_walk", "According to the chart, how many more people ride a car than walk?",
                            "number", car_minus_walk)],
                  lambda: figures.bar_chart("How people get to work", list(TRANSPORT), list(TRANSPORT.values()),
                                            ylabel="People", color="#4c72b0")),
        InputSpec("chart-market-share.png", "charts", "Market share of two companies, 2016-2024",
                  [question("overtake_year", "In which year did Company B's market share first exceed Company A's?",
                            "number", _first_year_ahead(MARKET, "Company B", "Company A")),
                   question("leader_2016", "Which company had the larger market share in 2016, Company A or Company B?",
                            "choice", "Company A", options=list(MARKET)),
                   question("a_share_2024", "What was Company A's market share in 2024, in percent?", "number",
                            MARKET["Company A"][-1], tolerance=1)],
                  lambda: figures.line_chart("Market share, 2016-2024", MARKET_YEARS, MARKET, ylabel="Market share (%)")),
        InputSpec("chart-revenue.png", "charts", "Bar chart of six companies' revenue",
                  [question("sorted", "Sort the companies in the chart from the highest to the lowest revenue.",
                            "order", sorted(REVENUE, key=REVENUE.get, reverse=True), source_prompt=SOURCE_REVENUE)],
                  lambda: figures.bar_chart("Revenue 2024 (million $)", list(REVENUE), list(REVENUE.values()),
                                            ylabel="Revenue (million $)", color="#55a868")),
        InputSpec("infographic.png", "infographic", "Infographic on solar power in a city: timeline and numbers",
                  [question("farm_year", "In which year did the solar farm open?", "number", 2014),
                   question("homes", "How many homes are powered by solar energy?", "number", 3200),
                   question("capacity_growth", "By how many MW did installed capacity grow from 2012 to 2024?",
                            "number", SOLAR_CAPACITY[2024] - SOLAR_CAPACITY[2012], tolerance=0.05)],
                  lambda: figures.infographic("Solar power in Riverton, 2010-2024", SOLAR_MILESTONES, SOLAR_FACTS,
                                              SOLAR_CAPACITY)),
    ]


def all_specs() -> list[InputSpec]:
    """Every input, in the order they are written."""
    return (photo_specs() + receipt_specs() + calculator_specs() + clock_specs() + equation_specs()
            + scene_specs() + [invoice_spec()])


# --- writing and reading --------------------------------------------------------------------------


def encode(image: Image.Image | bytes, file: str) -> bytes:
    """The file's bytes: PNG drawings are kept as drawn; photos and scans are JPEG (quality 90)."""
    if isinstance(image, bytes) and file.endswith(".png"):
        return image
    if isinstance(image, bytes):
        image = png_to_image(image)
    buffer = io.BytesIO()
    if file.endswith((".jpg", ".jpeg")):
        image.save(buffer, format="JPEG", quality=90)
    else:
        image.save(buffer, format="PNG")
    return buffer.getvalue()


def ground_truth(specs: list[InputSpec] | None = None) -> dict:
    specs = specs if specs is not None else all_specs()
    return {"version": GROUND_TRUTH_VERSION, "images": {spec.file: spec.entry() for spec in specs}}


def sources_markdown(specs: list[InputSpec]) -> str:
    rows = "\n".join(f"| `{spec.file}` | {spec.description} | {spec.source} |" for spec in specs)
    return (
        "# Sources of the input images\n\n"
        "Regenerate everything here with `llama-vision inputs` (or `make inputs`): the output is the same byte for "
        "byte. The photos ship inside the scikit-image package on PyPI; nothing is downloaded.\n\n"
        "**These are not the published walk-throughs' pictures.** Eight file names (`image_1.jpg`, `image_2.jpg`, "
        "`image_3.jpg`, `receipt-1.jpeg`, `receipt-2.jpeg`, `calculator-1.png`, `watch-face-1.jpg`, "
        "`watch-face-2.jpg`) follow the `input/` folder of the Unsloth walk-through (DebuggerCafe, 2024), but the "
        "pictures behind them are this project's: its `image_2.jpg` is a mirror on a beach, ours is a cup of coffee. "
        "What a walk-through's model said about its pictures is therefore never a right or wrong answer about ours.\n\n"
        "| file | what it shows | origin and licence |\n| --- | --- | --- |\n" + rows + "\n"
    )


def render_inputs(progress: bool = True) -> dict[str, bytes]:
    """Every file of the input folder as bytes, keyed by name (images, ground_truth.json, SOURCES.md)."""
    from tqdm.auto import tqdm

    specs = all_specs()
    files = {spec.file: encode(spec.draw(), spec.file)
             for spec in tqdm(specs, desc="drawing inputs", disable=not progress, unit="image")}
    files["ground_truth.json"] = (json.dumps(ground_truth(specs), indent=2, ensure_ascii=False) + "\n").encode()
    files["SOURCES.md"] = sources_markdown(specs).encode()
    return files


def write_inputs(folder: str | Path = "input", progress: bool = True) -> Path:
    """Write every input image, ground_truth.json and SOURCES.md into `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in render_inputs(progress).items():
        (folder / name).write_bytes(data)
    return folder


def default_input_dir() -> Path:
    """`./input` when run from the project, else the project's input folder beside the installed package."""
    here = Path("input")
    if (here / "ground_truth.json").is_file():
        return here
    return Path(__file__).resolve().parents[2] / "input"


def load_ground_truth(folder: str | Path | None = None) -> dict:
    """The parsed ground_truth.json of the input folder."""
    folder = Path(folder) if folder is not None else default_input_dir()
    return json.loads((folder / "ground_truth.json").read_text())


TASKS = ("caption", "receipt", "calculator", "latex", "clock", "shapes", "charts", "invoice", "infographic")
