"""The OpenAI-compatible server, driven by the official openai client, against the library's own answers."""

import base64
import contextlib
import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
from PIL import Image

from llama_vision_helpers import Chat, describe_image, load_image
from llama_vision_helpers.wire import image_data_url

ROOT = Path(__file__).resolve().parents[1]
IMAGE = ROOT / "input" / "image_2.jpg"
QUESTION = "Describe the image accurately."
TOKENS = 16


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=120)


def image_part(image=IMAGE):
    return {"type": "image_url", "image_url": {"url": image_data_url(load_image(image))}}


def ask(question=QUESTION, image=IMAGE):
    return [{"role": "user", "content": [image_part(image), {"type": "text", "text": question}]}]


def greedy(client, messages, **extra):
    return client.chat.completions.create(model="tiny-random", messages=messages, temperature=0,
                                          max_tokens=TOKENS, **extra)


def test_models_lists_the_served_model(client):
    assert [model.id for model in client.models.list()] == ["tiny-random"]


def test_a_greedy_answer_is_the_library_answer(client, vlm):
    response = greedy(client, ask())
    expected = describe_image(vlm, IMAGE, QUESTION, do_sample=False, max_new_tokens=TOKENS, stream=False)
    assert response.object == "chat.completion" and response.choices[0].message.content == expected
    choice = response.choices[0]
    assert choice.finish_reason in ("stop", "length") and choice.message.role == "assistant"
    assert response.usage.completion_tokens <= TOKENS and response.usage.prompt_tokens > 5
    assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens


def test_streamed_deltas_join_to_the_same_text(client, vlm):
    expected = describe_image(vlm, IMAGE, QUESTION, do_sample=False, max_new_tokens=TOKENS, stream=False)
    chunks = list(greedy(client, ask(), stream=True, stream_options={"include_usage": True}))
    assert all(chunk.object == "chat.completion.chunk" for chunk in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens <= TOKENS


def test_the_stream_ends_with_done(server):
    body = {"model": "tiny-random", "messages": ask(), "temperature": 0, "max_tokens": 4, "stream": True}
    with httpx.stream("POST", server.url + "/chat/completions", json=body, timeout=60) as response:
        lines = [line for line in response.iter_lines() if line.startswith("data:")]
    assert lines[-1] == "data: [DONE]"


def test_n_samples_with_a_seed_are_reproducible_and_the_library_s(client, vlm):
    def sample():
        response = client.chat.completions.create(model="tiny-random", messages=ask(), n=3, seed=7, max_tokens=8,
                                                  temperature=1.5, extra_body={"min_p": 0.1})
        return [choice.message.content for choice in sorted(response.choices, key=lambda c: c.index)]

    first = sample()
    assert len(first) == 3 and sample() == first
    assert first == describe_image(vlm, IMAGE, QUESTION, num_samples=3, seed=7, max_new_tokens=8, stream=False)


def test_a_multi_turn_conversation_is_what_chat_gives(client, vlm):
    chat = Chat(vlm, IMAGE, stream=False, do_sample=False, max_new_tokens=TOKENS)
    messages = ask("What is in the picture?")
    for question in ("What is in the picture?", "And the colours?", "Say it in one word."):
        if question != "What is in the picture?":
            messages.append({"role": "user", "content": question})
        answer = greedy(client, messages).choices[0].message.content
        assert answer == chat.ask(question)
        messages.append({"role": "assistant", "content": answer})


def test_six_concurrent_clients_each_get_their_own_answer(client, vlm):
    questions = [f"Question {i}: what do you see?" for i in range(6)]
    images = [IMAGE, ROOT / "input" / "image_1.jpg"] * 3
    expected = [describe_image(vlm, image, q, do_sample=False, max_new_tokens=TOKENS, stream=False)
                for q, image in zip(questions, images)]

    def one(index):
        if index % 2:  # half of them stream
            chunks = greedy(client, ask(questions[index], images[index]), stream=True)
            return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        return greedy(client, ask(questions[index], images[index])).choices[0].message.content

    with ThreadPoolExecutor(6) as pool:
        assert list(pool.map(one, range(6))) == expected
    assert len(set(expected)) > 1  # the questions really differ in what they produce


def png_data_url(size, color="red"):
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def with_image_url(url, text="What is it?"):
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}]}]


