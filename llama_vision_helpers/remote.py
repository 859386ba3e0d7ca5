"""The library over any OpenAI-compatible server: `llama-vision serve`, Ollama, or another engine.

`load_model("http://host:8000/v1")` (or `$LLAMA_VISION_MODEL` set to it) returns a `RemoteModel`; `describe_image`,
`Chat` and `run_experiment` then send their conversations there through the official `openai` client instead of
running a local model. `"ollama"` and `"ollama:NAME"` are short for Ollama's endpoint on this machine.
"""

from __future__ import annotations

import os
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from .defaults import TINY_ALIAS
from .model import ModelLoadError
from .wire import API_KEY_ENV

OLLAMA_URL = "http://localhost:11434/v1"
OLLAMA_MODEL = "llama3.2-vision"
CONNECT_TIMEOUT_S = 10
ANSWER_TIMEOUT_S = 600


class ServerError(RuntimeError):
    """The server could not answer; the message says what to do."""


def is_remote(name: str | None) -> bool:
    """Whether a model name points at a server rather than at weights."""
    return bool(name) and (name.startswith(("http://", "https://")) or name == "ollama" or name.startswith("ollama:"))


def parse_remote(name: str) -> tuple[str, str | None, bool]:
    """(base URL, model id or None for the one the server lists, whether it is Ollama)."""
    if name == "ollama" or name.startswith("ollama:"):
        return OLLAMA_URL, name.partition(":")[2] or OLLAMA_MODEL, True
    return name.rstrip("/"), None, name.rstrip("/").endswith(":11434/v1")


@dataclass
class RemoteModel:
    """A model served over HTTP; used wherever a `VisionModel` is (it answers conversations itself)."""

    client: Any = field(repr=False)
    base_url: str
    model_name: str
    is_ollama: bool = False
    backend: str = "remote"
    device: str = "remote"
    is_random: bool = False
    load_in_4bit: bool = False
    processor: Any = field(default=None, repr=False)  # no local processor: see model.local_processor

    def __repr__(self) -> str:
        return f"RemoteModel({self.model_name!r} at {self.base_url})"

    def answers(self, messages: list[dict], image: Any, *, stream: Any = False, seed: int | None = None,
                num_samples: int = 1, stop_event: threading.Event | None = None,
                on_position: Callable[[int], Any] | None = None, max_new_tokens: int, temperature: float,
                min_p: float, do_sample: bool, stop: list[str] | None = None, **unsupported: Any) -> list[str]:
        """Send one conversation (see `generation.answer_messages`); a single answer streams."""
        from .generation import SettingsError, stream_callback
        from .wire import to_openai_messages

        if unsupported:
            raise SettingsError(f"A model on a server takes the sampling settings only; {', '.join(unsupported)} "
                             "need a local model.")
        request: dict[str, Any] = {
            "model": self.model_name, "messages": to_openai_messages(messages, image), "max_tokens": max_new_tokens,
            "temperature": temperature if do_sample else 0.0,
        }
        if stop:
            request["stop"] = list(stop)
        if do_sample and not self.is_ollama:  # Ollama has no min_p
            request["extra_body"] = {"min_p": min_p}
        on_text, close = stream_callback(stream)
        with self._explained():
            answers = self._stream(request, seed, num_samples, on_text, stop_event)
            close()
            if len(answers) < num_samples and not (stop_event is not None and stop_event.is_set()):
                answers += self._more(request, seed, len(answers), num_samples)
        return answers

    def _stream(self, request: dict, seed: int | None, num_samples: int, on_text, stop_event) -> list[str]:
        """One streamed request for all answers (the first goes to `on_text` as it comes)."""
        texts: dict[int, str] = {}
        n = {"n": num_samples} if num_samples > 1 and not self.is_ollama else {}
        with self.client.chat.completions.create(**request, seed=seed, stream=True, **n) as events:
            for chunk in events:
                if stop_event is not None and stop_event.is_set():
                    break  # closing the stream makes the server stop generating
                for choice in chunk.choices:
                    piece = choice.delta.content or ""
                    texts[choice.index] = texts.get(choice.index, "") + piece
                    if piece and choice.index == 0 and on_text is not None:
                        on_text(piece)
        return [texts[index] for index in sorted(texts)][:num_samples]

    def _more(self, request: dict, seed: int | None, have: int, num_samples: int) -> list[str]:
        """Where the server returned fewer answers than asked (Ollama has no `n`), ask for the rest."""
        answers: list[str] = []
        while have + len(answers) < num_samples:
            wanted = num_samples - have - len(answers)
            n = {} if self.is_ollama else {"n": wanted}
            # a repeated request needs its own seed, or a seeded server gives the same answers again
            next_seed = None if seed is None else seed + have + len(answers)
            response = self.client.chat.completions.create(**request, seed=next_seed, **n)
            choices = sorted(response.choices, key=lambda choice: choice.index)[:wanted]
            if not choices:
                raise ServerError(f"The server at {self.base_url} returned no answer.")
            answers.extend(choice.message.content or "" for choice in choices)
        return answers

    def _explained(self):
        return _explain_errors(self.base_url)


