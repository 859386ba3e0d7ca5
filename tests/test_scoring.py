import pytest

from llama_vision_helpers.scoring import (
    clock_error_minutes, find_choice, find_order, latex_renders, normalize_latex, receipt_schema_errors, score_answer, score_clock,
    score_keywords, score_latex, score_number, score_order, score_receipt,
)

TRUTH = {
    "store": "Corner Market", "date": "2024-03-15", "time": "14:32",
    "items": [{"name": "Whole Milk 1L", "quantity": 2, "unit_price": "1.89", "price": "3.78"},
              {"name": "Bananas", "quantity": 6, "unit_price": "0.29", "price": "1.74"}],
    "subtotal": "5.52", "tax": "0.44", "total": "5.96",
}


@pytest.mark.parametrize("a,b,minutes", [((12, 5), (11, 55), 10), ((3, 0), (15, 0), 0), ((6, 0), (12, 0), 360),
                                         ((0, 41), (12, 41), 0), ((1, 0), (11, 0), 120), ((10, 10), (10, 10), 0)])
def test_clock_error_is_measured_on_a_12_hour_dial(a, b, minutes):
    assert clock_error_minutes(a, b) == minutes
    assert clock_error_minutes(b, a) == minutes


def test_clock_score_tolerance_and_value():
    assert score_clock((10, 11), (10, 10)).correct
    off = score_clock((10, 40), (10, 10))
    assert not off.correct and off.details["error_minutes"] == 30 and off.value == pytest.approx(1 - 30 / 180)
    assert score_clock((4, 10), (10, 10)).value == 0.0


def test_number_tolerance_is_absolute_and_stated():
    assert score_number(3085.5, 3085.50, tolerance=0.01).correct
    assert not score_number(3085.6, 3085.50, tolerance=0.01).correct
    assert score_number(41.5, 41, tolerance=1).correct
    assert not score_number(37, 36).correct


def test_latex_normalization_ignores_spacing_and_equivalent_spellings():
    assert normalize_latex(r"\dfrac{a}{b} + x^{2}") == normalize_latex(r"\frac{a}{b}+x^2")
    assert normalize_latex(r"\int_0^\infty e^{-x^2} \, dx.") == normalize_latex(r"\int_{0}^{\infty} e^{-x^{2}} dx")
    assert normalize_latex(r"\left( a \right)") == "(a)"
    assert normalize_latex("a+b") != normalize_latex("a-b")


def test_latex_score_reports_edit_distance_and_rendering():
    right = score_latex(r"E = m c^{2}", "E = mc^2")
    assert right.correct and right.details["edit_distance"] == 0 and right.details["renders"]
    wrong = score_latex(r"E = mc^3", "E = mc^2")
    assert not wrong.correct and wrong.details["edit_distance"] == 1 and 0 < wrong.value < 1
    broken = score_latex(r"\frac{a}{", r"\frac{a}{b}")
    assert not broken.details["renders"]
    assert latex_renders(r"\sqrt{\pi}") and not latex_renders(r"\notacommand{x}")


def test_receipt_perfect_extraction_in_another_spelling():
    predicted = {
        "store_name": "CORNER MARKET", "Date": "03/15/2024", "timestamp": "2:32 PM",
        "line_items": [{"description": "whole milk 1l", "qty": "2", "total": "$3.78"},
                       {"item": "Bananas", "quantity": 6, "price": 1.74}],
        "subtotal": "$5.52", "tax": 0.44, "total_amount": "5.96",
    }
    score = score_receipt(predicted, TRUTH)
    assert score.value == 1.0 and score.correct
    assert not score.details["schema_valid"]  # the keys are not the schema's, though every value is right


def test_receipt_missing_timestamp_and_wrong_total():
    predicted = {"store": "Corner Market", "date": "2024-03-15", "items": [
        {"name": "Whole Milk 1L", "quantity": 2, "price": 3.78}, {"name": "Bananas", "quantity": 6, "price": 1.74}],
        "subtotal": 5.52, "tax": 0.44, "total": 6.96}
    score = score_receipt(predicted, TRUTH)
    assert score.details["schema_valid"]
    assert score.details["missing"] == ["time", "total"]
    assert score.details["precision"] == pytest.approx(8 / 9)  # 9 fields given, all but the total right
    assert score.details["recall"] == pytest.approx(8 / 10)  # 10 fields on the receipt
    assert not score.correct


