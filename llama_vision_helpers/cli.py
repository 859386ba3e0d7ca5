"""`llama-vision`: describe an image, chat about it, serve the app or an API, check a seat, regenerate inputs,
benchmark, fit."""

from __future__ import annotations

import argparse
import json
import sys
import unicodedata
import warnings
from pathlib import Path
from typing import Callable, Sequence

from .defaults import BACKENDS, DEFAULT_SETTINGS

EXIT_BAD_INPUT = 2
PACKAGE_DIR = str(Path(__file__).resolve().parent)


class CliError(Exception):
    """A user mistake reported as one line on stderr with exit code 2."""


class HelpWithDefaults(argparse.ArgumentDefaultsHelpFormatter):
    """`--help` that shows each option's default, where it has one that says something."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help="hub id, local folder, 'tiny-random', or a server: http://host:8000/v1, 'ollama' "
                             "(default: $LLAMA_VISION_MODEL or the 11B 4-bit model)")
    parser.add_argument("--backend", default="auto", choices=list(BACKENDS),
                        help="what runs the model: auto picks unsloth where it is installed and a GPU is present, else "
                             "transformers ($LLAMA_VISION_BACKEND replaces auto)")


def add_sampling_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=DEFAULT_SETTINGS["max_new_tokens"],
                        help="longest answer, in tokens")
    parser.add_argument("--temperature", type=float, default=DEFAULT_SETTINGS["temperature"],
                        help="sampling temperature; 0 means greedy, as --greedy")
    parser.add_argument("--min-p", type=float, default=DEFAULT_SETTINGS["min_p"],
                        help="drop tokens less likely than this fraction of the likeliest one")
    parser.add_argument("--greedy", action="store_true", help="greedy decoding (ignores temperature and min-p)")
    parser.add_argument("--seed", type=int, default=None, help="make a sampled answer reproducible")


def sampling_settings(args: argparse.Namespace) -> dict:
    """The generation settings from the flags, checked (SettingsError) before any model is loaded."""
    from .generation import sampling_kwargs

    settings = {
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "min_p": args.min_p,
        "do_sample": not args.greedy and args.temperature != 0,
    }
    sampling_kwargs(num_samples=1, **settings)
    return {**settings, "seed": args.seed}


def printable(text: str) -> str:
    """Model text safe for a terminal: control characters (escape sequences, bells...) shown as escapes."""
    return "".join(
        ch if ch in "\n\t" or unicodedata.category(ch) != "Cc" else ch.encode("unicode_escape").decode("ascii")
        for ch in text
    )


def print_stream(chunk: str) -> None:
    print(printable(chunk), end="", flush=True)


def _load(args: argparse.Namespace):
    from .model import load_model

    return load_model(args.model, backend=args.backend)


def cmd_describe(args: argparse.Namespace) -> int:
    from .generation import describe_image
    from .images import load_image

    settings = sampling_settings(args)
    image = load_image(args.image)  # check the input before spending time on the model
    vlm = _load(args)
    describe_image(vlm, image, args.instruction, stream=print_stream, **settings)
    print()
    return 0


def _stdin_is_open() -> bool:
    try:
        return sys.stdin is not None and not sys.stdin.closed and sys.stdin.fileno() >= 0
    except (OSError, ValueError):
        return False


def cmd_chat(args: argparse.Namespace, read_line: Callable[[str], str] = input) -> int:
    from .generation import Chat, ChatError

    from .images import load_image

    settings = sampling_settings(args)
    if read_line is input and not _stdin_is_open():
        raise CliError("chat reads your questions from standard input, which is closed; use `describe` instead")
    image = load_image(args.image)
    vlm = _load(args)
    chat = Chat(vlm, image, stream=print_stream, **settings)
    print("Ask about the image; an empty line or Ctrl-D ends the chat.", file=sys.stderr)
    while True:
        try:
            question = read_line("you> ").strip()
        except (EOFError, OSError, RuntimeError):  # end of input, or a stdin that went away (input() raises)
            break
        if question.lower() in ("", "exit", "quit"):
            break
        print("model> ", end="", flush=True)
        try:
            chat.ask(question)
        except ChatError as err:
            print(f"error: {err}", file=sys.stderr)
        print()
    return 0


def cmd_inputs(args: argparse.Namespace) -> int:
    from .inputs import write_inputs

    folder = write_inputs(args.output)
    print(f"wrote {len(list(folder.iterdir()))} files to {folder}/")
    return 0


def cmd_fit(args: argparse.Namespace) -> int:
    from .architecture import fit_table

    print(fit_table(args.model, tuple(args.bits), context_tokens=args.context, batch=args.batch))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import format_table, random_weights_checkpoint, run_bench, save_json

    if bool(args.model) == bool(args.random_weights):
        raise CliError("give a model (--model) or --random-weights 11b|90b, not both")
    if args.spread:
        from .bench import bench_spread

        if not args.random_weights:
            raise CliError("--spread goes with --random-weights 11b|90b")
        report = bench_spread(args.random_weights, new_tokens=min(args.new_tokens, 64), repeats=args.repeats)
        print(json.dumps(report, indent=2))
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=2))
        return 0
    model = str(random_weights_checkpoint(args.random_weights)) if args.random_weights else args.model
    label = args.model or f"random-weights {args.random_weights}"

    def save(results):  # after every backend, so a run cut short keeps what it measured
        if args.json:
            save_json(results, args.json, model=label, command=" ".join(sys.argv))

    results = run_bench(model, args.backends, new_tokens=args.new_tokens, samples=tuple(args.samples),
                        repeats=args.repeats, modes=tuple(args.modes), on_result=save)
    print(format_table(results))
    if args.json:
        print(f"\nsaved {args.json}")
    return 0 if all(r.error is None for r in results) else 1


def _add_app_options(parser: argparse.ArgumentParser) -> None:
    add_model_options(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for a room)")
    parser.add_argument("--port", type=int, default=None, help="port (default: Gradio's, 7860)")
    parser.add_argument("--share", action="store_true", help="also make a public link (off unless asked)")


def room_url(host: str, port: int) -> str:
    """The address to give the room: this machine's LAN address when listening on all interfaces."""
    import socket

    from .wire import url_host

    if host in ("0.0.0.0", "::", ""):
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
                probe.connect(("10.255.255.255", 1))  # picks the outgoing interface; sends nothing
                host = probe.getsockname()[0]
        except OSError:
            host = socket.gethostname()
    return f"http://{url_host(host)}:{port}/v1"


