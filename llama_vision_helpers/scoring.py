"""Score a parsed answer against the ground truth, one function per kind of answer.

`score_answer(question, raw_text)` parses and scores in one step and never raises on a bad answer:
a failure to parse is a score of 0 with the reason kept.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal, InvalidOperation
from functools import lru_cache
from importlib import resources
from typing import Any

from . import parsing

DIAL_MINUTES = 12 * 60


@dataclass
class Score:
    """How good one answer is: `value` in [0, 1], `correct` by the kind's rule, and the numbers behind it."""

    value: float
    correct: bool
    details: dict[str, Any] = field(default_factory=dict)


# --- numbers and choices --------------------------------------------------------------------------


def score_number(predicted: float, truth: float, tolerance: float = 0.0) -> Score:
    """Correct when |predicted - truth| <= tolerance (an absolute tolerance, stated per question)."""
    difference = abs(float(predicted) - float(truth))
    correct = difference <= tolerance + 1e-9
    return Score(1.0 if correct else 0.0, correct, {"abs_error": difference})


def score_choice(predicted: str, truth: str) -> Score:
    correct = predicted.strip().lower() == truth.strip().lower()
    return Score(float(correct), correct)


_NEGATED = re.compile(r"(?:\bnot|\bno|n't|\brather than|\binstead of|\bnor)\s+(?:an?\s+|the\s+)?$", re.I)
_SORT_CUES = re.compile(r"\bsort|\bdescending\b|\bhighest to (?:the )?lowest\b|\blargest to (?:the )?smallest\b"
                        r"|\brank|\border\b", re.I)


def _mentions(text: str, names: list[str]) -> list[tuple[int, str]]:
    """(position, name) of every mention of every name, in text order."""
    found = [(m.start(), name) for name in names for m in re.finditer(rf"(?<!\w){re.escape(name)}(?!\w)", text, re.I)]
    return sorted(found)


def _chosen_options(text: str, options: list[str]) -> list[str]:
    """The options `text` names, in order, less those it rules out ('not division', 'rather than addition')."""
    return [option for at, option in _mentions(text, options) if not _NEGATED.search(text[max(0, at - 20):at])]


def find_choice(text: str, options: list[str]) -> str:
    """The option the answer settles on, read as a careful grader reads it (`parsing.read_conclusion`: the first
    option named after the last conclusion cue, a bold one first, else the last bold option), else the first
    option named. Options the answer rules out ('not division') do not count, so an answer may name the other
    option first and conclude with the right one."""
    chosen = parsing.read_conclusion(text, lambda part: next(iter(_chosen_options(part, options)), None))
    if chosen is None:
        chosen = next(iter(_chosen_options(text, options)), None)
    if chosen is None:
        raise parsing.ParseError("choice", text, f"none of {options}")
    return chosen


def _first_mention_order(text: str, names: list[str]) -> list[str]:
    order: list[str] = []
    for _, name in _mentions(text, names):
        if name not in order:
            order.append(name)
    return order


def find_order(text: str, names: list[str]) -> list[str]:
    """The names in the order of the answer's final list (names it leaves out are left out).

    Real answers often list the items as they appear (chart order) before sorting them: the list read is the one
    after the last sorting cue ('sorted', 'descending', 'ranking', 'order', ...) that names as many of the
    names as the whole answer does; without such a cue, the order of first mention.
    """
    whole = _first_mention_order(text, names)
    if len(whole) < 2:
        raise parsing.ParseError("ordered list", text, "fewer than two of the names")
    for cue in reversed(list(_SORT_CUES.finditer(text))):
        final = _first_mention_order(text[cue.start():], names)
        if len(final) == len(whole):
            return final
    return whole


def score_order(predicted: list[str], truth: list[str]) -> Score:
    """Correct when the whole order matches; value is the share of pairs put in the right order."""
    rank = {name: i for i, name in enumerate(predicted)}
    pairs = [(a, b) for i, a in enumerate(truth) for b in truth[i + 1:]]
    right = sum(1 for a, b in pairs if a in rank and b in rank and rank[a] < rank[b])
    return Score(right / len(pairs), predicted == truth, {"pairs_right": right, "pairs": len(pairs)})


