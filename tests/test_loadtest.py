"""The batched engine behind the HTTP server, and `llama-vision loadtest` against it (structure, never speed)."""

import json
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from PIL import Image

from running_server import RunningServer
from llama_vision_helpers.cli import main
from llama_vision_helpers.generation import answer_messages, user_message
from llama_vision_helpers.loadtest import format_table, run_loadtest, synthetic_image
from llama_vision_helpers.wire import image_data_url


@pytest.fixture(scope="module")
def batched_server(vlm, tmp_path_factory):
    """`llama-vision serve --max-batch 4`: the batched scheduler, without graphs on a CPU."""
    running = RunningServer(tmp_path_factory.mktemp("batched") / "serve.log", "--max-batch", "4").wait_ready()
    yield running
    running.stop()


def test_concurrent_greedy_requests_through_the_server_get_their_solo_answers(batched_server, vlm):
    client = openai.OpenAI(base_url=batched_server.url, api_key="unused", max_retries=0, timeout=120)
    images = [synthetic_image(i, size) for i, size in enumerate([112, 60, 200])]
    asks = [("Describe the image.", images[0], 18), ("Tell me a story about a fox.", None, 7),
            ("What colour is it?", images[1], 25), ("Count to ten.", None, 12), ("Describe the image.", images[2], 9),
            ("What is in this picture?", images[0], 14)]  # six requests for four slots

    def over_http(question, image, tokens):
        content = [{"type": "text", "text": question}]
        if image is not None:
            content.insert(0, {"type": "image_url", "image_url": {"url": image_data_url(image)}})
        response = client.chat.completions.create(model="tiny-random", messages=[{"role": "user", "content": content}],
                                                  temperature=0, max_tokens=tokens)
        return response.choices[0].message.content

    with ThreadPoolExecutor(len(asks)) as pool:
        answers = list(pool.map(lambda a: over_http(*a), asks))
    for (question, image, tokens), answer in zip(asks, answers):
        solo = answer_messages(vlm, [user_message(question, image is not None)], image, do_sample=False,
                               max_new_tokens=tokens)[0]
        assert answer == solo


def test_min_tokens_forces_the_length(batched_server):
    client = openai.OpenAI(base_url=batched_server.url, api_key="unused", max_retries=0, timeout=120)
    response = client.chat.completions.create(
        model="tiny-random", messages=[{"role": "user", "content": "Hi"}], temperature=0, max_tokens=40,
        extra_body={"min_tokens": 40})
    assert response.usage.completion_tokens == 40 and response.choices[0].finish_reason == "length"


def test_min_tokens_becomes_the_engine_s_min_new_tokens():
    from llama_vision_helpers.server import ChatCompletionRequest

    def sampling(**fields):
        return ChatCompletionRequest(messages=[{"role": "user", "content": "Hi"}], **fields).sampling()

    assert sampling(max_tokens=40, min_tokens=40).min_new_tokens == 40
    assert sampling(max_tokens=10, min_tokens=99).min_new_tokens == 10  # never more than max_tokens
    assert sampling(max_tokens=10).min_new_tokens == 0


def test_loadtest_reports_every_request_and_round(batched_server):
    result = run_loadtest(batched_server.url, [1, 3], max_tokens=6, image_size=112, force_length=True,
                          warmup_tokens=2)
    assert [level["clients"] for level in result["levels"]] == [1, 3]
    for level in result["levels"]:
        assert level["tokens"] == 6 * level["clients"] and len(level["requests"]) == level["clients"]
        assert all(r["tokens"] == 6 and r["ttft_s"] > 0 for r in level["requests"])
        assert level["ttft_s_p50"] <= level["ttft_s_p95"]
        assert level["stream_tokens_per_s_min"] <= level["stream_tokens_per_s_p50"]
    table = format_table(result["levels"]).splitlines()
    assert len(table) == 4 and table[0].startswith("| clients | aggregate tok/s")


def test_loadtest_command_writes_json_and_a_table(batched_server, tmp_path, capsys):
    image = tmp_path / "photo.png"
    Image.new("RGB", (100, 70), "navy").save(image)
    out = tmp_path / "load.json"
    assert main(["loadtest", batched_server.url, "--clients", "2", "--max-tokens", "3", "--force-length",
                 "--images", str(image), "--warmup-tokens", "0", "--json", str(out)]) == 0
    saved = json.loads(out.read_text())
    assert saved["levels"][0]["tokens"] == 6 and saved["images"] == [str(image)]
    assert "| 2 |" in capsys.readouterr().out


def test_loadtest_says_what_to_do_when_the_server_is_not_there(capsys):
    assert main(["loadtest", "http://127.0.0.1:9/v1", "--clients", "1"]) == 2
    assert "is the server running" in capsys.readouterr().err
