"""Pull structured answers out of free model text: JSON, LaTeX, clock times and numbers.

Every parser raises `ParseError` when it finds nothing; the error keeps the raw text.
"""

from __future__ import annotations

import re
from typing import Any, Callable, NamedTuple, TypeVar


class ParseError(ValueError):
    """No answer of the expected kind was found; `raw_text` is the model's text, untouched."""

    def __init__(self, kind: str, raw_text: str, reason: str = "") -> None:
        self.kind = kind
        self.raw_text = raw_text
        preview = raw_text.strip().replace("\n", " ")[:80]
        super().__init__(f"no {kind} found{': ' + reason if reason else ''} in {preview!r}")


# --- the conclusion of a worked answer ------------------------------------------------------------

_BOLD = re.compile(r"\*\*([^*]+)\*\*")
# A bold line that names a step or a section ("**Step 3: Subtract ...**", "**Company A:**") is a heading, not
# the answer.
_HEADING = re.compile(r"^\s*(?:step|part|stage|phase)\b|:\s*$", re.I)
# Words that introduce the conclusion of a worked answer.
CONCLUSION_CUES = re.compile(
    r"=|\bequals\b|\banswer\b|\bresult\b|\bfinal\b|\btherefore\b|\bthus\b|\bhence\b|\bso\b"
    r"|\bin conclusion\b|\bin total\b|\bin summary\b",
    re.I,
)
T = TypeVar("T")


def answer_bolds(text: str) -> list[str]:
    """The bold spans of `text` that are not headings, in order."""
    return [bold for bold in _BOLD.findall(text) if not _HEADING.search(bold)]


def read_conclusion(text: str, find: Callable[[str], T | None]) -> T | None:
    """What `find` reads where a careful grader looks for the answer of a worked answer (steps, lists, repeats).

    In order: after the last conclusion cue where `find` reads something ('=', 'answer', 'therefore', 'so', ...),
    a bold answer there first; else the last bold span that is not a step heading. None when neither has one.
    """
    for cue in reversed(list(CONCLUSION_CUES.finditer(text))):
        segment = text[cue.end():]
        for part in [*answer_bolds(segment), segment]:
            value = find(part)
            if value is not None:
                return value
    for bold in reversed(answer_bolds(text)):
        value = find(bold)
        if value is not None:
            return value
    return None


# --- JSON -----------------------------------------------------------------------------------------

