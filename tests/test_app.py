"""The chat app: handler error paths, stop, four concurrent clients, and a real browser."""

import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from llama_vision_helpers import app as app_module
from llama_vision_helpers import Chat, load_image
from llama_vision_helpers.app import (
    NEED_IMAGE, NOTICE, ONE_IMAGE, AppRequestError, content_parts, conversation, not_an_image, respond,
)
from llama_vision_helpers.defaults import DEFAULT_INSTRUCTION, DEFAULT_SETTINGS
from llama_vision_helpers.engine import Sampling
from llama_vision_helpers.generation import generate_token_ids
from running_server import RunningServer, free_port

ROOT = Path(__file__).resolve().parents[1]
INPUT = ROOT / "input"
ARTIFACTS = ROOT / "tests" / "artifacts"
GREEDY = {"max_new_tokens": 16, "greedy": True}


def last(generator):
    value = None
    for value in generator:
        pass
    return value


def greedy_chat_with(vlm, image, max_new_tokens):
    """The library's own Chat with the app's greedy settings: what the app must answer, turn by turn."""
    return Chat(vlm, image, stream=False, do_sample=False, max_new_tokens=max_new_tokens)


def greedy_chat(vlm, image):
    return greedy_chat_with(vlm, image, GREEDY["max_new_tokens"])


def test_importing_the_package_does_not_import_gradio():
    code = "import sys, llama_vision_helpers, llama_vision_helpers.cli; print('gradio' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


def test_content_parts_reads_every_shape_gradio_uses():
    path = str(INPUT / "image_1.jpg")
    assert content_parts("hi") == (["hi"], [])
    assert content_parts([{"type": "text", "text": "hi"}, {"type": "file", "file": {"path": path}}]) == (["hi"], [path])
    assert content_parts({"path": path}) == ([], [path])
    assert content_parts([{"path": path}, "hi"]) == (["hi"], [path])


def test_question_before_any_image_gets_a_message(vlm):
    assert list(respond(vlm, {"text": "What is this?", "files": []}, [])) == [NEED_IMAGE]


def test_second_image_is_refused(vlm):
    history = [{"role": "user", "content": [{"path": str(INPUT / "image_1.jpg")}, "What is it?"]},
               {"role": "assistant", "content": "An astronaut."}]
    message = {"text": "And this?", "files": [str(INPUT / "image_2.jpg")]}
    assert list(respond(vlm, message, history)) == [ONE_IMAGE]


def test_a_file_that_is_not_an_image_is_refused_without_showing_server_paths(vlm, tmp_path):
    notes = tmp_path / "gradio-tmp" / "notes.png"
    notes.parent.mkdir()
    notes.write_text("not a picture")
    reply = list(respond(vlm, {"text": "Read this", "files": [str(notes)]}, []))
    assert len(reply) == 1 and reply[0].startswith(NOTICE) and "notes.png" in reply[0]
    assert str(tmp_path) not in reply[0] and "gradio-tmp" not in reply[0]


def test_a_refused_upload_does_not_leave_the_chat_stuck(vlm, tmp_path):
    notes = tmp_path / "notes.png"
    notes.write_text("not a picture")
    history = [{"role": "user", "content": [{"path": str(notes)}, "Read this"]},
               {"role": "assistant", "content": not_an_image(str(notes))}]
    assert list(respond(vlm, {"text": "And now?", "files": []}, history, **GREEDY)) == [NEED_IMAGE]
    image = str(INPUT / "image_2.jpg")
    answer = last(respond(vlm, {"text": "Describe it.", "files": [image]}, history, **GREEDY))
    assert answer == greedy_chat(vlm, image).ask("Describe it.")


def test_an_image_without_text_asks_the_default_question_and_follow_ups_remember_it(vlm):
    image = str(INPUT / "image_2.jpg")
    first = last(respond(vlm, {"text": "", "files": [image]}, [], **GREEDY))
    chat = greedy_chat(vlm, image)
    assert first == chat.ask(DEFAULT_INSTRUCTION)
    history = [{"role": "user", "content": [{"path": image}]}, {"role": "assistant", "content": first}]
    second = last(respond(vlm, {"text": "What colour is it?", "files": []}, history, **GREEDY))
    assert second == chat.ask("What colour is it?")


def test_bad_settings_and_failures_raise_with_their_message_after_a_notice(vlm, monkeypatch):
    image = str(INPUT / "image_2.jpg")
    replies = []
    with pytest.raises(AppRequestError, match="min_p must be between 0 and 1"):
        for reply in respond(vlm, {"text": "Hi", "files": [image]}, [], max_new_tokens=4, min_p=3.0):
            replies.append(reply)
    assert replies and replies[-1].startswith(NOTICE)

    def broken(*args, **kwargs):
        raise RuntimeError("the accelerator fell over")

    monkeypatch.setattr("llama_vision_helpers.generation.generate_answers", broken)
    replies = []
    with pytest.raises(AppRequestError, match="the accelerator fell over"):
        for reply in respond(vlm, {"text": "Hi", "files": [image]}, [], **GREEDY):
            replies.append(reply)
    history = [{"role": "user", "content": [{"path": image}, "Hi"]}, {"role": "assistant", "content": replies[-1]}]
    assert conversation(history) == (None, [])  # the failed turn is not part of the conversation


