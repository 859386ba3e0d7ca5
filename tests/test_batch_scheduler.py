"""The engine with the batched scheduler on CPU: concurrent requests get exactly what they get alone."""

import threading

import pytest
from PIL import Image

from llama_vision_helpers.batch_scheduler import BatchScheduler
from llama_vision_helpers.engine import Delta, Done, Engine, Failed, Queued, Sampling
from llama_vision_helpers.generation import PromptTooLong, SettingsError, answer_messages, user_message


def text_of(events, index=0):
    return "".join(e.text for e in events if isinstance(e, Delta) and e.index == index)


class Gated(BatchScheduler):
    """A batched scheduler that starts only when the test opens the gate, so requests queue up before it runs."""

    def __init__(self, gate: threading.Event, **options) -> None:
        super().__init__(**options)
        self.gate = gate

    def run(self, engine):
        self.gate.wait(30)
        super().run(engine)


@pytest.fixture(scope="module")
def batched(vlm):
    engine = Engine(vlm, BatchScheduler(max_batch=3))
    yield engine
    engine.close()


@pytest.fixture
def conversations(photo):
    other = Image.new("RGB", (90, 160), "black")
    other.paste((250, 200, 10), (10, 30, 70, 120))
    return [
        ([user_message("Describe the image.", True)], photo, 20),
        ([user_message("Tell me a story about a fox and a dog, please.", False)], None, 9),
        ([user_message("What colour is the square in this picture?", True)], other, 30),
        ([user_message("Count to ten.", False)], None, 14),
        ([user_message("Describe the image.", True)], other, 11),
    ]


def solo(vlm, messages, image, max_new_tokens, **settings):
    """The library's answer, computed alone by `generate` (an independent path)."""
    return answer_messages(vlm, messages, image, do_sample=False, max_new_tokens=max_new_tokens, **settings)[0]


def test_concurrent_greedy_requests_get_their_solo_answers(batched, vlm, conversations):
    requests = [batched.submit(messages, image, Sampling(max_new_tokens=n, do_sample=False))
                for messages, image, n in conversations]  # five requests for three slots
    for request, (messages, image, n) in zip(requests, conversations):
        events = list(request)
        assert isinstance(events[-1], Done) and events[-1].finish_reason in ("stop", "length")
        assert text_of(events) == solo(vlm, messages, image, n)


def test_a_stop_string_and_a_cancel_leave_their_slots(batched, vlm, conversations):
    messages, image, _ = conversations[0]
    full = solo(vlm, messages, image, 20)
    stop = full[4:7]
    stopped = batched.submit(messages, image, Sampling(max_new_tokens=20, do_sample=False, stop=(stop,)))
    cancelled = batched.submit(*conversations[1][:2], Sampling(max_new_tokens=400, do_sample=False))
    others = [batched.submit(m, i, Sampling(max_new_tokens=n, do_sample=False)) for m, i, n in conversations[2:]]
    for event in cancelled:
        if isinstance(event, Delta):
            cancelled.cancel()
        last = event
    assert last.finish_reason == "cancelled" and last.completion_tokens < 400
    events = list(stopped)
    assert text_of(events) == full[:full.index(stop)] and events[-1].finish_reason == "stop"
    for request, (m, i, n) in zip(others, conversations[2:]):
        assert text_of(list(request)) == solo(vlm, m, i, n)


def test_a_seeded_request_samples_the_same_alone_and_in_a_crowd(batched, conversations):
    messages, image, _ = conversations[0]
    sampled = Sampling(max_new_tokens=12, temperature=1.5, min_p=0.1, seed=11, num_samples=2)
    alone = list(batched.submit(messages, image, sampled))
    crowd = [batched.submit(m, i, Sampling(max_new_tokens=n, do_sample=False)) for m, i, n in conversations[1:3]]
    in_crowd = list(batched.submit(messages, image, sampled))
    answers = [text_of(alone, 0), text_of(alone, 1)]
    assert [text_of(in_crowd, 0), text_of(in_crowd, 1)] == answers and answers[0] != answers[1]
    for other in crowd:
        list(other)


def test_requests_wait_for_a_free_slot_and_learn_their_place(vlm, conversations):
    gate = threading.Event()
    engine = Engine(vlm, Gated(gate, max_batch=1))
    try:
        messages, image, _ = conversations[0]
        requests = [engine.submit(messages, image, Sampling(max_new_tokens=30, min_new_tokens=30, do_sample=False))
                    for _ in range(3)]
        gate.set()
        first = []
        for event in requests[0]:
            first.append(event)
            if len(first) == 3:  # Queued, then two tokens' text: the first request runs in the only slot
                break
        assert engine.waiting() == 2 and requests[2].position == 2  # the others keep their places in line
        events = [first + list(requests[0])] + [list(request) for request in requests[1:]]
        assert [[e.position for e in ev if isinstance(e, Queued)] for ev in events] == [[1], [2, 1], [3, 2, 1]]
        assert text_of(events[0]) == text_of(events[1]) == text_of(events[2])
        with pytest.raises(SettingsError, match="ask for fewer"):  # once the slots are known, before it is queued
            engine.submit(messages, image, Sampling(max_new_tokens=4, num_samples=2))
    finally:
        engine.close()


def unknown_tokens(engine, messages, image):
    """A request with token ids the model does not have: its prefill raises."""
    bad = engine.prepare(messages, image, Sampling(max_new_tokens=5, do_sample=False))
    bad.inputs["input_ids"][:] = 10**7
    engine.queue.put(bad)
    return bad


