"""Prompting and generation: `describe_image` for one question, `Chat` for a multi-turn conversation.

This module knows nothing about how the model was loaded; it only needs a `VisionModel`.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any, Callable, Union

from .defaults import DEFAULT_INSTRUCTION, DEFAULT_SETTINGS
from .images import ImageSource, load_image
from .model import VisionModel

# Emitted by transformers' own Mllama vision encoder on every call; nothing a user can act on.
warnings.filterwarnings("ignore", message="`hidden_state` is deprecated", category=FutureWarning)

StreamTarget = Union[bool, Callable[[str], Any], Any]  # True/False, a chunk callback, or a transformers streamer


class ChatError(ValueError):
    """A conversation the model cannot take: two images, an image with a system message, no question, too long."""


class SettingsError(ValueError):
    """A generation setting out of its range (temperature, min_p, max_new_tokens, num_samples)."""


def question_text(question: str | None, *, with_image: bool = True) -> str:
    """The question to send: None or blank becomes the default question when there is an image to describe."""
    if question is not None and not isinstance(question, str):
        raise ChatError(f"The question must be text, not {type(question).__name__}.")
    if question is None or not question.strip():
        if not with_image:
            raise ChatError("Ask a question: without an image there is nothing to describe.")
        return DEFAULT_INSTRUCTION
    return question


def user_message(text: str, with_image: bool) -> dict:
    """One user turn in the processor's message format; the image placeholder comes before the text."""
    content: list[dict] = [{"type": "image"}] if with_image else []
    content.append({"type": "text", "text": text})
    return {"role": "user", "content": content}


def assistant_message(text: str) -> dict:
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


def render_prompt(processor: Any, messages: list[dict]) -> str:
    """The chat-templated prompt text, ending with the assistant header."""
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def prepare_inputs(vlm: VisionModel, messages: list[dict], image: Any = None):
    """Tokenize the templated prompt and preprocess the image, on the model's device.

    The template already starts with `<|begin_of_text|>`, so the tokenizer must not add another.
    """
    prompt = render_prompt(vlm.processor, messages)
    inputs = vlm.processor(
        images=[image] if image is not None else None,
        text=prompt,
        add_special_tokens=False,
        return_tensors="pt",
    )
    return inputs.to(vlm.device)


def _tokenizer(processor: Any):
    return getattr(processor, "tokenizer", processor)


def make_streamer(processor: Any, on_text: Callable[[str], Any] | None = None, echo: bool = True):
    """A `TextStreamer` that prints (when `echo`) and also keeps every chunk it emits."""
    from transformers import TextStreamer

    class CollectingStreamer(TextStreamer):
        def __init__(self) -> None:
            super().__init__(_tokenizer(processor), skip_prompt=True, skip_special_tokens=True)
            self.chunks: list[str] = []

        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            self.chunks.append(text)
            if on_text is not None and text:
                on_text(text)
            if echo:
                super().on_finalized_text(text, stream_end=stream_end)

        @property
        def text(self) -> str:
            return "".join(self.chunks)

    return CollectingStreamer()


def sampling_kwargs(
    *, max_new_tokens: int, temperature: float, min_p: float, do_sample: bool, num_samples: int
) -> dict[str, Any]:
    """Arguments for `generate`; greedy decoding leaves the sampling knobs out.

    Raises `SettingsError` for a value out of range, before anything is generated.
    """
    if num_samples < 1:
        raise SettingsError(f"num_samples must be at least 1, got {num_samples}.")
    if max_new_tokens < 1:
        raise SettingsError(f"max_new_tokens must be at least 1, got {max_new_tokens}.")
    kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "use_cache": True, "do_sample": do_sample}
    if do_sample:
        if not temperature > 0:
            raise SettingsError(
                f"temperature must be positive when sampling, got {temperature}; for greedy decoding use "
                "do_sample=False (on the command line: --greedy)."
            )
        if not 0 <= min_p <= 1:
            raise SettingsError(f"min_p must be between 0 and 1, got {min_p}.")
        kwargs.update(temperature=temperature, min_p=min_p, num_return_sequences=num_samples)
    elif num_samples > 1:
        raise SettingsError(
            "Greedy decoding gives the same answer every time: use do_sample=True for num_samples > 1."
        )
    return kwargs


def context_length(vlm: VisionModel) -> int | None:
    """How many tokens (prompt and answer together) the language model was trained to attend over."""
    config = getattr(getattr(vlm, "model", None), "config", None)
    text_config = getattr(config, "text_config", config)
    length = getattr(text_config, "max_position_embeddings", None)
    return length if isinstance(length, int) else None


