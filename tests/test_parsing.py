import pytest

from llama_vision_helpers.parsing import ParseError, extract_json, extract_latex, parse_clock_time, parse_number

JSON_CASES = [
    ('```json\n{"store": "Corner Market", "total": 18.63}\n```', {"store": "Corner Market", "total": 18.63}),
    ('Here is the receipt:\n```\n{"total": "18.63"}\n```\nLet me know!', {"total": "18.63"}),
    ('Sure! {"store": "Blue Door Cafe", "items": [{"name": "Muffin", "price": 2.95}]} Hope this helps.',
     {"store": "Blue Door Cafe", "items": [{"name": "Muffin", "price": 2.95}]}),
    ('{"a": 1, "b": [1, 2,],}', {"a": 1, "b": [1, 2]}),
    ("{'store': 'Corner Market', 'total': 3.49}", {"store": "Corner Market", "total": 3.49}),
    ('[{"name": "Milk"}, {"name": "Bread"}]', [{"name": "Milk"}, {"name": "Bread"}]),
    ('First:\n```json\n{"x": 1}\n```\nSecond:\n```json\n{"y": 2}\n```', {"x": 1}),
    ('```json\n{"store": "Hillside", "items": [{"name": "Hammer", "price": 14.99}', {"store": "Hillside", "items": [{"name": "Hammer", "price": 14.99}]}),
    ('{"note": "it\'s {not} a brace", "n": 2}', {"note": "it's {not} a brace", "n": 2}),
    ('The JSON is {"total": 5, // the total\n "tax": 1}', {"total": 5, "tax": 1}),
    ('```JSON\n{"k": true, "v": null}\n```', {"k": True, "v": None}),
    ('Receipt data -> {"date": "2024-03-15", "time": "14:32"} <- done', {"date": "2024-03-15", "time": "14:32"}),
    ("I can't read it {} but here: {\"ok\": 1}", {"ok": 1}),
    ('{"nested": {"deep": {"value": [1, {"x": 2}]}}}', {"nested": {"deep": {"value": [1, {"x": 2}]}}}),
    ('```javascript\n{items: [{name: "Tape", quantity: 3}]}\n```', {"items": [{"name": "Tape", "quantity": 3}]}),
]
JSON_FAILURES = ["I cannot read this receipt.", "", "{}", "[ ]", "total: 18.63"]


@pytest.mark.parametrize("text,expected", JSON_CASES)
def test_extract_json(text, expected):
    assert extract_json(text) == expected


@pytest.mark.parametrize("text", JSON_FAILURES)
def test_extract_json_failures_keep_the_raw_text(text):
    with pytest.raises(ParseError) as info:
        extract_json(text)
    assert info.value.raw_text == text


LATEX_CASES = [
    (r"$$\frac{a}{b}$$", r"\frac{a}{b}"),
    ("The equation is:\n$$E = mc^2$$\nThis is Einstein's formula.", "E = mc^2"),
    (r"\[ a^2 + b^2 = c^2 \]", "a^2 + b^2 = c^2"),
    (r"Inline: $e^{i\pi} + 1 = 0$ is famous.", r"e^{i\pi} + 1 = 0"),
    ("```latex\n\\sum_{i=1}^{n} i = \\frac{n(n+1)}{2}\n```", r"\sum_{i=1}^{n} i = \frac{n(n+1)}{2}"),
    ("```latex\n$$x = 1$$\n```", "x = 1"),
    (r"\begin{equation} \int_0^1 x\,dx = \frac{1}{2} \end{equation}", r"\int_0^1 x\,dx = \frac{1}{2}"),
    ("\\begin{equation}\n\\alpha + \\beta = \\gamma", r"\alpha + \beta = \gamma"),
    (r"\( \sigma^2 \)", r"\sigma^2"),
    (r"\frac{-b \pm \sqrt{b^2-4ac}}{2a}", r"\frac{-b \pm \sqrt{b^2-4ac}}{2a}"),
    ("Sure, here it is: x^{2} + y_{1} = 0.", "Sure, here it is: x^{2} + y_{1} = 0"),
    ("The LaTeX code is `\\frac{1}{2}`.", r"\frac{1}{2}"),
    (r"$$\begin{pmatrix} a & b \\ c & d \end{pmatrix}$$", r"\begin{pmatrix} a & b \\ c & d \end{pmatrix}"),
    ("```tex\n\\lim_{x \\to 0} \\frac{\\sin x}{x} = 1", r"\lim_{x \to 0} \frac{\sin x}{x} = 1"),
    ("Two: $$a$$ and $$b$$", "a"),
]
LATEX_FAILURES = ["I see an equation but cannot read it.", "", "x equals one"]


@pytest.mark.parametrize("text,expected", LATEX_CASES)
def test_extract_latex(text, expected):
    assert extract_latex(text) == expected