SMALL = {"type": "image_url", "image_url": {"url": png_data_url((64, 48))}}
BAD_REQUESTS = {
    "two images": ([{"role": "user", "content": [SMALL, SMALL, {"type": "text", "text": "Hi"}]}],
                   {}, 400, "one image per conversation"),
    "image in a later turn": (
        [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi"},
         {"role": "user", "content": [SMALL, {"type": "text", "text": "And this?"}]}], {}, 400,
        "first question"),
    "system message with an image": ([{"role": "system", "content": "Be terse."}, {"role": "user", "content": [SMALL]}],
                                     {}, 400,
                                     "system message"),
    "an image that does not decode": (with_image_url("data:image/png;base64," + base64.b64encode(b"not a png")
                                                     .decode()), {}, 400, "could not be read"),
    "not base64": (with_image_url("data:image/png;base64,@@@"), {}, 400, "base64"),
    "a web image": (with_image_url("http://127.0.0.1:9/cat.png"), {}, 400, "--allow-image-urls"),
    "a file URL": (with_image_url("file:///etc/passwd"), {}, 400, "data URL"),
    "too many pixels": (with_image_url(png_data_url((1100, 1000))), {}, 400, "at most 1,000,000"),
    "a body too large": (with_image_url("data:image/png;base64," + "A" * 1_200_000), {}, 413, "larger than"),
    "a prompt longer than the context": (ask(), {"max_tokens": 5000}, 400, "Lower max_tokens to at most"),
    "greedy with n": (ask(), {"n": 2, "temperature": 0}, 400, "Ask for n=1"),
    "a seed out of range": (ask(), {"seed": 2**64}, 400, "seed must be between 0 and"),
    "a text part without text": ([{"role": "user", "content": [{"type": "text", "text": None}]}], {}, 400,
                                 "not a string"),
    "a model not served here": (ask(), {"model": "gpt-4o"}, 404, "serves 'tiny-random'"),
    "negative temperature": (ask(), {"temperature": -1}, 400, "temperature"),
    "min_p above one": (ask(), {"extra_body": {"min_p": 2}}, 400, "min_p"),
    "an unknown role": ([{"role": "robot", "content": "beep"}], {}, 400, "role"),
    "no question last": (ask() + [{"role": "assistant", "content": "Hi"}], {}, 400, "last message"),
}


@pytest.mark.parametrize("name", BAD_REQUESTS)
def test_a_bad_request_gets_its_error_and_the_server_keeps_serving(client, vlm, name):
    messages, extra, status, words = BAD_REQUESTS[name]
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(messages=messages, **{"model": "tiny-random", "max_tokens": 4, **extra})
    error = info.value
    assert error.status_code == status
    assert set(error.body) >= {"message", "type", "param", "code"}  # the client unwraps {"error": {...}}
    assert words in error.body["message"]
    # and the next request is answered as usual
    expected = describe_image(vlm, IMAGE, QUESTION, do_sample=False, max_new_tokens=4, stream=False)
    assert client.chat.completions.create(model="tiny-random", messages=ask(), temperature=0,
                                          max_tokens=4).choices[0].message.content == expected


def test_invalid_json_is_a_400_with_an_openai_body(server):
    response = httpx.post(server.url + "/chat/completions", content=b"{not json", timeout=30,
                          headers={"content-type": "application/json"})
    assert response.status_code == 400 and "JSON" in response.json()["error"]["message"]


def test_only_json_bodies_are_taken(server):
    """A web page can send a text/plain body anywhere without asking first; this server does not take one."""
    response = httpx.post(server.url + "/chat/completions", timeout=30, headers={"content-type": "text/plain"},
                          content=b'{"model": "tiny-random", "messages": [{"role": "user", "content": "Hi"}]}')
    assert response.status_code == 415 and "Content-Type: application/json" in response.json()["error"]["message"]


def test_a_server_on_this_machine_answers_only_to_this_machine_s_names(server):
    """DNS rebinding: a page whose own name now points at 127.0.0.1 gets nothing from a server bound there."""
    base = server.url.removesuffix("/v1")
    assert httpx.get(base + "/health", headers={"host": "evil.example"}, timeout=10).status_code == 400
    for name in ("localhost", "127.0.0.1", "[::1]"):
        assert httpx.get(base + "/health", headers={"host": f"{name}:{server.port}"}, timeout=10).status_code == 200


