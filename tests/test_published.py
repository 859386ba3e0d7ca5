"""Every published answer of the real model, graded by our parsers and scorers as the person graded it."""

import pytest

from llama_vision_helpers.inputs import TASKS
from llama_vision_helpers.published import (
    ANSWERS, GRADES, NOT_SCORED, SOURCES, grade_published, published_answer, published_answers, published_table,
)
from llama_vision_helpers.scoring import parse_answer

SCORED = [a for a in ANSWERS if a.question is not None]
EXTRACTED = [a for a in SCORED if a.reads_as is not None]


@pytest.mark.parametrize("answer", EXTRACTED, ids=[a.id for a in EXTRACTED])
def test_our_parser_reads_what_a_careful_reader_reads(answer):
    parsed = parse_answer(answer.question, answer.answer)
    assert parsed == (pytest.approx(answer.reads_as) if isinstance(answer.reads_as, (int, float)) else answer.reads_as)


@pytest.mark.parametrize("answer", SCORED, ids=[a.id for a in SCORED])
def test_our_verdict_is_the_persons_grade(answer):
    graded = grade_published(answer)
    assert graded.error is None
    assert graded.verdict == answer.grade, str(graded)
    assert graded.agrees


@pytest.mark.parametrize("answer", ANSWERS, ids=[a.id for a in ANSWERS])
def test_every_answer_is_attributed_and_graded(answer):
    assert answer.source in SOURCES.values()
    assert answer.grade in GRADES and answer.grade_reason
    assert answer.prompt and answer.answer == answer.answer.strip() and answer.picture
    assert "<|eot_id|>" not in answer.answer
    assert answer.task is None or answer.task in TASKS
    citation = answer.citation
    assert answer.source.model in citation and answer.source.precision in citation
    assert f"max_new_tokens={answer.max_new_tokens}" in citation


def test_free_text_is_not_scored():
    graded = grade_published(published_answer("rocm-market-share-trend"))
    assert graded.verdict == NOT_SCORED and graded.agrees is None and graded.read_as == "(free text)"


def test_selection_by_task_and_source():
    assert {a.id for a in published_answers("charts")} == {"rocm-car-vs-walk", "rocm-market-share-trend",
                                                           "rocm-revenue-sort"}
    assert [a.source.key for a in published_answers(source="unsloth-gradio")] == ["unsloth-gradio"]
    with pytest.raises(ValueError, match="choose one of"):
        published_answers(source="nowhere")
    with pytest.raises(KeyError, match="rocm-revenue-sort"):
        published_answer("nope")


def test_table_has_one_row_per_answer_and_no_missing_values():
    table = published_table()
    assert list(table["id"]) == [a.id for a in ANSWERS]
    assert not table.isna().any().any()
