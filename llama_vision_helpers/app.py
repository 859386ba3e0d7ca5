"""The Gradio chat app: upload an image, ask about it, follow up; answers stream as they are generated.

The app holds no conversation logic of its own: each message rebuilds the library's `Chat` from the history and
asks it. Locally the model sits behind an `engine.Engine` (the same one `llama-vision serve --app` shares with the
API), which runs one generation at a time and tells the others their place in line; with `--model http://...`
the app is a client of a server. Gradio is imported only here (the `app` extra).
"""

from __future__ import annotations

import argparse
import queue
import sys
import threading
from pathlib import Path
from typing import Any, Iterator, Sequence

from .defaults import DEFAULT_SETTINGS
from .generation import Chat
from .images import ImageLoadError, load_image

NOTICE = "⚠️ "  # marks the app's own messages, which are left out of what the model sees
NEED_IMAGE = NOTICE + "Please upload an image first (drag it into the box or use the paperclip), then ask about it."
ONE_IMAGE = NOTICE + ("This conversation already has an image, and the model was trained on one image per "
                      "conversation. Start a new chat to ask about another image.")
PLACE_SHOWN_AFTER_S = 0.3  # a request that waits longer than this sees its place in line


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
    """The image path and the (question, answer) turns so far, leaving out turns the app answered itself."""
    image: str | None = None
    turns: list[tuple[str, str]] = []
    question: list[str] = []
    for message in history:
        texts, files = content_parts(message.get("content"))
        if message.get("role") == "user":
            image = image or (files[0] if files else None)
            question.extend(t for t in texts if t)
        elif message.get("role") == "assistant":
            answer = "".join(texts)
            if not answer.startswith(NOTICE) and image is not None:
                turns.append((" ".join(question), answer))
            question = []
    return image, turns


def _notice_of_place(position: int) -> str:
    ahead = position - 1
    return NOTICE + ("Waiting for the model: you are next." if ahead == 0 else
                     f"Waiting for the model: {ahead} request{'s' if ahead > 1 else ''} ahead of you.")


def respond(model: Any, message: dict | str, history: Sequence[dict], max_new_tokens: float = 512,
            temperature: float = DEFAULT_SETTINGS["temperature"], min_p: float = DEFAULT_SETTINGS["min_p"],
            greedy: bool = False) -> Iterator[str]:
    """Answer one chat message, yielding the answer so far as it streams (or one notice).

    `model`: a loaded model, a shared `engine.Engine` or a model on a server; the conversation is the library's
    `Chat`, rebuilt from the history. While a shared engine makes the request wait, its place in line is shown.
    """
    text, files = (message, []) if isinstance(message, str) else (message.get("text") or "", message.get("files") or [])
    new_files = [path for item in files for path in ([item] if isinstance(item, str) else content_parts(item)[1])]
    image_path, turns = conversation(history)
    if new_files and (image_path is not None or len(new_files) > 1):
        yield ONE_IMAGE
        return
    if new_files:
        try:
            load_image(new_files[0])
        except ImageLoadError as err:
            yield NOTICE + f"That file is not an image I can read ({Path(new_files[0]).name}): {err}"
            return
        image_path = new_files[0]
    if image_path is None:
        yield NEED_IMAGE
        return

    chat = Chat(model, image_path, stream=False, max_new_tokens=int(max_new_tokens), temperature=temperature,
                min_p=min_p, do_sample=not greedy)
    for question, answer in turns:
        chat.add_turn(question, answer)
    updates: queue.SimpleQueue = queue.SimpleQueue()
    stop = threading.Event()
    finished = object()

    def work() -> None:
        try:
            chat.ask(text, stream=lambda chunk: updates.put(chunk), stop_event=stop,
                     on_position=lambda place: updates.put(place))
            updates.put(finished)
        except BaseException as err:  # reported in the chat below; the app keeps serving
            updates.put(err)

    worker = threading.Thread(target=work, daemon=True)
    worker.start()
    answer, place = "", None
    try:
        while True:
            try:
                update = updates.get(timeout=PLACE_SHOWN_AFTER_S)
            except queue.Empty:
                if not answer and place is not None:
                    yield _notice_of_place(place)
                continue
            if update is finished:
                break
            if isinstance(update, BaseException):
                reason = str(update) if isinstance(update, ValueError) else f"{type(update).__name__}: {update}"
                yield (answer + "\n\n" if answer else "") + f"{NOTICE}{reason}"
                return
            if isinstance(update, int):
                place = update
            else:
                answer += update
                yield answer
    finally:
        stop.set()  # the stop button, or a closed tab, ends generation at the next token
        worker.join()
    if not answer:
        yield answer


