"""The Gradio chat app: upload an image, ask about it, follow up; answers stream as they are generated.

Each request rebuilds its conversation as a `Chat` (the one place that knows how a conversation is laid out)
from the history Gradio sends, and gets its own TextIteratorStreamer and worker thread, so concurrent users
never see each other's tokens; the queue lets one generation use the GPU at a time and shows the others their
place in line. Gradio is imported only here (the `app` extra).
"""

from __future__ import annotations

import argparse
import sys
import threading
from pathlib import Path
from typing import Any, Iterator, Sequence

from .defaults import DEFAULT_INSTRUCTION, DEFAULT_SETTINGS
from .generation import Chat, ChatError, SettingsError, sampling_kwargs
from .images import ImageLoadError, load_image
from .model import VisionModel

NOTICE = "⚠️ "  # marks the app's own messages, which are left out of what the model sees
NEED_IMAGE = NOTICE + "Please upload an image first (drag it into the box or use the paperclip), then ask about it."
ONE_IMAGE = NOTICE + ("This conversation already has an image, and the model was trained on one image per "
                      "conversation. Start a new chat to ask about another image.")
FAILED = NOTICE + "Generation failed: "
STREAM_TIMEOUT_S = 600
MAX_UPLOAD = "20mb"  # Gradio refuses larger uploads (HTTP 413) before they reach the handler
APP_MAX_NEW_TOKENS = 512  # shorter than the library's default: a chat turn, not a report


class AppRequestError(Exception):
    """A request the app cannot answer; the chat face turns it into a `gradio.Error` that API clients see too."""


def not_an_image(path: str) -> str:
    """The notice for an unreadable upload; it names the file as the user called it, never a server path."""
    return NOTICE + (f"{Path(path).name} is not an image I can read. Please upload a picture "
                     "(JPEG, PNG, WebP, GIF, BMP or TIFF).")


def content_parts(content: Any) -> tuple[list[str], list[str]]:
    """(texts, file paths) of one chat message, whatever shape Gradio gave it."""
    texts: list[str] = []
    files: list[str] = []
    items = content if isinstance(content, (list, tuple)) else [content]
    for item in items:
        if item is None:
            continue
        if isinstance(item, str):
            texts.append(item)
        elif isinstance(item, dict):
            if item.get("type") == "text":
                texts.append(item.get("text", ""))
            elif "file" in item:
                files.append(item["file"]["path"] if isinstance(item["file"], dict) else str(item["file"]))
            elif "path" in item:
                files.append(item["path"])
        elif hasattr(item, "path"):  # a gradio FileData
            files.append(str(item.path))
    return texts, files


def conversation(history: Sequence[dict]) -> tuple[str | None, list[tuple[str, str]]]:
    """The image path and the (question, answer) turns so far.

    A user turn the app answered itself (a notice: no image yet, a refused upload, a failure) is left out with
    its files, so a refused upload never becomes the conversation's image.
    """
    image: str | None = None
    turns: list[tuple[str, str]] = []
    question: list[str] = []
    files: list[str] = []
    for message in history:
        texts, message_files = content_parts(message.get("content"))
        if message.get("role") == "user":
            question.extend(t for t in texts if t)
            files.extend(message_files)
        elif message.get("role") == "assistant":
            answer = "".join(texts)
            if not answer.startswith(NOTICE):
                image = image or (files[0] if files else None)
                if image is not None:
                    turns.append((" ".join(question), answer))
            question, files = [], []
    return image, turns