_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[ \t]*\n?(.*?)(?:```|\Z)", re.DOTALL)


def _balanced_spans(text: str) -> list[str]:
    """Every top-level {...} or [...] span (quotes respected); an unclosed one runs to the end."""
    spans, depth, start, quote, escaped = [], 0, None, None, False
    for i, char in enumerate(text):
        if quote:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == quote:
                quote = None
            continue
        if char in "\"'" and depth:
            # an apostrophe inside a word ("it's") is not a quote
            if char == "'" and i > 0 and text[i - 1].isalnum():
                continue
            quote = char
        elif char in "{[":
            if depth == 0:
                start = i
            depth += 1
        elif char in "}]" and depth:
            depth -= 1
            if depth == 0:
                spans.append(text[start : i + 1])
    if depth and start is not None:
        spans.append(text[start:])
    return spans


def _repair(candidate: str) -> Any:
    import json_repair

    value = json_repair.loads(candidate)
    return value if isinstance(value, (dict, list)) and value else None


def extract_json(text: str) -> Any:
    """The first JSON object or array in `text`: fenced blocks first, then bare ones in the prose.

    Tolerates what models write: trailing commas, single quotes, comments, a truncated end.
    """
    candidates = [body for lang, body in _FENCE.findall(text) if lang.lower() in ("", "json", "json5", "javascript")]
    candidates += _balanced_spans(text)
    for candidate in candidates:
        for span in [candidate, *_balanced_spans(candidate)]:
            value = _repair(span)
            if value is not None:
                return value
    raise ParseError("JSON", text)


# --- LaTeX ----------------------------------------------------------------------------------------

_LATEX_PATTERNS = [
    re.compile(r"```[ \t]*(?:latex|tex|math)[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL | re.IGNORECASE),
    re.compile(r"\$\$(.+?)\$\$", re.DOTALL),
    re.compile(r"\\\[(.+?)\\\]", re.DOTALL),
    re.compile(r"\\begin\{(equation\*?|align\*?|displaymath)\}(.*?)(?:\\end\{\1\}|\Z)", re.DOTALL),
    re.compile(r"\\\((.+?)\\\)", re.DOTALL),
    re.compile(r"`([^`\n]*\\[A-Za-z][^`\n]*)`"),
    re.compile(r"(?<![\\$])\$([^$\n]+?)\$(?!\$)"),
    re.compile(r"```[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL),
]
_COMMAND = re.compile(r"\\[A-Za-z]+|[\^_]\{")


def _strip_math_delimiters(body: str) -> str:
    body = body.strip()
    for opener, closer in (("$$", "$$"), ("\\[", "\\]"), ("\\(", "\\)"), ("$", "$")):
        if body.startswith(opener) and body.endswith(closer) and len(body) > len(opener) + len(closer):
            return body[len(opener) : -len(closer)].strip()
    match = re.fullmatch(r"\\begin\{(equation\*?|align\*?)\}(.*?)(?:\\end\{\1\})?", body, re.DOTALL)
    return match.group(2).strip() if match else body


def extract_latex(text: str) -> str:
    """The LaTeX of the first displayed or inline formula in `text`, without its delimiters."""
    for pattern in _LATEX_PATTERNS:
        match = pattern.search(text)
        if match:
            body = match.group(match.lastindex)
            body = _strip_math_delimiters(body)
            if body:
                return body
    # An answer that is just the formula, with no delimiters at all.
    lines = [line.strip() for line in text.strip().splitlines() if _COMMAND.search(line)]
    if lines:
        return lines[0].rstrip(".")
    raise ParseError("LaTeX", text)


# --- clock times ----------------------------------------------------------------------------------


class ClockTime(NamedTuple):
    """A time of day; `hour` is 0-23 when AM/PM was given or implied, else as read (1-12)."""

    hour: int
    minute: int

    def __str__(self) -> str:
        return f"{self.hour:02d}:{self.minute:02d}"


_NUMBER_WORDS = {
    "zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8,
    "nine": 9, "ten": 10, "eleven": 11, "twelve": 12, "thirteen": 13, "fourteen": 14, "fifteen": 15,
    "sixteen": 16, "seventeen": 17, "eighteen": 18, "nineteen": 19, "twenty": 20, "thirty": 30,
    "forty": 40, "fifty": 50, "sixty": 60, "seventy": 70, "eighty": 80, "ninety": 90,
}
_WORD_NUMBER = r"(?:(?:twenty|thirty|forty|fifty)[- ](?:one|two|three|four|five|six|seven|eight|nine)|" + "|".join(
    sorted(_NUMBER_WORDS, key=len, reverse=True)) + r")"


def words_to_int(words: str) -> int:
    """'twenty-five' -> 25, '7' -> 7."""
    words = words.strip().lower()
    if words.isdigit():
        return int(words)
    return sum(_NUMBER_WORDS[part] for part in re.split(r"[- ]+", words) if part)


_HHMM = re.compile(r"\b([01]?\d|2[0-3])\s*[:.h]\s*([0-5]\d)(?:\s*[:.]\s*[0-5]\d)?\s*([ap]\.?\s?m\.?)?(?![\w.]*\d)", re.I)
_OCLOCK = re.compile(rf"\b(\d{{1,2}}|{_WORD_NUMBER})\s*o'?\s*clock\b\s*([ap]\.?\s?m\.?)?", re.I)
_RELATIVE = re.compile(
    rf"\b(quarter|half|\d{{1,2}}|{_WORD_NUMBER})(?:\s+minutes?)?\s+(past|after|to|before|till)\s+(\d{{1,2}}|{_WORD_NUMBER})\b"
    r"(?:\s*o'?\s*clock)?\s*([ap]\.?\s?m\.?)?",
    re.I,
)
_HOUR_AMPM = re.compile(r"\b(\d{1,2})\s*([ap]\.?\s?m\.?)(?!\w)", re.I)


def _apply_meridiem(hour: int, meridiem: str | None) -> int:
    if not meridiem:
        return hour
    pm = meridiem.lower().startswith("p")
    hour %= 12
    return hour + 12 if pm else hour


def parse_clock_time(text: str) -> ClockTime:
    """Read a time of day from text: '10:10', '10:10 PM', '14:05', 'ten past ten', 'quarter to three', 'noon'.

    A worked answer is read at its conclusion (`read_conclusion`), else the first time in the text counts.
    """
    time = read_conclusion(text, _first_clock_time)
    if time is None:
        time = _first_clock_time(text)
    if time is None:
        raise ParseError("clock time", text)
    return time


def _first_clock_time(text: str) -> ClockTime | None:
    match = _HHMM.search(text)
    if match:
        return ClockTime(_apply_meridiem(int(match.group(1)), match.group(3)), int(match.group(2)))
    match = _RELATIVE.search(text)
    if match:
        amount, direction, hour_word, meridiem = match.groups()
        minutes = {"quarter": 15, "half": 30}.get(amount.lower(), None)
        minutes = words_to_int(amount) if minutes is None else minutes
        hour = words_to_int(hour_word)
        if minutes < 60 and 1 <= hour <= 24:
            if direction.lower() in ("to", "before", "till"):
                hour, minutes = (hour - 1) or 12, 60 - minutes
                if minutes == 60:
                    minutes = 0
            return ClockTime(_apply_meridiem(hour, meridiem), minutes)
    match = _OCLOCK.search(text)
    if match:
        return ClockTime(_apply_meridiem(words_to_int(match.group(1)), match.group(2)), 0)
    if re.search(r"\bnoon\b|\bmidday\b", text, re.I):
        return ClockTime(12, 0)
    if re.search(r"\bmidnight\b", text, re.I):
        return ClockTime(0, 0)
    match = _HOUR_AMPM.search(text)
    if match and 1 <= int(match.group(1)) <= 12:
        return ClockTime(_apply_meridiem(int(match.group(1)), match.group(2)), 0)
    return None


# --- numbers --------------------------------------------------------------------------------------

_NUMBER = re.compile(r"(?<![\w.])[-−–]?\s?[$€£]?\s?\d{1,3}(?:,\d{3})+(?:\.\d+)?(?!\d)|(?<![\w.])[-−–]?\s?[$€£]?\s?\d+(?:\.\d+)?")


def _numbers_in(text: str) -> list[float]:
    values = []
    for match in _NUMBER.finditer(text):
        token = re.sub(r"[\s$€£,]", "", match.group(0)).replace("−", "-").replace("–", "-")
        values.append(float(token))
    return values


def _first_number(segment: str) -> float | None:
    numbers = _numbers_in(segment)
    return numbers[0] if numbers else None


def parse_number(text: str) -> float:
    """The answer number in text, read as a careful grader reads a worked answer (`read_conclusion`: the first
    number after the last conclusion cue, a bold one first, else the last bold number that is not a step heading),
    else the last number, else the last number word. Handles 1,234.5, $3.49, -7, 42% and 'twelve'."""
    number = read_conclusion(text, _first_number)
    if number is not None:
        return number
    numbers = _numbers_in(text)
    if numbers:
        return numbers[-1]
    words = re.findall(rf"\b{_WORD_NUMBER}\b", text, re.I)
    if words:
        return float(words_to_int(words[-1]))
    raise ParseError("number", text)
