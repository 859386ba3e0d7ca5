"""The Gradio chat app: upload an image, ask about it, follow up; answers stream as they are generated.

Each request gets its own TextIteratorStreamer and worker thread, so concurrent users never see each other's
tokens; the queue lets one generation use the GPU at a time and shows the others their place in line.
Gradio is imported only here (the `app` extra).
"""

from __future__ import annotations

import argparse
import sys
import threading
from pathlib import Path
from typing import Any, Iterator, Sequence

from .generation import assistant_message, generate_answers, prepare_inputs, user_message
from .images import ImageLoadError, load_image
from .model import VisionModel

NOTICE = "⚠️ "  # marks the app's own messages, which are left out of what the model sees
NEED_IMAGE = NOTICE + "Please upload an image first (drag it into the box or use the paperclip), then ask about it."
ONE_IMAGE = NOTICE + ("This conversation already has an image, and the model was trained on one image per "
                      "conversation. Start a new chat to ask about another image.")
STREAM_TIMEOUT_S = 600


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


def _stop_on(event: threading.Event):
    from transformers import StoppingCriteria, StoppingCriteriaList

    class StopOnEvent(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            import torch

            return torch.full((input_ids.shape[0],), event.is_set(), dtype=torch.bool)

    return StoppingCriteriaList([StopOnEvent()])


def respond(vlm: VisionModel, message: dict | str, history: Sequence[dict], max_new_tokens: float = 512,
            temperature: float = 1.5, min_p: float = 0.1, greedy: bool = False) -> Iterator[str]:
    """Answer one chat message, yielding the answer so far as it streams (or one notice)."""
    from transformers import TextIteratorStreamer

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
    if not text.strip():
        text = "Describe the image accurately."

    messages: list[dict] = []
    for index, (question, answer) in enumerate(turns):
        messages += [user_message(question, with_image=index == 0), assistant_message(answer)]
    messages.append(user_message(text, with_image=not turns))
    inputs = prepare_inputs(vlm, messages, load_image(image_path))
    streamer = TextIteratorStreamer(vlm.processor.tokenizer, skip_prompt=True, skip_special_tokens=True,
                                    timeout=STREAM_TIMEOUT_S)
    stop = threading.Event()
    failure: list[BaseException] = []

    def work() -> None:
        try:
            generate_answers(vlm, inputs, stream=streamer, stopping_criteria=_stop_on(stop),
                             max_new_tokens=int(max_new_tokens), temperature=temperature, min_p=min_p,
                             do_sample=not greedy)
        except BaseException as err:  # reported in the chat below; the app keeps serving
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
        yield answer + f"\n\n{NOTICE}Generation failed: {type(failure[0]).__name__}: {failure[0]}"


def example_messages(input_dir: Path | None = None) -> list[list[Any]]:
    """Ready-made questions about images from input/."""
    from .inputs import default_input_dir

    folder = input_dir or default_input_dir()
    pairs = [("receipt-1.jpeg", "Extract the receipt as JSON with the store, date, time, items and total."),
             ("calculator-1.png", "What operation is shown on the calculator, and what is the result?"),
             ("watch-face-2.jpg", "What time does the watch show?"),
             ("image_2.jpg", "Describe the image accurately.")]
    return [[{"text": question, "files": [str(folder / name)]}] for name, question in pairs if (folder / name).exists()]


def build_app(vlm: VisionModel):
    """The chat app for a loaded model, as a Gradio Blocks (not yet launched)."""
    import gradio as gr

    def chat(message, history, max_new_tokens, temperature, min_p, greedy):
        yield from respond(vlm, message, history, max_new_tokens, temperature, min_p, greedy)

    chat.__name__ = "respond"  # the API endpoint is named after the function: /respond
    settings = [
        gr.Slider(16, 2048, value=512, step=16, label="max new tokens"),
        gr.Slider(0.1, 2.0, value=1.5, step=0.05, label="temperature"),
        gr.Slider(0.0, 0.5, value=0.1, step=0.01, label="min_p"),
        gr.Checkbox(value=False, label="greedy (ignores temperature and min_p)"),
    ]
    warning = " Its answers are noise: this is the tiny random test model." if vlm.is_random else ""
    examples = [example + [512, 1.5, 0.1, False] for example in example_messages()]
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
    demo.launch(server_name=host, server_port=port, share=share, prevent_thread_lock=not block, quiet=not block)
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