def score_keywords(text: str, keywords: list[str]) -> Score:
    """Share of the expected keywords the answer mentions (any of 'a|b' counts); correct at half or more."""
    hits = [kw for kw in keywords if any(re.search(rf"\b{re.escape(alt)}", text, re.I) for alt in kw.split("|"))]
    recall = len(hits) / len(keywords)
    return Score(recall, recall >= 0.5, {"keywords_found": hits})


# --- clocks ---------------------------------------------------------------------------------------


def clock_error_minutes(predicted: tuple[int, int], truth: tuple[int, int]) -> int:
    """Minutes between two times read on a 12-hour dial: 12:05 vs 11:55 is 10, 3:00 vs 15:00 is 0."""
    a = (predicted[0] % 12) * 60 + predicted[1]
    b = (truth[0] % 12) * 60 + truth[1]
    difference = abs(a - b) % DIAL_MINUTES
    return min(difference, DIAL_MINUTES - difference)


def score_clock(predicted: tuple[int, int], truth: tuple[int, int], tolerance: float = 1) -> Score:
    """Correct within `tolerance` minutes; value falls linearly to 0 at 3 hours off."""
    error = clock_error_minutes(predicted, truth)
    return Score(max(0.0, 1 - error / 180), error <= tolerance, {"error_minutes": error})


# --- LaTeX ----------------------------------------------------------------------------------------

_SPACING = re.compile(r"(?<!\\)\\[,;:!> ]|\\q?quad|\\left|\\right|\\displaystyle|\\limits|\\nolimits|~")
_BARE_SCRIPT = re.compile(r"([\^_])\s*(?!\{)(\\[A-Za-z]+|[A-Za-z0-9])")


def normalize_latex(source: str) -> str:
    """A canonical spelling: no spacing commands, \\dfrac -> \\frac, x^2 -> x^{2}, no whitespace or final period."""
    text = source.strip().rstrip(".,;")
    text = re.sub(r"\\[dt]frac", r"\\frac", text)
    text = _SPACING.sub("", text)
    text = _BARE_SCRIPT.sub(r"\1{\2}", text)
    return re.sub(r"\s+", "", text)


# matplotlib's mathtext has no environments: matrices are typeset as columns of stacked cells between delimiters.
_MATRIX = re.compile(r"\\begin\{(matrix|pmatrix|bmatrix|Bmatrix|vmatrix|Vmatrix|cases)\}((?:(?!\\begin\{).)*?)\\end\{\1\}",
                     re.DOTALL)
_MATRIX_DELIMITERS = {"matrix": None, "pmatrix": ("(", ")"), "bmatrix": ("[", "]"), "Bmatrix": ("\\{", "\\}"),
                      "vmatrix": ("|", "|"), "Vmatrix": ("\\Vert", "\\Vert"), "cases": ("\\{", ".")}


def _stack(cells: list[str]) -> str:
    """Cells one above the other, as mathtext can typeset them (nested \\genfrac without a rule)."""
    if len(cells) == 1:
        return cells[0]
    return "\\genfrac{}{}{0}{}{" + cells[0] + "}{" + _stack(cells[1:]) + "}"


def _matrix_to_mathtext(match: re.Match) -> str:
    environment, body = match.group(1), match.group(2)
    rows = [[cell.strip() for cell in row.split("&")] for row in re.split(r"\\\\", body) if row.strip()]
    if not rows:
        return "{}"
    width = max(len(row) for row in rows)
    columns = [_stack([row[i] if i < len(row) else "" for row in rows]) for i in range(width)]
    inner = "\\quad".join(columns)
    delimiters = _MATRIX_DELIMITERS[environment]
    return f"\\left{delimiters[0]}{inner}\\right{delimiters[1]}" if delimiters else inner


def to_mathtext(source: str) -> str:
    """The formula in the subset of LaTeX that matplotlib's mathtext typesets: matrix and cases environments
    become stacked columns between their delimiters; everything else is left as written."""
    previous = None
    while previous != source:  # innermost environments first, so nested matrices work too
        previous, source = source, _MATRIX.sub(_matrix_to_mathtext, source, count=1)
    return source