def check_fits_context(vlm: VisionModel, prompt_tokens: int, max_new_tokens: int) -> None:
    """Raise `ChatError` when the prompt and the answer it may grow to do not fit in the model's context."""
    limit = context_length(vlm)
    if limit is not None and prompt_tokens + max_new_tokens > limit:
        raise ChatError(
            f"The prompt is {prompt_tokens} tokens and max_new_tokens is {max_new_tokens}: together more than the "
            f"model's context of {limit} tokens. Shorten the question or the conversation (Chat.reset()), or "
            "lower max_new_tokens."
        )


def first_answer_streamer(streamer: Any):
    """Wrap a transformers streamer so that, of several sampled answers, it is fed the first one only."""
    from transformers.generation.streamers import BaseStreamer

    class FirstAnswer(BaseStreamer):
        def put(self, value):
            streamer.put(value[:1])

        def end(self):
            streamer.end()

    return FirstAnswer()


def generate_answers(
    vlm: VisionModel,
    inputs: Any,
    *,
    stream: StreamTarget = False,
    seed: int | None = None,
    num_samples: int = 1,
    max_new_tokens: int = DEFAULT_SETTINGS["max_new_tokens"],
    temperature: float = DEFAULT_SETTINGS["temperature"],
    min_p: float = DEFAULT_SETTINGS["min_p"],
    do_sample: bool = DEFAULT_SETTINGS["do_sample"],
    fast: bool | None = None,
    **generate_kwargs: Any,
) -> list[str]:
    """Run one `generate` call over prepared inputs and return the decoded answers (prompt excluded).

    `stream`: True prints through TextStreamer, a callable receives each chunk, a transformers streamer is
    used as given; with `num_samples > 1` the first answer streams and all are returned. `fast`: the
    CUDA-graph decode loop (`fast_decode.py`); None uses it with the transformers backend on a CUDA GPU and keeps `generate` elsewhere. Extra keyword
    arguments go to `generate`.
    """
    import torch
    from transformers import set_seed
    from transformers.generation.streamers import BaseStreamer

    kwargs = sampling_kwargs(
        max_new_tokens=max_new_tokens, temperature=temperature, min_p=min_p, do_sample=do_sample,
        num_samples=num_samples,
    )
    kwargs.update(generate_kwargs)
    check_fits_context(vlm, inputs["input_ids"].shape[1], max_new_tokens)
    collecting = None
    if stream is not False and stream is not None:
        if isinstance(stream, BaseStreamer):
            streamer = stream
        else:
            collecting = make_streamer(vlm.processor, on_text=stream if callable(stream) else None,
                                       echo=stream is True)
            streamer = collecting
        kwargs["streamer"] = streamer if num_samples == 1 else first_answer_streamer(streamer)
    if seed is not None:
        set_seed(seed)
    with torch.inference_mode():
        output = _run_generate(vlm, inputs, kwargs, fast)
    new_tokens = output[:, inputs["input_ids"].shape[1]:]
    if collecting is not None and num_samples == 1:
        return [collecting.text]
    return _tokenizer(vlm.processor).batch_decode(new_tokens, skip_special_tokens=True)


def _run_generate(vlm: VisionModel, inputs: Any, kwargs: dict[str, Any], fast: bool | None):
    """The fast decode loop where it applies, else `model.generate`."""
    from .fast_decode import SUPPORTED_OPTIONS, FastDecodeUnsupported, fast_decoder_for

    # On by default where it is verified against generate: the transformers backend on a CUDA GPU. With unsloth's
    # patched model its logits drift from unsloth's own generate on the 11B shape, so there it is opt-in.
    use_fast = fast if fast is not None else (vlm.device.type == "cuda" and vlm.backend == "transformers")
    if use_fast and set(kwargs) <= SUPPORTED_OPTIONS:
        try:
            return fast_decoder_for(vlm).generate(inputs, **kwargs)
        except FastDecodeUnsupported as reason:
            if fast:
                warnings.warn(f"fast decoding is not available here ({reason}); using generate", stacklevel=3)
    return vlm.model.generate(**inputs, **kwargs)