def test_answers_stream_and_follow_ups_keep_the_image(vlm):
    image = str(INPUT / "image_2.jpg")
    chunks = list(respond(vlm, {"text": "Describe it.", "files": [image]}, [], **GREEDY))
    assert len(chunks) >= 1 and all(b.startswith(a) for a, b in zip(chunks, chunks[1:]))
    first = chunks[-1]
    chat = greedy_chat(vlm, image)
    assert first == chat.ask("Describe it.")
    # the notice pair in the history is left out of what the model sees
    history = [{"role": "user", "content": "Hello?"}, {"role": "assistant", "content": NEED_IMAGE},
               {"role": "user", "content": [{"type": "file", "file": {"path": image}}]},
               {"role": "user", "content": [{"type": "text", "text": "Describe it."}]},
               {"role": "assistant", "content": [{"type": "text", "text": first}]}]
    assert conversation(history) == (image, [("Describe it.", first)])
    second = last(respond(vlm, {"text": "What colour is it?", "files": []}, history, **GREEDY))
    assert second == chat.ask("What colour is it?")


def test_the_settings_reach_generate_unchanged(vlm, monkeypatch):
    calls = []
    original = vlm.model.generate
    monkeypatch.setattr(vlm.model, "generate", lambda *a, **k: calls.append(k) or original(*a, **k))
    last(respond(vlm, {"text": "Hi", "files": [str(INPUT / "image_2.jpg")]}, [], max_new_tokens=3,
                 temperature=0.45, min_p=0.2))
    assert (calls[0]["temperature"], calls[0]["min_p"], calls[0]["max_new_tokens"]) == (0.45, 0.2, 3)


def test_stopping_ends_generation_early(engine):
    before = engine.stats()
    stream = respond(engine, {"text": "Describe it.", "files": [str(INPUT / "image_3.jpg")]}, [],
                     max_new_tokens=2000, greedy=True)
    next(stream)
    stream.close()  # what Gradio does when the stop button is pressed
    after = engine.stats()
    assert after["running"] == 0 and after["cancelled"] == before["cancelled"] + 1


def test_a_waiting_message_shows_its_place_in_line(vlm, gated_engine):
    ahead = gated_engine.submit(Chat(vlm, INPUT / "image_1.jpg").messages("Hi"), load_image(INPUT / "image_1.jpg"),
                                Sampling(max_new_tokens=4, do_sample=False))
    stream = respond(gated_engine, {"text": "Describe it.", "files": [str(INPUT / "image_2.jpg")]}, [], **GREEDY)
    assert next(stream) == NOTICE + "Waiting for the model: 1 request ahead of you."
    gated_engine.gate.set()
    assert last(stream) == greedy_chat(vlm, INPUT / "image_2.jpg").ask("Describe it.")
    assert list(ahead)


def test_the_app_as_a_client_of_a_server_answers_as_chat_does(vlm, tmp_path):

    from llama_vision_helpers import load_model

    running = RunningServer(tmp_path / "serve.log").wait_ready()
    try:
        remote = load_model(running.url)
        image = str(INPUT / "image_2.jpg")
        first = last(respond(remote, {"text": "Describe it.", "files": [image]}, [], **GREEDY))
        chat = greedy_chat(vlm, image)
        assert first == chat.ask("Describe it.")
        history = [{"role": "user", "content": [{"path": image}, "Describe it."]},
                   {"role": "assistant", "content": first}]
        assert last(respond(remote, {"text": "More?", "files": []}, history, **GREEDY)) == chat.ask("More?")
    finally:
        running.stop()


