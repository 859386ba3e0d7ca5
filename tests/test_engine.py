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
    # it leaves the line at once (the engine has not started yet): ended, counted, and the one behind moves up
    assert second.done and engine.waiting() == 2 and third.position == 2
    assert engine.stats()["cancelled"] == 1
    engine.gate.set()
    third_events = list(third)
    assert [e.position for e in third_events if isinstance(e, Queued)] == [3, 2, 1]
    # dropped without running: not a single token generated for it
    assert [(e.finish_reason, e.completion_tokens) for e in second if isinstance(e, Done)] == [("cancelled", 0)]
    assert text_of(list(first)) == text_of(third_events)


def test_a_cancelled_request_leaves_room_in_a_full_line(vlm, photo):
    import threading

    from llama_vision_helpers.engine import Engine, EngineBusy

    gate = threading.Event()

    class Gated:
        def run(self, engine):
            gate.wait(60)

    engine = Engine(vlm, Gated(), max_waiting=2)
    try:
        waiting = [engine.submit([user_message(QUESTION, True)], photo, GREEDY) for _ in range(2)]
        with pytest.raises(EngineBusy):
            engine.submit([user_message(QUESTION, True)], photo, GREEDY)
        waiting[0].cancel()
        assert engine.submit([user_message(QUESTION, True)], photo, GREEDY).position == 2
    finally:
        gate.set()
        engine.close()


def test_requests_failed_by_closing_the_engine_are_counted(gated_engine, photo):
    request = gated_engine.submit([user_message(QUESTION, True)], photo, GREEDY)
    gated_engine.queue.close()
    assert isinstance(list(request)[-1], Failed) and gated_engine.stats()["failed"] == 1


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
    with pytest.raises(PromptTooLong, match="at most") as info:
        engine.submit([user_message(QUESTION, True)], photo, Sampling(max_new_tokens=engine.context_length))
    error = info.value
    assert error.limit == engine.context_length and error.max_new_tokens == engine.context_length
    assert f"at most {error.limit - error.prompt_tokens}." in str(error)


def test_a_seed_out_of_range_is_refused_before_anything_runs(vlm, photo):
    from llama_vision_helpers.generation import SettingsError

    for seed in (-1, 2**32, 2**64):
        with pytest.raises(SettingsError, match="seed must be between 0 and"):
            Sampling(seed=seed)  # the engine's requests
        with pytest.raises(SettingsError, match="seed must be between 0 and"):
            describe_image(vlm, photo, seed=seed, max_new_tokens=2, stream=False)  # the library
    Sampling(seed=2**32 - 1)


def test_a_listener_that_fails_on_its_place_leaves_the_others_places_right(vlm):
    from llama_vision_helpers.engine import RequestQueue

    def listener(fails):
        def on_event(event):
            if fails and isinstance(event, Queued) and event.position < 3:
                raise RuntimeError("the client's loop is closed")
        return on_event

    line = RequestQueue()
    requests = [Request({"input_ids": torch.ones(1, 2)}, GREEDY, vlm.processor.tokenizer, on_event=listener(name == "x"))
                for name in ("a", "b", "x", "c")]
    for request in requests:
        line.put(request)
    with pytest.warns(UserWarning, match="listener failed"):
        assert line.take_nowait() is requests[0]  # b moves to 1, x to 2 (its listener fails: it is cancelled)
    assert requests[2].done and [requests[1].position, requests[3].position] == [1, 2]


def test_if_the_scheduler_breaks_every_request_ends_and_nothing_more_is_taken(vlm, photo, monkeypatch):
    import threading

    from llama_vision_helpers.engine import Engine, EngineClosed

    taken, gate = threading.Event(), threading.Event()

    class Broken:
        def run(self, engine):
            engine.queue.take()  # one request running...
            taken.set()
            gate.wait(60)
            raise RuntimeError("out of memory")  # ...when the scheduler itself fails

    engine = Engine(vlm, Broken())
    running = engine.submit([user_message(QUESTION, True)], photo, GREEDY)
    taken.wait(60)
    waiting = engine.submit([user_message(QUESTION, True)], photo, GREEDY)
    assert engine.healthy
    reported = []
    monkeypatch.setattr(threading, "excepthook", lambda args: reported.append(args.exc_value))
    gate.set()
    engine._thread.join(60)
    assert [str(e) for e in reported] == ["out of memory"]  # the thread's own error is still reported
    for request in (running, waiting):
        assert request.done and isinstance(request.error, EngineClosed) and "out of memory" in str(request.error)
    assert not engine.healthy and engine.stats()["failed"] == 2
    with pytest.raises(EngineClosed, match="out of memory"):
        engine.submit([user_message(QUESTION, True)], photo, GREEDY)
    engine.close()  # the server's shutdown, later: the reason stays the error
    assert "out of memory" in engine.queue.closed_reason


@pytest.mark.parametrize("stops", [("world", "hello"), ("hello", "world")])
def test_of_several_stop_strings_the_first_in_the_text_ends_the_answer(vlm, stops):
    tokenizer = vlm.processor.tokenizer
    ids = tokenizer.encode("say hello world", add_special_tokens=False)
    request = Request({"input_ids": torch.ones(1, 2)}, Sampling(max_new_tokens=10, stop=stops), tokenizer)
    request.push_tokens(0, ids)  # one push brings both stop strings
    request.finish(0, "length")
    assert text_of(list(request)) == "say "


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