def test_a_client_that_hangs_up_frees_the_engine(client, server):
    before = server.health()
    stream = client.chat.completions.create(model="tiny-random", messages=ask(), max_tokens=3000, stream=True,
                                            temperature=1.5, seed=1)
    for count, _ in enumerate(stream):
        if count == 3:
            break
    stream.close()
    deadline = time.monotonic() + 60
    while server.health()["running"] and time.monotonic() < deadline:
        time.sleep(0.2)
    after = server.health()
    assert after["running"] == 0 and after["cancelled"] == before["cancelled"] + 1


@contextlib.contextmanager
def served(engine, **app_options):
    """The API over `engine`, served in this process on a free port; yields its base URL."""
    import uvicorn

    from running_server import free_port
    from llama_vision_helpers.server import create_app

    port = free_port()
    config = uvicorn.Config(create_app(engine, **app_options), host="127.0.0.1", port=port, log_level="warning")
    uv = uvicorn.Server(config)
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    while not uv.started:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        uv.should_exit = True
        thread.join(10)


@pytest.mark.parametrize("api_key", [None, "s3cret"])
def test_a_client_that_gives_up_on_a_whole_answer_frees_the_engine(vlm, api_key):
    """Not streamed: the server must still notice that the client has gone (and stop generating for it)."""
    from llama_vision_helpers.engine import Engine

    engine = Engine(vlm)
    try:
        with served(engine, api_key=api_key) as url:
            body = {"model": "tiny-random", "messages": ask(), "max_tokens": 3000, "min_tokens": 3000}
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(url + "/chat/completions", json=body, timeout=2,
                           headers={"authorization": f"Bearer {api_key}"} if api_key else {})
            deadline = time.monotonic() + 20
            while engine.stats()["running"] and time.monotonic() < deadline:
                time.sleep(0.1)
            assert engine.stats() == {"waiting": 0, "running": 0, "completed": 0, "cancelled": 1, "failed": 0}
    finally:
        engine.close()


def test_health_says_when_the_engine_has_stopped(vlm):
    from llama_vision_helpers.engine import Engine

    engine = Engine(vlm)
    try:
        with served(engine) as url:
            assert httpx.get(url.removesuffix("/v1") + "/health", timeout=10).json()["status"] == "ok"
            engine.queue.close("the engine stopped on an error (RuntimeError: out of memory)")
            response = httpx.get(url.removesuffix("/v1") + "/health", timeout=10)
            assert response.status_code == 503 and "out of memory" in response.json()["error"]
    finally:
        engine.close()


def test_too_many_answers_found_only_when_the_request_runs_are_still_a_400(vlm):
    """Before the batched engine knows its slots, n above them is refused by the scheduler: still the client's fault."""
    from llama_vision_helpers.batch_scheduler import BatchScheduler
    from llama_vision_helpers.engine import Engine

    gate = threading.Event()

    class Gated(BatchScheduler):
        def run(self, engine):
            gate.wait(30)
            super().run(engine)

    engine = Engine(vlm, Gated(max_batch=1))
    try:
        with served(engine) as url:
            threading.Timer(1.0, gate.set).start()  # the request is queued by then
            response = httpx.post(url + "/chat/completions", timeout=60, json={
                "model": "tiny-random", "messages": ask(), "n": 2, "temperature": 1.0, "max_tokens": 2})
    finally:
        gate.set()
        engine.close()
    assert response.status_code == 400 and "ask for fewer" in response.json()["error"]["message"]
    assert response.json()["error"]["code"] == "invalid_value"


class FailsTheFirst:
    """A scheduler whose first request fails as it runs; the others run as usual."""

    def run(self, engine):
        from llama_vision_helpers.engine import SerialScheduler

        first = engine.queue.take()
        first.fail(RuntimeError("boom"))
        SerialScheduler().run(engine)


def test_an_error_in_the_middle_of_a_stream_is_a_server_error_for_the_library(vlm):
    from llama_vision_helpers.engine import Engine
    from llama_vision_helpers.remote import ServerError, connect

    engine = Engine(vlm, FailsTheFirst())
    try:
        with served(engine) as url:
            with pytest.raises(ServerError, match="failed while answering.*boom"):
                describe_image(connect(url), IMAGE, QUESTION, max_new_tokens=4, stream=False)
    finally:
        engine.close()