def latex_renders(source: str) -> bool:
    """Whether the formula typesets: matplotlib's mathtext parses it (after `to_mathtext`)."""
    from matplotlib.mathtext import MathTextParser

    try:
        MathTextParser("path").parse(f"${to_mathtext(source)}$")
        return True
    except Exception:  # mathtext raises ValueError and pyparsing errors for bad input
        return False


def score_latex(predicted: str, truth: str) -> Score:
    """Correct on a normalized exact match; also the edit distance and whether the prediction renders."""
    from rapidfuzz.distance import Levenshtein

    a, b = normalize_latex(predicted), normalize_latex(truth)
    distance = Levenshtein.distance(a, b)
    similarity = 1 - distance / max(len(a), len(b), 1)
    return Score(similarity, a == b, {"edit_distance": distance, "renders": latex_renders(predicted)})


# --- receipts -------------------------------------------------------------------------------------

_KEY_ALIASES = {
    "store": ("store", "storename", "merchant", "shop", "vendor", "name", "business"),
    "date": ("date", "purchasedate", "transactiondate"),
    "time": ("time", "timestamp", "purchasetime", "transactiontime"),
    "items": ("items", "lineitems", "products", "purchases"),
    "subtotal": ("subtotal", "sub_total", "net"),
    "tax": ("tax", "salestax", "vat", "taxamount"),
    "total": ("total", "totalamount", "grandtotal", "amount", "totaldue"),
}
_ITEM_ALIASES = {
    "name": ("name", "item", "description", "product", "itemname"),
    "quantity": ("quantity", "qty", "count"),
    "price": ("price", "total", "amount", "lineprice", "totalprice"),
}


def _key(text: str) -> str:
    return re.sub(r"[^a-z]", "", text.lower())


def _pick(record: dict, aliases: tuple[str, ...]) -> Any:
    keys = {_key(k): v for k, v in record.items()}
    for alias in aliases:
        if _key(alias) in keys:
            return keys[_key(alias)]
    return None


def to_money(value: Any) -> Decimal | None:
    """'$3.49', '3.49', 3.49 -> Decimal('3.49'); anything else -> None."""
    if value is None or isinstance(value, bool):
        return None
    text = re.sub(r"[^\d.\-]", "", str(value))
    try:
        return Decimal(text).quantize(Decimal("0.01"))
    except InvalidOperation:
        return None


def to_iso_date(value: Any) -> str | None:
    """Most written dates -> 'YYYY-MM-DD' (month first when ambiguous, as on US receipts)."""
    from dateutil import parser as date_parser

    if not value:
        return None
    try:
        return date_parser.parse(str(value), default=datetime(2000, 1, 1)).date().isoformat()
    except (ValueError, OverflowError):
        return None


def to_hhmm(value: Any) -> str | None:
    """'2:32 PM', '14:32:05', '2024-03-15 14:32' -> '14:32'."""
    if not value:
        return None
    try:
        return str(parsing.parse_clock_time(str(value)))
    except parsing.ParseError:
        return None


def receipt_fields(receipt: dict) -> dict[str, Any]:
    """Flatten a receipt (ground truth or model JSON) to comparable fields: header fields and one per item."""
    fields: dict[str, Any] = {
        "store": (str(_pick(receipt, _KEY_ALIASES["store"]) or "").strip().lower() or None),
        "date": to_iso_date(_pick(receipt, _KEY_ALIASES["date"])),
        "time": to_hhmm(_pick(receipt, _KEY_ALIASES["time"])),
        "subtotal": to_money(_pick(receipt, _KEY_ALIASES["subtotal"])),
        "tax": to_money(_pick(receipt, _KEY_ALIASES["tax"])),
        "total": to_money(_pick(receipt, _KEY_ALIASES["total"])),
    }
    items = _pick(receipt, _KEY_ALIASES["items"])
    for item in items if isinstance(items, list) else []:
        if not isinstance(item, dict):
            continue
        name = str(_pick(item, _ITEM_ALIASES["name"]) or "").strip().lower()
        if not name:
            continue
        quantity = _pick(item, _ITEM_ALIASES["quantity"])
        try:
            quantity = int(float(quantity)) if quantity is not None else None
        except (TypeError, ValueError):
            quantity = None
        fields[f"item:{name}:quantity"] = quantity
        fields[f"item:{name}:price"] = to_money(_pick(item, _ITEM_ALIASES["price"]))
    return {k: v for k, v in fields.items() if v is not None}