def example_messages(input_dir: Path | None = None) -> list[list[Any]]:
    """Ready-made questions about images from input/."""
    from .inputs import default_input_dir

    folder = input_dir or default_input_dir()
    pairs = [("receipt-1.jpeg", "Extract the receipt as JSON with the store, date, time, items and total."),
             ("calculator-1.png", "What operation is shown on the calculator, and what is the result?"),
             ("watch-face-2.jpg", "What time does the watch show?"),
             ("image_2.jpg", "Describe the image accurately.")]
    return [[{"text": question, "files": [str(folder / name)]}] for name, question in pairs if (folder / name).exists()]


def build_app(model: Any):
    """The chat app for a model (an `Engine`, a model on a server, or a loaded model), not yet launched."""
    import gradio as gr

    def chat(message, history, max_new_tokens, temperature, min_p, greedy):
        yield from respond(model, message, history, max_new_tokens, temperature, min_p, greedy)

    chat.__name__ = "respond"  # the API endpoint is named after the function: /respond
    defaults = [512, DEFAULT_SETTINGS["temperature"], DEFAULT_SETTINGS["min_p"], False]
    settings = [
        gr.Slider(16, 2048, value=defaults[0], step=16, label="max new tokens"),
        gr.Slider(0.1, 2.0, value=defaults[1], step=0.05, label="temperature"),
        gr.Slider(0.0, 0.5, value=defaults[2], step=0.01, label="min_p"),
        gr.Checkbox(value=defaults[3], label="greedy (ignores temperature and min_p)"),
    ]
    warning = " Its answers are noise: this is the tiny random test model." if model.is_random else ""
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
        description=f"Model: {model.model_name} ({model.backend}). One image per conversation.{warning}",
        analytics_enabled=False,
        fill_height=True,
    )


# Gradio hands this many messages to the model at once; the engine queues them and shows each its place.
APP_CONCURRENCY = 32


def launch(model: Any, *, host: str = "127.0.0.1", port: int | None = None, share: bool = False,
           block: bool = True):
    """Serve the app. A loaded model is put behind an `Engine` first, so generations share it (batched on a
    CUDA GPU, taking turns elsewhere)."""
    from .batch_scheduler import scheduler_for
    from .engine import Engine
    from .model import VisionModel

    backend = Engine(model, scheduler_for(model)) if isinstance(model, VisionModel) else model
    demo = build_app(backend)
    demo.queue(default_concurrency_limit=APP_CONCURRENCY, max_size=256)
    demo.launch(server_name=host, server_port=port, share=share, prevent_thread_lock=not block, quiet=not block)
    return demo


def mount(fastapi_app: Any, engine: Any, *, path: str = "/app", api_key: str | None = None) -> Any:
    """Add the app to the API server at `path`, on the same engine; with an API key it asks for it as password."""
    import hmac

    import gradio as gr

    demo = build_app(engine).queue(default_concurrency_limit=APP_CONCURRENCY, max_size=256)
    auth = (lambda _user, password: hmac.compare_digest(password.encode(), api_key.encode())) if api_key else None
    return gr.mount_gradio_app(fastapi_app, demo, path=path, auth=auth,
                               auth_message="Any user name; the password is the room's API key." if auth else None)


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
    return 0  # a model on a server (--model http://...) is used as it is: the app is then its client