def cmd_serve(args: argparse.Namespace) -> int:
    import os

    try:
        from .server import serve
    except ImportError:
        raise CliError("the server needs FastAPI and uvicorn: pip install -e .[serve]") from None
    from .batch_scheduler import scheduler_for
    from .engine import Engine
    from .remote import is_remote
    from .wire import API_KEY_ENV, LOOPBACK_HOSTS, Limits

    if is_remote(args.model):
        raise CliError("serve runs a model on this machine: give a hub id, a folder or tiny-random, not a URL")
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    vlm = _load(args)
    engine = Engine(vlm, scheduler_for(vlm, args.max_batch))
    url = room_url(args.host, args.port)
    print(f"Serving {engine.model_name} at {url}", file=sys.stderr)
    if args.app:
        print(f"  the chat app: {url.removesuffix('/v1')}/app", file=sys.stderr)
    print(f"  on each laptop: LLAMA_VISION_MODEL={url}" + (f" {API_KEY_ENV}=<the key>" if api_key else ""),
          file=sys.stderr)
    if args.host not in LOOPBACK_HOSTS and not api_key:
        print("  warning: anyone who can reach this machine can use it; add --api-key KEY for a room",
              file=sys.stderr)
    limits = Limits(max_body_bytes=int(args.max_body_mb * 1024 * 1024), max_image_pixels=args.max_image_pixels)
    serve(engine, host=args.host, port=args.port, api_key=api_key, allow_image_urls=args.allow_image_urls,
          limits=limits, with_app=args.app)
    return 0