def describe_image(
    vlm: VisionModel,
    image: ImageSource,
    instruction: str | None = DEFAULT_INSTRUCTION,
    *,
    max_new_tokens: int = DEFAULT_SETTINGS["max_new_tokens"],
    temperature: float = DEFAULT_SETTINGS["temperature"],
    min_p: float = DEFAULT_SETTINGS["min_p"],
    do_sample: bool = DEFAULT_SETTINGS["do_sample"],
    seed: int | None = None,
    stream: StreamTarget = True,
    num_samples: int = 1,
    **generate_kwargs: Any,
) -> str | list[str]:
    """Ask the model one question about one image.

    Returns the answer as a string, or a list of `num_samples` answers drawn in one batched `generate`
    call. With `stream=True` a single answer is printed as it is generated and the returned string is
    exactly what was printed (less the final newline); with several, the first is printed as it is generated.
    `instruction=None` (or blank) asks the default question. Settings out of range raise `SettingsError`,
    a prompt too long for the model's context `ChatError`, both before anything is generated.
    """
    question = question_text(instruction)
    sampling_kwargs(max_new_tokens=max_new_tokens, temperature=temperature, min_p=min_p, do_sample=do_sample,
                    num_samples=num_samples)
    picture = load_image(image)
    inputs = prepare_inputs(vlm, [user_message(question, with_image=True)], picture)
    answers = generate_answers(
        vlm, inputs, stream=stream, seed=seed, num_samples=num_samples, max_new_tokens=max_new_tokens,
        temperature=temperature, min_p=min_p, do_sample=do_sample, **generate_kwargs,
    )
    return answers if num_samples > 1 else answers[0]


class Chat:
    """A multi-turn conversation about (at most) one image, shown in the first user turn.

    `ask()` keeps the history; if it raises, the history is as it was before the call. A conversation holds
    one answer a turn, so `num_samples` is refused (`describe_image` draws several answers to one question).
    """

    def __init__(self, vlm: VisionModel, image: ImageSource | None = None, *, system: str | None = None,
                 **settings: Any) -> None:
        if system and image is not None:
            raise ChatError(
                "Llama 3.2 Vision does not take a system message together with an image: put the instruction "
                "in your first question instead."
            )
        _refuse_num_samples(settings)
        self.vlm = vlm
        self.image = load_image(image) if image is not None else None
        self.system = system
        self.settings = {**DEFAULT_SETTINGS, "stream": True, **settings}
        self._turns: list[dict] = []

    @property
    def history(self) -> list[dict]:
        """The conversation so far (user and assistant turns), as messages for the chat template."""
        return copy.deepcopy(self._turns)

    def reset(self) -> None:
        """Forget the turns; keep the image and the settings."""
        self._turns = []

    def messages(self, question: str | None, image_given_now: bool = False) -> list[dict]:
        """The full message list for the next question; the image goes in the first user turn only.

        A blank question about an image is the default question (`question_text`).
        """
        turns = copy.deepcopy(self._turns)
        has_image = self.image is not None or image_given_now
        show_image = not turns and has_image
        turns.append(user_message(question_text(question, with_image=has_image), with_image=show_image))
        if self.system:
            turns.insert(0, {"role": "system", "content": self.system})
        return turns

    def add_turn(self, question: str | None, answer: str) -> None:
        """Record a turn that already happened (a conversation restored from elsewhere), by the rules of `ask`."""
        messages = self.messages(question)
        self._turns.extend([messages[-1], assistant_message(answer)])

    def ask(self, question: str | None, image: ImageSource | None = None, **settings: Any) -> str:
        """Ask a question (optionally giving the image now, if the chat has none yet) and return the answer."""
        _refuse_num_samples(settings)
        new_image = None
        if image is not None:
            if self.image is not None:
                raise ChatError(
                    "This chat already has an image; the model was trained on one image per conversation. "
                    "Start a new Chat (or call reset() and create one) for another image."
                )
            if self._turns:
                raise ChatError("Give the image with the first question: start a new Chat with it.")
            if self.system:
                raise ChatError("A chat with a system message cannot take an image.")
            new_image = load_image(image)
        picture = new_image if new_image is not None else self.image
        messages = self.messages(question, image_given_now=new_image is not None)
        options = {**self.settings, **settings}
        inputs = prepare_inputs(self.vlm, messages, picture)
        answer = generate_answers(self.vlm, inputs, **options)[0]
        # Only a successful turn changes the state.
        if new_image is not None:
            self.image = new_image
        user_turn = messages[-1]
        self._turns.extend([user_turn, assistant_message(answer)])
        return answer


def _refuse_num_samples(settings: dict[str, Any]) -> None:
    if settings.get("num_samples", 1) != 1:
        raise SettingsError(
            "A Chat keeps one answer a turn, so it does not take num_samples; use describe_image(vlm, image, "
            "question, num_samples=k) for several answers to one question."
        )