def test_receipt_that_is_not_an_object_scores_zero():
    score = score_receipt(["milk", "bread"], TRUTH)
    assert score.value == 0 and score.details["schema_errors"]
    assert receipt_schema_errors({"store": "x", "date": "y", "items": [], "total": 1}) == []


def test_order_and_keywords():
    truth = ["Maple", "Birch", "Oak", "Alder", "Willow", "Cedar"]
    assert score_order(truth, truth).correct
    swapped = score_order(["Birch", "Maple", "Oak", "Alder", "Willow", "Cedar"], truth)
    assert not swapped.correct and swapped.value == pytest.approx(14 / 15)
    kw = score_keywords("A cup of espresso on a red saucer.", ["coffee|espresso", "cup|mug", "saucer", "spoon"])
    assert kw.value == 0.75 and kw.correct


def test_score_answer_never_raises_on_noise():
    questions = [
        {"kind": "number", "answer": 36}, {"kind": "clock", "answer": {"hour": 3, "minute": 47}},
        {"kind": "latex", "answer": "E = mc^2"}, {"kind": "receipt", "answer": TRUTH},
        {"kind": "choice", "answer": "Company A", "options": ["Company A", "Company B"]},
        {"kind": "order", "answer": ["Maple", "Birch"]}, {"kind": "keywords", "answer": ["cat"]},
    ]
    for question in questions:
        parsed, score, error = score_answer(question, "ginaz\ufffd{\" wG|&to}],l mtin")
        assert score.value == 0 and not score.correct
        if parsed is None:
            assert error and "no " in error


CHOICE_OPTIONS = ["addition", "subtraction", "multiplication", "division"]


@pytest.mark.parametrize("text,expected", [
    ("multiplication", "multiplication"),
    ("It is multiplication, not division.", "multiplication"),
    ("Not addition: the operation is **multiplication**.", "multiplication"),
    ("The sign could be read as division at first, but looking closely, 128 × 7 = 896, so the operation is "
     "multiplication.", "multiplication"),
    ("**Step 1: Look for addition or division signs**\nThe display shows ×.\n\nTherefore, the answer is "
     "multiplication.", "multiplication"),
    ("Division: 1,024 ÷ 16 = 64.", "division"),
    ("Not division but multiplication.", "multiplication"),
])
def test_a_choice_is_read_from_the_conclusion(text, expected):
    assert find_choice(text, CHOICE_OPTIONS) == expected


def test_a_choice_answer_naming_the_other_company_first_is_graded_by_its_conclusion():
    question = {"kind": "choice", "answer": "Company A", "options": ["Company A", "Company B"]}
    text = ("Company B's line starts at about 30% in 2016, below Company A's at about 62%, so Company A had the "
            "larger market share in 2016.")
    parsed, score, error = score_answer(question, text)
    assert (parsed, score.correct, error) == ("Company A", True, None)


def test_the_final_sorted_list_is_graded_not_the_list_in_chart_order():
    names = ["Maple", "Birch", "Oak", "Alder", "Willow", "Cedar"]
    text = ("Here are the revenues:\n\n* Alder: 42.5\n* Birch: 67.0\n* Cedar: 18.2\n* Maple: 88.9\n* Oak: 55.3\n"
            "* Willow: 30.7\n\n**Sorted from highest to lowest:**\n\n1. Maple\n2. Birch\n3. Oak\n4. Alder\n"
            "5. Willow\n6. Cedar\n\nMaple has the highest revenue and Cedar the lowest.")
    assert find_order(text, names) == names
    assert find_order("Maple, Birch, Oak, Alder, Willow and Cedar.", names) == names


def test_a_correct_matrix_answer_renders_and_is_correct():
    truth = (r"\begin{pmatrix} a & b \\ c & d \end{pmatrix}^{-1} = \frac{1}{ad - bc} "
             r"\begin{pmatrix} d & -b \\ -c & a \end{pmatrix}")
    parsed, score, error = score_answer({"kind": "latex", "answer": truth}, f"$${truth}$$")
    assert error is None and score.correct and score.details["renders"]
    assert latex_renders(r"\begin{bmatrix} 1 & 2 & 3 \\ 4 & 5 & 6 \\ 7 & 8 & 9 \end{bmatrix}")
    assert latex_renders(r"f(x) = \begin{cases} 1 & x > 0 \\ 0 & \text{otherwise} \end{cases}")
    assert not latex_renders(r"\begin{pmatrix} a & b \\ c & d")
    assert not latex_renders(r"\begin{pmatrix} a & b \\ c & d \end{bmatrix}")