@lru_cache(maxsize=None)
def load_schema(name: str) -> dict:
    """A JSON Schema shipped in the package (`receipt` or `ground_truth`)."""
    return json.loads(resources.files(__package__).joinpath(f"schemas/{name}.schema.json").read_text())


def receipt_schema_errors(receipt: Any) -> list[str]:
    """What is wrong with a model's receipt JSON by the receipt schema (empty when valid)."""
    import jsonschema

    validator = jsonschema.Draft202012Validator(load_schema("receipt"))
    return [f"{'/'.join(map(str, e.path)) or '(root)'}: {e.message}" for e in validator.iter_errors(receipt)]


def score_receipt(predicted: Any, truth: dict) -> Score:
    """Field-level precision, recall and F1; money as decimals, dates and times normalized, items by name."""
    got = receipt_fields(predicted) if isinstance(predicted, dict) else {}
    want = receipt_fields(truth)
    right = [k for k, v in got.items() if k in want and want[k] == v]
    precision = len(right) / len(got) if got else 0.0
    recall = len(right) / len(want)
    f1 = 2 * precision * recall / (precision + recall) if right else 0.0
    errors = receipt_schema_errors(predicted)
    return Score(f1, f1 == 1.0, {
        "precision": precision, "recall": recall, "f1": f1,
        "schema_valid": not errors, "schema_errors": errors[:5],
        "missing": sorted(k for k in want if k not in right),
    })


# --- one entry point ------------------------------------------------------------------------------


def parse_answer(question: dict, text: str) -> Any:
    """Parse `text` the way the question's kind needs; raises ParseError."""
    kind = question["kind"]
    if kind == "number":
        return parsing.parse_number(text)
    if kind == "clock":
        return tuple(parsing.parse_clock_time(text))
    if kind == "latex":
        return parsing.extract_latex(text)
    if kind == "receipt":
        return parsing.extract_json(text)
    if kind == "choice":
        return find_choice(text, question["options"])
    if kind == "order":
        return find_order(text, question["answer"])
    if kind == "keywords":
        return text
    raise ValueError(f"unknown answer kind {kind!r}")


def score_parsed(question: dict, parsed: Any) -> Score:
    """Score an already parsed answer against the question's ground truth."""
    kind, truth = question["kind"], question["answer"]
    if kind == "number":
        return score_number(parsed, truth, question.get("tolerance", 0.0))
    if kind == "clock":
        return score_clock(parsed, (truth["hour"], truth["minute"]), question.get("tolerance", 1))
    if kind == "latex":
        return score_latex(parsed, truth)
    if kind == "receipt":
        return score_receipt(parsed, truth)
    if kind == "choice":
        return score_choice(parsed, truth)
    if kind == "order":
        return score_order(parsed, truth)
    if kind == "keywords":
        return score_keywords(parsed, truth)
    raise ValueError(f"unknown answer kind {kind!r}")


# The details each kind of answer adds to a results row. An answer that could not be parsed gets them empty, so a
# results table has the same columns whatever the model said (a model that never answers included).
DETAIL_KEYS: dict[str, tuple[str, ...]] = {
    "number": ("abs_error",),
    "clock": ("error_minutes",),
    "latex": ("edit_distance", "renders"),
    "receipt": ("precision", "recall", "f1", "schema_valid", "schema_errors", "missing"),
    "choice": (),
    "order": ("pairs_right", "pairs"),
    "keywords": ("keywords_found",),
}


def unparsed_score(question: dict) -> Score:
    """The score of an answer that could not be parsed: 0, with the kind's details left empty."""
    return Score(0.0, False, dict.fromkeys(DETAIL_KEYS[question["kind"]]))


def score_answer(question: dict, text: str) -> tuple[Any, Score, str | None]:
    """(parsed, score, error): a parse failure scores 0 and reports why, never raises."""
    try:
        parsed = parse_answer(question, text)
    except parsing.ParseError as err:
        return None, unparsed_score(question), str(err)
    return parsed, score_parsed(question, parsed), None
