"""The chat app: handler error paths, stop, four concurrent clients, and a real browser."""

import os
import shutil
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from llama_vision_helpers import app as app_module
from llama_vision_helpers.app import NEED_IMAGE, NOTICE, ONE_IMAGE, content_parts, conversation, respond
from llama_vision_helpers import Chat, load_image
from llama_vision_helpers.engine import Engine, Sampling

ROOT = Path(__file__).resolve().parents[1]
INPUT = ROOT / "input"
ARTIFACTS = ROOT / "tests" / "artifacts"
GREEDY = {"max_new_tokens": 16, "greedy": True}


def last(generator):
    value = None
    for value in generator:
        pass
    return value


def greedy_chat(vlm, image):
    """The library's own Chat with the app's greedy settings: what the app must answer, turn by turn."""
    return Chat(vlm, image, stream=False, do_sample=False, max_new_tokens=GREEDY["max_new_tokens"])


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


def test_a_file_that_is_not_an_image_is_refused(vlm, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("not a picture")
    reply = list(respond(vlm, {"text": "Read this", "files": [str(notes)]}, []))
    assert len(reply) == 1 and reply[0].startswith(NOTICE) and "notes.txt" in reply[0]


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


@pytest.fixture(scope="module")
def engine(vlm):
    engine = Engine(vlm)
    yield engine
    engine.close()


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
    from conftest import RunningServer

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
def server(vlm):
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo = app_module.launch(vlm, host="127.0.0.1", port=port, block=False)
    yield f"http://127.0.0.1:{port}/"
    demo.close()


def test_four_clients_at_once_each_get_their_own_conversation(vlm, server):
    from gradio_client import Client, handle_file

    jobs = [("image_1.jpg", "Who is this?"), ("image_2.jpg", "What is in the cup?"),
            ("receipt-1.jpeg", "What is the total?"), ("watch-face-2.jpg", "What time is it?")]

    def converse(job):
        name, question = job
        client = Client(server, verbose=False)
        settings = (GREEDY["max_new_tokens"], 1.5, 0.1, True)
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


CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.mark.browser
def test_the_app_in_a_real_browser(server):
    if not Path(CHROMIUM).exists():
        if os.environ.get("LLAMA_VISION_REQUIRE_BROWSER"):
            pytest.fail("chromium is not installed: `apt-get install chromium` (make test does this)")
        pytest.skip("chromium is not installed")
    from playwright.sync_api import expect, sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    flags = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
             "--no-first-run", "--disable-sync"]
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=flags)
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.goto(server, wait_until="domcontentloaded")
        box = page.locator("textarea").first
        box.wait_for(timeout=60_000)
        bot = page.locator('[data-testid="bot"]')

        box.fill("What is in the picture?")
        box.press("Enter")
        expect(bot.first).to_contain_text("Please upload an image first", timeout=30_000)

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
        box.fill("Describe it.")
        box.press("Enter")
        expect(bot).to_have_count(2, timeout=30_000)
        lengths = []
        for _ in range(200):  # watch the answer grow until it settles
            lengths.append(len(bot.last.inner_text()))
            if len(lengths) > 10 and len(set(lengths[-8:])) == 1 and lengths[-1] > 0:
                break
            time.sleep(0.1)
        growing = sorted(set(lengths))
        assert lengths[-1] > 0 and len(growing) >= 3, f"the answer did not stream: {lengths}"

        box.fill("And what colour is it?")
        box.press("Enter")
        expect(bot).to_have_count(3, timeout=30_000)
        expect(bot.last).not_to_contain_text("Please upload", timeout=30_000)
        expect(bot.last).not_to_have_text("", timeout=30_000)
        time.sleep(2)
        shot = ARTIFACTS / "app.png"
        page.screenshot(path=str(shot), full_page=False)
        browser.close()
    assert shot.stat().st_size > 10_000
