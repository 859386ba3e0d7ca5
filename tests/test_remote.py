"""The library on a server: the same describe_image, Chat and run_experiment results as on the local model."""

from pathlib import Path
from types import SimpleNamespace

import pytest

from llama_vision_helpers import Chat, ChatError, describe_image, load_model
from llama_vision_helpers.experiments import run_experiment
from llama_vision_helpers.model import ModelLoadError, local_processor
from llama_vision_helpers.remote import OLLAMA_URL, RemoteModel, ServerError, parse_remote

ROOT = Path(__file__).resolve().parents[1]
IMAGE = ROOT / "input" / "image_2.jpg"
SHORT = {"max_new_tokens": 12}


@pytest.fixture(scope="module")
def remote(server):
    return load_model(server.url)


def test_load_model_takes_a_url_and_the_environment(server, monkeypatch):
    assert load_model(server.url).model_name == "tiny-random"
    monkeypatch.setenv("LLAMA_VISION_MODEL", server.url)
    remote = load_model()
    assert isinstance(remote, RemoteModel) and remote.is_random and remote.base_url == server.url


def test_describe_image_greedy_streams_what_local_returns(remote, vlm, capsys):
    local = describe_image(vlm, IMAGE, do_sample=False, stream=False, **SHORT)
    assert describe_image(remote, IMAGE, do_sample=False, **SHORT) == local
    assert capsys.readouterr().out == local + "\n"  # printed as it came, as TextStreamer prints


def test_samples_with_a_seed_are_the_local_ones(remote, vlm):
    settings = dict(num_samples=3, seed=11, stream=False, **SHORT)
    assert describe_image(remote, IMAGE, "What is it?", **settings) == describe_image(vlm, IMAGE, "What is it?",
                                                                                       **settings)


def test_chat_is_the_local_chat_and_keeps_its_history_on_errors(remote, vlm):
    here = Chat(vlm, IMAGE, stream=False, do_sample=False, **SHORT)
    there = Chat(remote, IMAGE, stream=False, do_sample=False, **SHORT)
    for question in ("What is this?", "And the colours?"):
        assert there.ask(question) == here.ask(question)
    before = there.history
    with pytest.raises(ValueError, match="context"):
        there.ask("Too long?", max_new_tokens=10_000)
    with pytest.raises(ChatError):
        there.ask("And this one?", image=IMAGE)
    assert there.history == before == here.history


def test_run_experiment_gives_the_local_rows(remote, vlm):
    options = dict(trials=2, files=["calculator-1.png"], results_dir=None, progress=False, max_new_tokens=8)
    local = run_experiment(vlm, "calculator", **options).rows
    served = run_experiment(remote, "calculator", **options).rows
    assert served["raw_answer"].tolist() == local["raw_answer"].tolist()
    assert served["score"].tolist() == local["score"].tolist()


def test_local_processor_of_a_served_tiny_model_is_the_tiny_one(remote, vlm):
    processor = local_processor(remote)
    assert processor.tokenizer.get_vocab() == vlm.processor.tokenizer.get_vocab()
    assert local_processor(vlm) is vlm.processor


def test_local_processor_says_what_to_do_when_there_is_none(monkeypatch):
    import transformers

    def not_cached(name, *args, **kwargs):
        raise OSError(f"{name} is not in the cache and the Hub is offline")

    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", not_cached)
    nowhere = RemoteModel(client=None, base_url="http://127.0.0.1:9/v1", model_name="llama3.2-vision")
    with pytest.raises(ModelLoadError, match="hf download"):
        local_processor(nowhere)


def test_an_unreachable_server_says_what_to_do():
    with pytest.raises(ModelLoadError, match="llama-vision serve"):
        load_model("http://127.0.0.1:9/v1")


def test_ollama_shorthand():
    assert parse_remote("ollama") == (OLLAMA_URL, "llama3.2-vision", True)
    assert parse_remote("ollama:llava-llama3") == (OLLAMA_URL, "llava-llama3", True)
    assert parse_remote("http://gpu:8000/v1/") == ("http://gpu:8000/v1", None, False)


class FakeCompletions:
    """A server that, like Ollama, gives one choice whatever `n` asks, and records each request."""

    def __init__(self):
        self.requests = []

    def create(self, **request):
        self.requests.append(request)
        text = f"answer {len(self.requests)}"
        if request.get("stream"):
            chunk = SimpleNamespace(choices=[SimpleNamespace(index=0, delta=SimpleNamespace(content=text))])
            return FakeStream([chunk])
        return SimpleNamespace(choices=[SimpleNamespace(index=0, message=SimpleNamespace(content=text))])


class FakeStream(list):
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def fake_remote(is_ollama):
    completions = FakeCompletions()
    client = SimpleNamespace(chat=SimpleNamespace(completions=completions))
    return RemoteModel(client, "http://fake/v1", "llama3.2-vision", is_ollama=is_ollama), completions


@pytest.mark.parametrize("is_ollama", [True, False])
def test_missing_choices_are_asked_for_again_with_their_own_seeds(is_ollama, photo):
    remote, completions = fake_remote(is_ollama)
    answers = describe_image(remote, photo, num_samples=3, seed=5, stream=False, max_new_tokens=4)
    assert answers == ["answer 1", "answer 2", "answer 3"]
    assert [r["seed"] for r in completions.requests] == [5, 6, 7]
    assert [r.get("n") for r in completions.requests] == ([None] * 3 if is_ollama else [3, 2, 1])
    for request in completions.requests:
        assert ("min_p" in request.get("extra_body", {})) is not is_ollama  # Ollama has no min_p


def test_greedy_on_a_server_is_temperature_zero(photo):
    remote, completions = fake_remote(False)
    describe_image(remote, photo, do_sample=False, stream=False, max_new_tokens=4)
    assert completions.requests[0]["temperature"] == 0 and "extra_body" not in completions.requests[0]


def test_local_only_options_are_refused_on_a_server(photo):
    remote, _ = fake_remote(False)
    with pytest.raises(ValueError, match="local model"):
        describe_image(remote, photo, stream=False, max_new_tokens=4, fast=True)


def test_a_server_error_is_explained(server):
    remote = load_model(server.url)
    remote.client = remote.client.with_options(base_url="http://127.0.0.1:9/v1")
    with pytest.raises(ServerError, match="Could not reach"):
        describe_image(remote, IMAGE, stream=False, max_new_tokens=2)


def test_the_cli_describes_through_a_server_as_it_does_locally(server):
    import subprocess
    import sys

    def describe(model):
        result = subprocess.run([sys.executable, "-m", "llama_vision_helpers.cli", "describe", str(IMAGE), "--model",
                                 model, "--greedy", "--max-new-tokens", "12"], capture_output=True, text=True,
                                timeout=300)
        assert result.returncode == 0, result.stderr
        return result.stdout

    assert describe(server.url) == describe("tiny-random")