def cmd_loadtest(args: argparse.Namespace) -> int:
    import os

    try:
        import openai
    except ImportError:
        raise CliError("the load test needs the openai client: pip install -e .[serve]") from None
    from .loadtest import format_table, run_loadtest
    from .wire import API_KEY_ENV

    def report(level: dict) -> None:
        print(f"{level['clients']} clients: {level['aggregate_tokens_per_s']} tok/s in all, "
              f"{level['stream_tokens_per_s_p50']} tok/s a stream (p50), TTFT p95 {level['ttft_s_p95']} s"
              + (f", {level['failed']} failed" if level.get("failed") else ""), file=sys.stderr)

    for path in args.images or []:
        if not Path(path).is_file():
            raise CliError(f"no such image: {path}")
    try:
        result = run_loadtest(args.url, args.clients, max_tokens=args.max_tokens, images=args.images,
                              image_size=args.image_size, text_only=args.text_only, force_length=args.force_length,
                              temperature=args.temperature, api_key=args.api_key or os.environ.get(API_KEY_ENV),
                              warmup_tokens=args.warmup_tokens, on_level=report)
    except openai.APIConnectionError as err:
        raise CliError(f"cannot reach {args.url} ({err}): is the server running, and is the URL its /v1 address?")
    except openai.APIStatusError as err:
        raise CliError(f"the server refused the load test's request: {err.message}")
    print(format_table(result["levels"]))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from .doctor import run_doctor

    return run_doctor(args.model)