def test_the_load_test_reports_a_failed_request_and_goes_on(vlm):
    from llama_vision_helpers.engine import Engine
    from llama_vision_helpers.loadtest import format_table, run_loadtest

    engine = Engine(vlm, FailsTheFirst())
    try:
        with served(engine) as url:
            level = run_loadtest(url, [2], max_tokens=2, text_only=True, warmup_tokens=0)["levels"][0]
    finally:
        engine.close()
    assert level["failed"] == 1 and len(level["requests"]) == 1 and "boom" in level["errors"][0]
    assert "1 of 2 requests failed" in format_table([level])


@pytest.fixture(scope="module")
def keyed_server(vlm):
    """The API with a key, served in this process."""
    from llama_vision_helpers.engine import Engine

    engine = Engine(vlm)
    try:
        with served(engine, api_key="s3cret") as url:
            yield url
    finally:
        engine.close()


def test_the_api_key_is_enforced(keyed_server):
    for key in ("wrong", "s3cret-and-more", ""):
        with pytest.raises(openai.AuthenticationError) as info:
            openai.OpenAI(base_url=keyed_server, api_key=key or "x", max_retries=0).models.list()
        assert "API key" in info.value.body["message"]
    assert httpx.get(keyed_server + "/models").status_code == 401
    keyed = openai.OpenAI(base_url=keyed_server, api_key="s3cret", max_retries=0)
    assert [m.id for m in keyed.models.list()] == ["tiny-random"]
    assert keyed.chat.completions.create(model="tiny-random", messages=ask(), temperature=0, max_tokens=2).choices


def test_the_library_says_whether_its_key_was_missing_or_refused(keyed_server, monkeypatch):
    from llama_vision_helpers.model import ModelLoadError
    from llama_vision_helpers.remote import connect

    monkeypatch.delenv("LLAMA_VISION_API_KEY", raising=False)
    monkeypatch.setenv("OPENAI_API_KEY", "s3cret")  # a key for another service is never sent
    with pytest.raises(ModelLoadError, match="needs an API key"):
        connect(keyed_server)
    with pytest.raises(ModelLoadError, match="refused the API key"):
        connect(keyed_server, api_key="wrong")
    assert connect(keyed_server, api_key="s3cret").model_name == "tiny-random"


@pytest.mark.parametrize("workers", [1, 3])
def test_requests_are_prepared_a_few_at_a_time(vlm, monkeypatch, workers):
    """Images are decoded and preprocessed by `prepare_workers` at once; the other requests wait their turn."""
    from llama_vision_helpers.engine import Engine

    engine = Engine(vlm)
    changed, busy, most = threading.Condition(), [0], [0]
    prepare = engine.prepare

    def counting(*args, **kwargs):
        with changed:
            busy[0] += 1
            most[0] = max(most[0], busy[0])
            changed.notify_all()
            changed.wait_for(lambda: busy[0] >= workers, timeout=3)  # the allowed number are in at once...
        time.sleep(0.3)  # ...and one more would get in now, were it let in
        try:
            return prepare(*args, **kwargs)
        finally:
            with changed:
                busy[0] -= 1

    monkeypatch.setattr(engine, "prepare", counting)
    try:
        with served(engine, prepare_workers=workers) as url:
            client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=120)
            with ThreadPoolExecutor(5) as pool:
                answers = list(pool.map(lambda _: client.chat.completions.create(
                    model="tiny-random", messages=ask(), temperature=0, max_tokens=2), range(5)))
    finally:
        engine.close()
    assert len(answers) == 5 and most[0] == workers


def test_no_preparing_worker_is_refused(vlm):
    from llama_vision_helpers.engine import Engine
    from llama_vision_helpers.server import create_app

    engine = Engine(vlm)
    try:
        with pytest.raises(ValueError, match="at least 1"):
            create_app(engine, prepare_workers=0)
    finally:
        engine.close()


def test_the_server_binds_localhost_by_default():
    from llama_vision_helpers.cli import build_parser

    assert build_parser().parse_args(["serve"]).host == "127.0.0.1"