def two_conversations(engine, messages, image):
    """A request whose inputs hold two conversations: making its slot raises."""
    bad = engine.prepare(messages, image, Sampling(max_new_tokens=5, do_sample=False))
    bad.inputs = {name: value.repeat(2, *[1] * (value.dim() - 1)) for name, value in bad.inputs.items()}
    engine.queue.put(bad)
    return bad


def more_answers_than_slots(engine, messages, image):
    """Two answers for one slot, asked before the scheduler knows its slots (afterwards `prepare` refuses it)."""
    return engine.submit(messages, image, Sampling(max_new_tokens=4, num_samples=2))


@pytest.mark.parametrize("spoil, max_batch, error", [
    (unknown_tokens, 3, "index out of range"), (two_conversations, 3, "one conversation"),
    (more_answers_than_slots, 1, "ask for fewer")])
def test_a_request_that_fails_on_its_own_fails_alone(vlm, conversations, spoil, max_batch, error):
    """Both wait in the queue, so they join at the same step; only the one at fault fails, and the engine goes on."""
    gate = threading.Event()
    engine = Engine(vlm, Gated(gate, max_batch=max_batch))
    try:
        messages, image, n = conversations[2]
        bad = spoil(engine, messages, image)
        good = engine.submit(messages, image, Sampling(max_new_tokens=n, do_sample=False))
        gate.set()
        failure = list(bad)[-1]
        assert isinstance(failure, Failed) and error in str(failure.error)
        assert text_of(list(good)) == solo(vlm, messages, image, n) and engine.healthy
    finally:
        engine.close()


def test_the_engine_refuses_what_a_slot_cannot_hold(vlm, conversations):
    messages, image, _ = conversations[0]
    engine = Engine(vlm, BatchScheduler(max_batch=2, slot_length=128))
    try:
        assert engine.context_length == 128
        request = engine.prepare(messages, image, Sampling(max_new_tokens=1000), fit_max_tokens=True)
        assert request.prompt_tokens + request.sampling.max_new_tokens == 128  # lowered to what a slot holds
        with pytest.raises(PromptTooLong, match="context this engine holds per answer of 128 tokens"):
            engine.prepare(messages, image, Sampling(max_new_tokens=128 - request.prompt_tokens + 1))
        forced = 128 - request.prompt_tokens
        done = list(engine.submit(messages, image, Sampling(max_new_tokens=forced, min_new_tokens=forced,
                                                            do_sample=False)))[-1]
        assert (done.finish_reason, done.completion_tokens) == ("length", forced)  # every token it was promised
    finally:
        engine.close()


class Recording(Gated):
    """A gated scheduler that records how many requests join at each step."""

    def __init__(self, gate: threading.Event, **options) -> None:
        super().__init__(gate, **options)
        self.joined: list[int] = []

    def _admit(self, requests):
        if requests:
            self.joined.append(len(requests))
        super()._admit(requests)


def test_a_crowd_joins_a_prefill_at_a_time(vlm, conversations, monkeypatch):
    """Five waiting requests, two slots a prefill: they join in three groups, with decode steps between, and
    each still gets its solo answer."""
    from llama_vision_helpers import batch_scheduler

    monkeypatch.setattr(batch_scheduler, "PREFILL_GROUP", 2)
    gate = threading.Event()
    scheduler = Recording(gate, max_batch=5)
    engine = Engine(vlm, scheduler)
    try:
        requests = [engine.submit(messages, image, Sampling(max_new_tokens=n, do_sample=False))
                    for messages, image, n in conversations]
        gate.set()
        for request, (messages, image, n) in zip(requests, conversations):
            assert text_of(list(request)) == solo(vlm, messages, image, n)
        assert scheduler.joined == [2, 2, 1]
    finally:
        engine.close()


def test_a_request_with_several_answers_does_not_overfill_a_prefill(vlm, conversations, monkeypatch):
    """Two slots a prefill: a request with two answers does not join one that already has a request (it joins
    the next); one with more answers than that would join alone."""
    from llama_vision_helpers import batch_scheduler

    monkeypatch.setattr(batch_scheduler, "PREFILL_GROUP", 2)
    gate = threading.Event()
    scheduler = Recording(gate, max_batch=5)
    engine = Engine(vlm, scheduler)
    try:
        messages, image, _ = conversations[1]
        settings = [Sampling(max_new_tokens=3, do_sample=False), Sampling(max_new_tokens=3, num_samples=2),
                    Sampling(max_new_tokens=3, num_samples=3)]
        requests = [engine.submit(messages, image, one) for one in settings]
        gate.set()
        assert all(isinstance(list(request)[-1], Done) for request in requests)
        assert scheduler.joined == [1, 1, 1]
    finally:
        engine.close()


def test_the_scheduler_is_chosen_from_max_batch(vlm):
    from llama_vision_helpers.batch_scheduler import scheduler_for
    from llama_vision_helpers.engine import SerialScheduler

    assert isinstance(scheduler_for(vlm), SerialScheduler)  # a CPU: one at a time unless asked
    assert isinstance(scheduler_for(vlm, 1), SerialScheduler)
    batched = scheduler_for(vlm, 4)
    assert isinstance(batched, BatchScheduler) and batched.max_batch == 4
    with pytest.raises(ValueError, match="at least 1"):
        scheduler_for(vlm, 0)