@pytest.mark.parametrize("text", LATEX_FAILURES)
def test_extract_latex_failures(text):
    with pytest.raises(ParseError):
        extract_latex(text)


CLOCK_CASES = [
    ("10:10", (10, 10)), ("The watch shows 10:10 PM.", (22, 10)), ("14:05", (14, 5)), ("It is 3:47.", (3, 47)),
    ("ten past ten", (10, 10)), ("It's quarter to three", (2, 45)), ("half past seven", (7, 30)), ("noon", (12, 0)),
    ("around midnight", (0, 0)), ("12:41 AM", (0, 41)), ("twenty-five past four", (4, 25)), ("5 to 12", (11, 55)),
    ("It is 8 o'clock", (8, 0)), ("The time is 7 pm", (19, 0)), ("Time: 09.15", (9, 15)), ("11:08:32", (11, 8)),
    ("The hands point at 2:50 p.m.", (14, 50)), ("quarter past nine", (9, 15)),
]
CLOCK_FAILURES = ["I cannot tell the time from this image.", "", "The watch is silver.", "It costs 25.99"]


@pytest.mark.parametrize("text,expected", CLOCK_CASES)
def test_parse_clock_time(text, expected):
    assert tuple(parse_clock_time(text)) == expected


@pytest.mark.parametrize("text", CLOCK_FAILURES)
def test_parse_clock_time_failures(text):
    with pytest.raises(ParseError):
        parse_clock_time(text)


NUMBER_CASES = [
    ("896", 896), ("The result is 896.", 896), ("128 × 7 = 896", 896), ("The answer is **36** more people.", 36),
    ("Car: 48, Walk: 12, so 36 more people ride a car.", 36), ("Total due: $3,085.50", 3085.5), ("It is 2021.", 2021),
    ("There are nine shapes.", 9), ("-7", -7), ("The answer: 42%", 42), ("1,024 ÷ 16 = 64", 64),
    ("About 10.5 MW", 10.5), ("Final answer: 30 days", 30), ("I count 4 red circles and 3 blue squares, 2 green "
                                                              "triangles, so there are 9", 9),
    ("Company B overtook Company A in 2021.", 2021),
]
NUMBER_FAILURES = ["I cannot see the display.", "", "The key is blank."]


@pytest.mark.parametrize("text,expected", NUMBER_CASES)
def test_parse_number(text, expected):
    assert parse_number(text) == pytest.approx(expected)


@pytest.mark.parametrize("text", NUMBER_FAILURES)
def test_parse_number_failures(text):
    with pytest.raises(ParseError) as info:
        parse_number(text)
    assert info.value.raw_text == text


# Worked answers as real models write them (see also tests/test_published.py for the published ones): steps,
# bold step headings, lists before the conclusion, a bold answer, repetition.
WORKED_NUMBER_CASES = [
    ("**Step 1: Read the car bar.**\nCar: 48\n\n**Step 2: Read the walk bar.**\nWalk: 12\n\n"
     "**Step 3: Subtract.**\n48 - 12 = 36", 36),
    ("**Step 1: Count the shapes**\nThere are 9 shapes.\n\n**Step 2: Remove the red circles**\nThere are 4 red "
     "circles.\n\nTherefore, after removing 4 red circles, **5 shapes** remain.", 5),
    ("The number of people who ride a car is **48** and the number who walk is **12**. So 36 more people ride a "
     "car.", 36),
    ("**Company A:**\n* 2016: 62%\n* 2024: 41%\n\n**41**", 41),
    ("The result is 896. *Answer*: 896. *Answer*: 896. *Answer*: 896. *Answer*:", 896),
    ("**Step 1: Read the bars**\nCar 48, walk 12.\n\n**Step 2: Subtract them**\nThe difference is 36 people.", 36),
    ("Invoice date: 04/03/2024\nDue date: 03/04/2024\n\nThe difference is **30 days**.", 30),
]


@pytest.mark.parametrize("text,expected", WORKED_NUMBER_CASES)
def test_parse_number_reads_the_conclusion_of_a_worked_answer(text, expected):
    assert parse_number(text) == pytest.approx(expected)


@pytest.mark.parametrize("text,expected", [
    ("**Step 1: Read the hour hand**\nIt points just past 3, so we start from 3:00.\n\n**Step 2: Read the minute "
     "hand**\nIt points at 47 minutes.\n\nTherefore, the time is **3:47**.", (3, 47)),
    ("* Hour hand: between 10 and 11\n* Minute hand: on the 2\n\nThe watch shows **10:10**.", (10, 10)),
    ("The time is 22:27. *Answer*: 22:27. *Answer*: 22:27. *Answer*:", (22, 27)),
])
def test_parse_clock_time_reads_the_conclusion_of_a_worked_answer(text, expected):
    assert tuple(parse_clock_time(text)) == expected