@contextmanager
def _explain_errors(base_url: str) -> Iterator[None]:
    """Turn the openai client's errors into ours, saying what to do."""
    import openai

    from .generation import ChatError, PromptTooLong, SettingsError

    try:
        yield
    except openai.AuthenticationError as err:
        raise ServerError(f"The server at {base_url} refused the API key: set ${API_KEY_ENV} to the key it was "
                          "started with.") from err
    except openai.APIConnectionError as err:
        raise ServerError(f"Could not reach the model server at {base_url}: is it running (`llama-vision serve`, "
                          f"or `ollama serve`), and is the address right? `llama-vision doctor --model {base_url}` "
                          "checks it.") from err
    except openai.APIStatusError as err:
        body = err.body if isinstance(err.body, dict) else {}
        detail = body.get("error", body)
        detail = detail if isinstance(detail, dict) else {}
        message = detail.get("message") or str(err)
        # the server's own refusals come back as the library's errors, with its message
        typed = {"invalid_conversation": ChatError, "context_length_exceeded": PromptTooLong,
                 "invalid_value": SettingsError}.get(detail.get("code"))
        if typed is not None:
            raise typed(message) from err
        raise ServerError(f"The server at {base_url} refused the request ({err.status_code}): {message}") from err
    except openai.APIError as err:  # an error the server sent in the middle of a streamed answer
        raise ServerError(f"The server at {base_url} failed while answering: {err.message}") from err


def connect(name: str, *, api_key: str | None = None, timeout: float = ANSWER_TIMEOUT_S) -> RemoteModel:
    """Check that the server answers and lists a model, and return it as a `RemoteModel`."""
    import openai

    base_url, model, is_ollama = parse_remote(name)
    # only this package's own variable: a key meant for another service is never sent to a room's server
    key = api_key or os.environ.get(API_KEY_ENV)
    client = openai.OpenAI(base_url=base_url, api_key=key or "none", timeout=timeout, max_retries=1)
    try:
        listed = [entry.id for entry in client.with_options(timeout=CONNECT_TIMEOUT_S).models.list()]
    except openai.AuthenticationError as err:
        problem = "refused the API key" if key else "needs an API key"
        raise ModelLoadError(f"The server at {base_url} {problem}: set ${API_KEY_ENV} to the key it was "
                             "started with.") from err
    except (openai.APIConnectionError, openai.APIStatusError) as err:
        hint = ("start Ollama (`ollama serve`) and `ollama pull llama3.2-vision`" if is_ollama else
                "start it there with `llama-vision serve`, or check the address (it ends in /v1)")
        raise ModelLoadError(f"Could not reach a model server at {base_url}: {hint}. ({type(err).__name__})") from err
    if model is None:
        if not listed:
            raise ModelLoadError(f"The server at {base_url} lists no model.")
        model = listed[0]
    elif is_ollama and model not in listed and f"{model}:latest" not in listed:
        raise ModelLoadError(f"Ollama has no {model!r} yet: run `ollama pull {model}` (it has: "
                             f"{', '.join(listed) or 'nothing'}).")
    return RemoteModel(client, base_url, model, is_ollama=is_ollama, backend="ollama" if is_ollama else "remote",
                       is_random=model == TINY_ALIAS)