def cmd_app(args: argparse.Namespace) -> int:
    from .app import run_app  # gradio is imported only when the app is asked for

    return run_app(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llama-vision", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    describe = sub.add_parser("describe", help="stream a description of (or an answer about) an image")
    describe.add_argument("image", help="path or http(s) URL of the image")
    describe.add_argument("instruction", nargs="?", default=None, help="what to ask (default: describe it)")
    add_model_options(describe)
    add_sampling_options(describe)
    describe.set_defaults(handler=cmd_describe)

    chat = sub.add_parser("chat", help="a multi-turn chat about one image")
    chat.add_argument("image", help="path or http(s) URL of the image to talk about")
    add_model_options(chat)
    add_sampling_options(chat)
    chat.set_defaults(handler=cmd_chat)

    fit = sub.add_parser("fit", help="estimate GPU memory from the model's config alone")
    fit.add_argument("model", help="11b, 90b, a checkpoint folder or a hub id")
    fit.add_argument("--bits", type=float, nargs="+", default=[16, 8, 4], help="weight precisions to estimate")
    fit.add_argument("--context", type=int, default=2048, help="tokens of text context (KV cache)")
    fit.add_argument("--batch", type=int, default=1, help="conversations at once (KV caches)")
    fit.set_defaults(handler=cmd_fit)

    from .bench import BACKENDS as BENCH_BACKENDS

    bench = sub.add_parser("bench", help="load time, memory, time to first token and decode speed per backend")
    bench.add_argument("--model", default=None, help="hub id, folder or tiny-random")
    bench.add_argument("--random-weights", choices=["11b", "90b"], default=None,
                       help="build that architecture with random weights on the GPU (no download)")
    bench.add_argument("--backends", nargs="+", default=list(BENCH_BACKENDS), choices=list(BENCH_BACKENDS),
                       help="what to measure (unsloth-4bit needs a GPU)")
    bench.add_argument("--new-tokens", type=int, default=128, help="tokens per answer, forced")
    bench.add_argument("--samples", type=int, nargs="+", default=[1, 4, 8, 16],
                       help="answers per call (k samples of one prompt)")
    bench.add_argument("--repeats", type=int, default=3, help="timed runs per number (the median is kept)")
    bench.add_argument("--modes", nargs="+", default=["generate", "fast"], choices=["generate", "fast"],
                       help="decode with Hugging Face generate, the fast CUDA-graph loop, or both side by side")
    bench.add_argument("--json", default=None, help="also write the results to this JSON file")
    bench.add_argument("--spread", action="store_true",
                       help="with --random-weights: build it in memory across all GPUs (device_map) and time generate")
    bench.set_defaults(handler=cmd_bench)

    app = sub.add_parser("app", help="serve the Gradio chat app")
    _add_app_options(app)
    app.set_defaults(handler=cmd_app)

    from .wire import DEFAULT_PORT, MAX_BODY_MB, MAX_IMAGE_PIXELS

    serve = sub.add_parser("serve", help="an OpenAI-compatible API over one loaded model, for a room")
    add_model_options(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for a room)")
    serve.add_argument("--port", type=int, default=DEFAULT_PORT, help="port to listen on")
    serve.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` ($LLAMA_VISION_API_KEY)")
    serve.add_argument("--allow-image-urls", action="store_true",
                       help="let clients name http(s) images for the server to fetch (off: they send the image)")
    serve.add_argument("--max-body-mb", type=float, default=MAX_BODY_MB, help="largest request body")
    serve.add_argument("--max-batch", type=int, default=None,
                       help="answers decoded together at most (default: as many as the GPU memory holds, up to "
                            "64, on a CUDA GPU; 1, one request at a time, elsewhere)")
    serve.add_argument("--max-image-pixels", type=int, default=MAX_IMAGE_PIXELS, help="largest image, in pixels")
    serve.add_argument("--app", action="store_true", help="also serve the chat app at /app, on the same model")
    serve.set_defaults(handler=cmd_serve)

    loadtest = sub.add_parser("loadtest", help="many clients at once against a server: time to first token, tokens/s")
    loadtest.add_argument("url", help="the server's OpenAI base URL, e.g. http://127.0.0.1:8000/v1")
    loadtest.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32], help="clients at once, per round")
    loadtest.add_argument("--max-tokens", type=int, default=128, help="tokens each client asks for")
    loadtest.add_argument("--images", nargs="+", default=None,
                          help="images the clients take in turn (default: a different picture for each client)")
    loadtest.add_argument("--image-size", type=int, default=1120, help="side of the default pictures, in pixels")
    loadtest.add_argument("--text-only", action="store_true", help="send no image")
    loadtest.add_argument("--force-length", action="store_true",
                          help="ask for exactly --max-tokens tokens (min_tokens; for random weights, which stop early)")
    loadtest.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    loadtest.add_argument("--api-key", default=None, help="the server's key ($LLAMA_VISION_API_KEY)")
    loadtest.add_argument("--warmup-tokens", type=int, default=8, help="an untimed round of this many tokens first")
    loadtest.add_argument("--json", default=None, help="write every request's numbers here")
    loadtest.set_defaults(handler=cmd_loadtest)

    doctor = sub.add_parser("doctor", help="check this seat (or a server) before a session: one line per check")
    doctor.add_argument("--model", default=None, help="the model to check (default: $LLAMA_VISION_MODEL or the 11B)")
    doctor.set_defaults(handler=cmd_doctor)

    inputs = sub.add_parser("inputs", help="regenerate the input images, ground_truth.json and SOURCES.md")
    inputs.add_argument("--output", default="input", help="folder to write")
    inputs.set_defaults(handler=cmd_inputs)
    for subcommand in sub.choices.values():
        subcommand.formatter_class = HelpWithDefaults
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `llama-vision`; returns the exit code.

    The package's own user errors are one line on stderr and exit code 2; anything else is a bug and keeps
    its traceback.
    """
    from .architecture import ConfigNotFound
    from .generation import ChatError, SettingsError
    from .images import ImageLoadError
    from .model import CLI, ModelLoadError
    from .remote import ServerError

    parser = build_parser()
    args = parser.parse_args(argv)
    warnings.showwarning = _show_warning
    try:
        return args.handler(args)
    except ModelLoadError as err:
        print(f"llama-vision: error: {err.advice(CLI)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (CliError, ImageLoadError, ChatError, SettingsError, ConfigNotFound, ServerError) as err:
        print(f"llama-vision: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


_python_showwarning = warnings.showwarning


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """The package's own advice as one line, like the command's errors; anyone else's as Python shows it."""
    if issubclass(category, UserWarning) and str(Path(filename).resolve()).startswith(PACKAGE_DIR):
        print(f"llama-vision: note: {message}", file=sys.stderr)
    else:
        _python_showwarning(message, category, filename, lineno, file, line)


if __name__ == "__main__":
    sys.exit(main())
