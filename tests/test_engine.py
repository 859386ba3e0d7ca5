"""The engine: a queue and a scheduler thread that run prepared requests and stream their text."""

import pytest
import torch

from llama_vision_helpers import describe_image
from llama_vision_helpers.engine import Delta, Done, Failed, PromptTooLong, Queued, Request, Sampling
from llama_vision_helpers.generation import user_message

QUESTION = "Describe the image accurately."
GREEDY = Sampling(max_new_tokens=12, do_sample=False)


def text_of(events, index=0):
    return "".join(e.text for e in events if isinstance(e, Delta) and e.index == index)


def test_a_greedy_request_streams_the_library_answer(engine, vlm, photo):
    events = list(engine.submit([user_message(QUESTION, True)], photo, GREEDY))
    assert isinstance(events[0], Queued) and isinstance(events[-1], Done)
    assert text_of(events) == describe_image(vlm, photo, QUESTION, do_sample=False, max_new_tokens=12, stream=False)
    assert events[-1].completion_tokens <= 12


def test_samples_with_a_seed_match_the_library(engine, vlm, photo):
    answers = engine.answers([user_message(QUESTION, True)], photo, num_samples=3, seed=4, max_new_tokens=8)
    assert answers == describe_image(vlm, photo, QUESTION, num_samples=3, seed=4, max_new_tokens=8, stream=False)


def test_a_stop_string_ends_the_answer_before_it(engine, vlm, photo):
    full = describe_image(vlm, photo, QUESTION, do_sample=False, max_new_tokens=12, stream=False)
    stop = full[4:7]
    events = list(engine.submit([user_message(QUESTION, True)], photo, Sampling(max_new_tokens=12, do_sample=False,
                                                                              stop=(stop,))))
    assert text_of(events) == full[:full.index(stop)]
    assert events[-1].finish_reason == "stop"


def test_waiting_requests_learn_their_place_and_a_cancelled_one_is_dropped(gated_engine, photo):
    engine = gated_engine
    first, second, third = (engine.submit([user_message(QUESTION, True)], photo, GREEDY) for _ in range(3))
    assert (first.position, second.position, third.position) == (1, 2, 3) and engine.waiting() == 3
    second.cancel()
    engine.gate.set()
    third_events = list(third)
    assert [e.position for e in third_events if isinstance(e, Queued)] == [3, 1]  # the cancelled one no longer counts
    # dropped without running: not a single token generated for it
    assert [(e.finish_reason, e.completion_tokens) for e in second if isinstance(e, Done)] == [("cancelled", 0)]
    assert text_of(list(first)) == text_of(third_events)


def test_cancelling_a_running_request_frees_the_engine(engine, photo):
    long = Sampling(max_new_tokens=400, do_sample=False)
    request = engine.submit([user_message(QUESTION, True)], photo, long)
    for event in request:
        if isinstance(event, Delta):
            request.cancel()
        if isinstance(event, Done):
            assert event.finish_reason == "cancelled" and event.completion_tokens < 400
    assert list(engine.submit([user_message(QUESTION, True)], photo, GREEDY))[-1].finish_reason in ("stop", "length")


def test_a_failing_request_is_reported_and_the_engine_keeps_serving(engine, photo):
    request = engine.prepare([user_message(QUESTION, True)], photo, GREEDY)
    request.inputs["input_ids"][:] = 10**7  # no such token: the model raises
    engine.queue.put(request)
    assert isinstance(list(request)[-1], Failed)
    assert isinstance(list(engine.submit([user_message(QUESTION, True)], photo, GREEDY))[-1], Done)


def test_a_prompt_longer_than_the_context_is_refused(engine, photo):
    with pytest.raises(PromptTooLong, match="at most"):
        engine.submit([user_message(QUESTION, True)], photo, Sampling(max_new_tokens=engine.context_length))


def test_request_is_usable_by_any_scheduler_without_a_model(vlm):
    """What a scheduler relies on: push_tokens answers whether the row wants more, finish counts tokens."""
    tokenizer = vlm.processor.tokenizer
    ids = tokenizer.encode(" one two three", add_special_tokens=False)
    request = Request({"input_ids": torch.ones(1, 2)}, Sampling(max_new_tokens=10, stop=("two",)), tokenizer)
    wants = [request.push_tokens(0, [token]) for token in ids]
    request.finish(0, "length")
    events = list(request)
    assert wants[-1] is False and text_of(events).strip() == "one"
    assert events[-1] == Done(0, "stop", wants.index(False) + 1)  # tokens after the stop are refused