def _stop_on(event: threading.Event):
    from transformers import StoppingCriteria, StoppingCriteriaList

    class StopOnEvent(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            import torch

            return torch.full((input_ids.shape[0],), event.is_set(), dtype=torch.bool)

    return StoppingCriteriaList([StopOnEvent()])


def respond(vlm: VisionModel, message: dict | str, history: Sequence[dict],
            max_new_tokens: float = APP_MAX_NEW_TOKENS, temperature: float = DEFAULT_SETTINGS["temperature"],
            min_p: float = DEFAULT_SETTINGS["min_p"], greedy: bool = False) -> Iterator[str]:
    """Answer one chat message, yielding the answer so far as it streams (or one notice).

    Settings out of range, a conversation the model cannot take and a failed generation raise
    `AppRequestError` (after a notice, so the conversation stays usable).
    """
    from transformers import TextIteratorStreamer

    text, files = (message, []) if isinstance(message, str) else (message.get("text") or "", message.get("files") or [])
    new_files = [path for item in files for path in ([item] if isinstance(item, str) else content_parts(item)[1])]
    image_path, turns = conversation(history)
    if new_files and (image_path is not None or len(new_files) > 1):
        yield ONE_IMAGE
        return
    if new_files:
        try:
            image = load_image(new_files[0])
        except ImageLoadError:
            yield not_an_image(new_files[0])
            return
    elif image_path is None:
        yield NEED_IMAGE
        return
    else:
        image = load_image(image_path)
    settings = {"max_new_tokens": int(max_new_tokens), "temperature": temperature, "min_p": min_p,
                "do_sample": not greedy}
    try:
        sampling_kwargs(num_samples=1, **settings)
        chat = Chat(vlm, image, **settings)
        for question, answer in turns:
            chat.add_turn(question, answer)
    except (SettingsError, ChatError) as err:
        yield NOTICE + str(err)
        raise AppRequestError(str(err)) from err

    streamer = TextIteratorStreamer(vlm.processor.tokenizer, skip_prompt=True, skip_special_tokens=True,
                                    timeout=STREAM_TIMEOUT_S)
    stop = threading.Event()
    failure: list[BaseException] = []

    def work() -> None:
        try:
            chat.ask(text, stream=streamer, stopping_criteria=_stop_on(stop))
        except BaseException as err:  # reported below; the app keeps serving
            failure.append(err)
            streamer.end()

    worker = threading.Thread(target=work, daemon=True)
    worker.start()
    answer = ""
    try:
        for chunk in streamer:
            answer += chunk
            yield answer
    finally:
        stop.set()  # the stop button, or a closed tab, ends generation at the next token
        worker.join()
    if failure:
        reason = str(failure[0]) if isinstance(failure[0], (ChatError, SettingsError)) else (
            f"{type(failure[0]).__name__}: {failure[0]}")
        yield FAILED + reason  # a notice: the failed turn is left out of the next request's conversation
        raise AppRequestError(f"Generation failed: {reason}") from failure[0]


def example_messages(input_dir: Path | None = None) -> list[list[Any]]:
    """Ready-made questions about images from input/."""
    from .inputs import default_input_dir

    folder = input_dir or default_input_dir()
    pairs = [("receipt-1.jpeg", "Extract the receipt as JSON with the store, date, time, items and total."),
             ("calculator-1.png", "What operation is shown on the calculator, and what is the result?"),
             ("watch-face-2.jpg", "What time does the watch show?"),
             ("image_2.jpg", DEFAULT_INSTRUCTION)]
    return [[{"text": question, "files": [str(folder / name)]}] for name, question in pairs if (folder / name).exists()]


def build_app(vlm: VisionModel):
    """The chat app for a loaded model, as a Gradio Blocks (not yet launched)."""
    import gradio as gr

    def chat(message, history, max_new_tokens, temperature, min_p, greedy):
        try:
            yield from respond(vlm, message, history, max_new_tokens, temperature, min_p, greedy)
        except AppRequestError as err:  # shown in the page, and sent to API clients with its message
            raise gr.Error(str(err)) from err

    chat.__name__ = "respond"  # the API endpoint is named after the function: /respond
    settings = [
        gr.Slider(16, 2048, value=APP_MAX_NEW_TOKENS, step=16, label="max new tokens"),
        gr.Slider(0.1, 2.0, value=DEFAULT_SETTINGS["temperature"], step=0.05, label="temperature"),
        gr.Slider(0.0, 0.5, value=DEFAULT_SETTINGS["min_p"], step=0.01, label="min_p"),
        gr.Checkbox(value=False, label="greedy (ignores temperature and min_p)"),
    ]
    warning = " Its answers are noise: this is the tiny random test model." if vlm.is_random else ""
    defaults = [APP_MAX_NEW_TOKENS, DEFAULT_SETTINGS["temperature"], DEFAULT_SETTINGS["min_p"], False]
    examples = [example + defaults for example in example_messages()]
    return gr.ChatInterface(
        chat,
        multimodal=True,
        textbox=gr.MultimodalTextbox(file_types=["image"], file_count="single",
                                     placeholder="Upload an image and ask about it"),
        additional_inputs=settings,
        additional_inputs_accordion=gr.Accordion("Generation settings", open=False),
        examples=examples or None,
        cache_examples=False,
        title="Llama 3.2 Vision chat",
        description=f"Model: {vlm.model_name} ({vlm.backend}). One image per conversation.{warning}",
        analytics_enabled=False,
        fill_height=True,
    )


def launch(vlm: VisionModel, *, host: str = "127.0.0.1", port: int | None = None, share: bool = False,
           block: bool = True):
    """Serve the app; one generation runs at a time and the others wait in the queue."""
    demo = build_app(vlm)
    demo.queue(default_concurrency_limit=1, max_size=64)
    demo.launch(server_name=host, server_port=port, share=share, prevent_thread_lock=not block, quiet=not block,
                max_file_size=MAX_UPLOAD)
    return demo


def main(argv: Sequence[str] | None = None) -> int:
    """`python app.py`: the same as `llama-vision app`."""
    from .cli import main as cli_main

    return cli_main(["app", *(argv if argv is not None else sys.argv[1:])])


def run_app(args: argparse.Namespace) -> int:
    from .model import load_model

    try:
        import gradio  # noqa: F401
    except ImportError:
        print("The app needs gradio: pip install -e .[app]")
        return 2
    launch(load_model(args.model, backend=args.backend), host=args.host, port=args.port, share=args.share)
    return 0