@pytest.fixture(scope="module")
def app_url(vlm):
    """The app launched in this process on a free port of 127.0.0.1 (not the API server of conftest's `server`)."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    port = free_port()
    demo = app_module.launch(vlm, host="127.0.0.1", port=port, block=False)
    yield f"http://127.0.0.1:{port}/"
    demo.close()


def test_four_clients_at_once_each_get_their_own_conversation(vlm, app_url):
    from gradio_client import Client, handle_file

    jobs = [("image_1.jpg", "Who is this?"), ("image_2.jpg", "What is in the cup?"),
            ("receipt-1.jpeg", "What is the total?"), ("watch-face-2.jpg", "What time is it?")]

    def converse(job):
        name, question = job
        client = Client(app_url, verbose=False)
        settings = (GREEDY["max_new_tokens"], DEFAULT_SETTINGS["temperature"], DEFAULT_SETTINGS["min_p"], True)
        first = client.predict({"text": question, "files": [handle_file(str(INPUT / name))]}, *settings,
                               api_name="/respond")
        follow_up = client.predict({"text": "Tell me more.", "files": []}, *settings, api_name="/respond")
        return first, follow_up

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(converse, jobs))
    for (name, question), (first, follow_up) in zip(jobs, results):
        chat = greedy_chat(vlm, INPUT / name)
        assert first == chat.ask(question)
        assert follow_up == chat.ask("Tell me more.")


def test_api_clients_see_the_error_message(app_url):
    from gradio_client import Client, handle_file

    client = Client(app_url, verbose=False)
    message = {"text": "Describe it. " * 5000, "files": [handle_file(str(INPUT / "image_2.jpg"))]}
    with pytest.raises(Exception, match="model's context of"):
        client.predict(message, 16, DEFAULT_SETTINGS["temperature"], DEFAULT_SETTINGS["min_p"], True,
                       api_name="/respond")


def test_uploads_over_the_size_limit_are_refused(app_url, tmp_path):
    import httpx

    big = tmp_path / "big.png"
    big.write_bytes(b"\0" * (21 * 1024 * 1024))
    with big.open("rb") as handle:
        response = httpx.post(f"{app_url}gradio_api/upload", files={"files": ("big.png", handle, "image/png")},
                              timeout=60)
    assert response.status_code == 413
    small = httpx.post(f"{app_url}gradio_api/upload", files={"files": ("a.png", (INPUT / "image_2.jpg").read_bytes(),
                                                                       "image/png")}, timeout=60)
    assert small.status_code == 200


CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.mark.browser
def test_the_app_in_a_real_browser(vlm, app_url, monkeypatch):
    """Greedy settings chosen in the page reach generation, the answer streams into the page, follow-ups work."""
    if not Path(CHROMIUM).exists():
        if os.environ.get("LLAMA_VISION_REQUIRE_BROWSER"):
            pytest.fail("chromium is not installed: `apt-get install chromium` (make test does this)")
        pytest.skip("chromium is not installed")
    from playwright.sync_api import expect, sync_playwright

    calls = []

    def recording(*args, **kwargs):  # the app runs in this process: see what reaches generation (via its engine)
        tokens = generate_token_ids(*args, **kwargs)
        calls.append((kwargs, vlm.processor.tokenizer.batch_decode(tokens, skip_special_tokens=True)))
        return tokens

    monkeypatch.setattr("llama_vision_helpers.generation.generate_token_ids", recording)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    flags = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
             "--no-first-run", "--disable-sync"]
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=flags)
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.goto(app_url, wait_until="domcontentloaded")
        box = page.locator("textarea").first
        box.wait_for(timeout=60_000)
        bot = page.locator('[data-testid="bot"]')

        box.fill("What is in the picture?")
        box.press("Enter")
        expect(bot.first).to_contain_text("Please upload an image first", timeout=30_000)
        assert calls == []

        page.get_by_text("Generation settings").click()
        page.get_by_label("greedy (ignores temperature and min_p)").check()
        # the textbox takes files again once the previous turn has finished; the thumbnail shows the upload is done
        expect(box).to_be_editable(timeout=30_000)
        thumbnail = page.locator('[aria-label="Uploaded files"] img')
        for attempt in range(2):
            page.locator("input[type=file]").first.set_input_files(str(INPUT / "image_2.jpg"))
            try:
                expect(thumbnail).to_be_visible(timeout=20_000)
                break
            except AssertionError:
                if attempt:
                    raise
        # every change of the answer's text in the page, however quickly the updates come
        page.evaluate("""() => {
            window.answerLengths = [];
            new MutationObserver(() => {
                const bots = document.querySelectorAll('[data-testid="bot"]');
                if (bots.length >= 2) window.answerLengths.push(bots[bots.length - 1].innerText.length);
            }).observe(document.body, {subtree: true, childList: true, characterData: true});
        }""")
        box.fill("Describe it.")
        box.press("Enter")
        expect(bot).to_have_count(2, timeout=30_000)
        page.wait_for_function("() => window.answerLengths.length > 0", timeout=30_000)
        for _ in range(600):
            if calls:
                break
            time.sleep(0.1)
        settings, answers = calls[0]
        assert settings["do_sample"] is False and settings["max_new_tokens"] == 512
        assert answers == [greedy_chat_with(vlm, INPUT / "image_2.jpg", 512).ask("Describe it.")]
        expect(bot.last).not_to_have_text("", timeout=30_000)
        page.wait_for_timeout(1000)
        lengths = page.evaluate("() => window.answerLengths")
        assert len({n for n in lengths if n > 0}) >= 3, f"the answer did not stream into the page: {lengths}"

        box.fill("And what colour is it?")
        box.press("Enter")
        expect(bot).to_have_count(3, timeout=30_000)
        for _ in range(600):
            if len(calls) == 2:
                break
            time.sleep(0.1)
        assert calls[1][0]["do_sample"] is False
        expect(bot.last).not_to_contain_text("Please upload", timeout=30_000)
        expect(bot.last).not_to_have_text("", timeout=30_000)
        shot = ARTIFACTS / "app.png"
        page.screenshot(path=str(shot), full_page=False)
        browser.close()
    assert shot.stat().st_size > 10_000
