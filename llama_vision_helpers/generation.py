"""Prompting and generation: `describe_image` for one question, `Chat` for a multi-turn conversation.

This module knows nothing about how the model was loaded; it only needs a `VisionModel`.
"""

from __future__ import annotations

import copy
import threading
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


class PromptTooLong(ChatError):
    """The prompt and the answer it may grow to do not fit in the model's context (the numbers are kept for
    callers that word the advice in their own terms, such as the server's `max_tokens`)."""

    def __init__(self, message: str, *, prompt_tokens: int | None = None, max_new_tokens: int | None = None,
                 limit: int | None = None) -> None:
        super().__init__(message)
        self.prompt_tokens, self.max_new_tokens, self.limit = prompt_tokens, max_new_tokens, limit


class SettingsError(ValueError):
    """A generation setting out of its range (temperature, min_p, max_new_tokens, num_samples)."""


# The conversation rules, in one place: Chat, the app and the server all check them here.
SYSTEM_WITH_IMAGE = ("Llama 3.2 Vision does not take a system message together with an image: put the instruction "
                     "in your first question instead.")
TWO_IMAGES = ("This conversation already has an image, and the model was trained on one image per conversation: "
              "start a new conversation for another image.")
LATE_IMAGE = "The image goes with the first question: start a new conversation with it."
ROLES = ("system", "user", "assistant")


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


def _image_count(message: dict) -> int:
    content = message.get("content")
    return 0 if isinstance(content, str) else sum(part.get("type") == "image" for part in content or [])


def check_conversation(messages: list[dict], has_image: bool) -> None:
    """Raise ChatError, saying what to do, unless `messages` is a conversation the model was trained for.

    The rules: roles are system, user, assistant; a system message only comes first; at most one image, in the first
    user turn, and only without a system message; the last turn is the user's question. `has_image` says whether an
    image comes with the messages (it must then have its placeholder, and the reverse).
    """
    if not messages:
        raise ChatError("The conversation is empty: send at least one user message.")
    for number, message in enumerate(messages):
        role = message.get("role")
        if role not in ROLES:
            raise ChatError(f"Message {number} has role {role!r}; use one of {', '.join(ROLES)}.")
        if role == "system" and number != 0:
            raise ChatError(f"Message {number} is a system message; a system message can only come first.")
    images = [number for number, message in enumerate(messages) if _image_count(message)]
    system = messages[0]["role"] == "system"
    first_user = next((n for n, m in enumerate(messages) if m["role"] == "user"), None)
    if sum(_image_count(m) for m in messages) > 1:
        raise ChatError(TWO_IMAGES)
    if images and system:
        raise ChatError(SYSTEM_WITH_IMAGE)
    if images and images[0] != first_user:
        raise ChatError(LATE_IMAGE)
    if bool(images) != has_image:
        raise ChatError("The image and its place in the conversation do not match: give the image with the first "
                        "user message." if has_image else "The conversation shows an image but none was given.")
    if messages[-1]["role"] != "user":
        raise ChatError("The last message must be the user's question; the model answers it.")


def render_prompt(processor: Any, messages: list[dict]) -> str:
    """The chat-templated prompt text, ending with the assistant header."""
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def prepare_inputs(vlm: VisionModel, messages: list[dict], image: Any = None, *, device: Any = None):
    """Tokenize the templated prompt and preprocess the image, on `device` (default: the model's).

    The template already starts with `<|begin_of_text|>`, so the tokenizer must not add another. A server prepares
    on the CPU (`device="cpu"`) and moves the inputs with `inputs_to_device` when their turn comes.
    """
    prompt = render_prompt(vlm.processor, messages)
    inputs = vlm.processor(
        images=[image] if image is not None else None,
        text=prompt,
        add_special_tokens=False,
        return_tensors="pt",
    )
    return inputs.to(vlm.device if device is None else device)


def tensor_to_device(value: Any, device: Any) -> Any:
    """`value` on `device`. From the CPU to a GPU through pinned memory, without waiting: a plain copy from
    pageable memory first waits for all the work queued on the GPU (a prefill, say)."""
    import torch

    if torch.device(device).type == "cuda" and value.device.type == "cpu":
        return value.pin_memory().to(device, non_blocking=True)
    return value.to(device)


def inputs_to_device(inputs: Any, device: Any) -> dict:
    """`inputs` (name -> tensor) on `device` (`tensor_to_device` each), as a plain dict."""
    return {name: tensor_to_device(value, device) for name, value in inputs.items()}


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


MAX_SEED = 2**32 - 1  # seeds reach numpy's generator (transformers' set_seed), which takes 32 bits


def check_seed(seed: int | None) -> None:
    """Raise `SettingsError` for a seed the random generators cannot take (None: no seed)."""
    if seed is not None and not 0 <= seed <= MAX_SEED:
        raise SettingsError(f"seed must be between 0 and {MAX_SEED:,} (2**32 - 1), got {seed}.")


def check_sampling(*, max_new_tokens: int, temperature: float, min_p: float, do_sample: bool,
                   num_samples: int, seed: int | None = None) -> None:
    """Raise `SettingsError`, saying what to do, for settings out of range (before anything is generated)."""
    check_seed(seed)
    if num_samples < 1:
        raise SettingsError(f"num_samples must be at least 1, got {num_samples}.")
    if max_new_tokens < 1:
        raise SettingsError(f"max_new_tokens must be at least 1, got {max_new_tokens}.")
    if do_sample:
        if not temperature > 0:
            raise SettingsError(
                f"temperature must be positive when sampling, got {temperature}; for greedy decoding use "
                "do_sample=False (on the command line: --greedy)."
            )
        if not 0 <= min_p <= 1:
            raise SettingsError(f"min_p must be between 0 and 1, got {min_p}.")
    elif num_samples > 1:
        raise SettingsError(
            "Greedy decoding gives the same answer every time: use do_sample=True for num_samples > 1."
        )


def sampling_kwargs(
    *, max_new_tokens: int, temperature: float, min_p: float, do_sample: bool, num_samples: int
) -> dict[str, Any]:
    """Arguments for `generate`; greedy decoding leaves the sampling knobs out.

    Raises `SettingsError` for a value out of range, before anything is generated.
    """
    check_sampling(max_new_tokens=max_new_tokens, temperature=temperature, min_p=min_p, do_sample=do_sample,
                   num_samples=num_samples)
    kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "use_cache": True, "do_sample": do_sample}
    if do_sample:
        kwargs.update(temperature=temperature, min_p=min_p, num_return_sequences=num_samples)
    return kwargs


def context_length(vlm: VisionModel) -> int | None:
    """How many tokens (prompt and answer together) the language model was trained to attend over."""
    config = getattr(getattr(vlm, "model", None), "config", None)
    text_config = getattr(config, "text_config", config)
    length = getattr(text_config, "max_position_embeddings", None)
    return length if isinstance(length, int) else None


def check_fits_context(vlm: VisionModel, prompt_tokens: int, max_new_tokens: int, *,
                       limit: int | None = None) -> None:
    """Raise `PromptTooLong` when the prompt and the answer it may grow to do not fit in the model's context (or in
    `limit` tokens, where whatever runs the model holds fewer)."""
    model_limit = context_length(vlm)
    limit = min(filter(None, (limit, model_limit)), default=None)
    if limit is not None and prompt_tokens + max_new_tokens > limit:
        where = "model's context" if limit == model_limit else "context this engine holds per answer"
        if prompt_tokens >= limit:
            message = (f"The prompt alone is {prompt_tokens} tokens: more than fits in the {where} of {limit} "
                       "tokens with an answer. Shorten the question or the conversation (Chat.reset()).")
        else:
            message = (f"The prompt is {prompt_tokens} tokens and max_new_tokens is {max_new_tokens}: together more "
                       f"than the {where} of {limit} tokens. Shorten the question or the conversation "
                       f"(Chat.reset()), or lower max_new_tokens to at most {limit - prompt_tokens}.")
        raise PromptTooLong(message, prompt_tokens=prompt_tokens, max_new_tokens=max_new_tokens, limit=limit)


def first_answer_streamer(streamer: Any):
    """Wrap a transformers streamer so that, of several sampled answers, it is fed the first one only."""
    from transformers.generation.streamers import BaseStreamer

    class FirstAnswer(BaseStreamer):
        def put(self, value):
            streamer.put(value[:1])

        def end(self):
            streamer.end()

    return FirstAnswer()


def generate_token_ids(
    vlm: VisionModel,
    inputs: Any,
    *,
    streamer: Any = None,
    seed: int | None = None,
    num_samples: int = 1,
    max_new_tokens: int = DEFAULT_SETTINGS["max_new_tokens"],
    temperature: float = DEFAULT_SETTINGS["temperature"],
    min_p: float = DEFAULT_SETTINGS["min_p"],
    do_sample: bool = DEFAULT_SETTINGS["do_sample"],
    fast: bool | None = None,
    **generate_kwargs: Any,
):
    """The new token ids (one row per answer, prompt excluded) of one local `generate` or fast-loop call.

    `streamer`: a transformers streamer (of several answers it gets the first). `fast`: the CUDA-graph decode loop
    (`fast_decode.py`); None uses it with the transformers backend on a CUDA GPU and keeps `generate` elsewhere.
    Extra keyword arguments go to `generate`.
    """
    import torch
    from transformers import set_seed

    kwargs = sampling_kwargs(
        max_new_tokens=max_new_tokens, temperature=temperature, min_p=min_p, do_sample=do_sample,
        num_samples=num_samples,
    )
    kwargs.update(generate_kwargs)
    check_fits_context(vlm, inputs["input_ids"].shape[1], max_new_tokens)
    check_seed(seed)
    if streamer is not None:
        kwargs["streamer"] = streamer if num_samples == 1 else first_answer_streamer(streamer)
    if seed is not None:
        set_seed(seed)
    with torch.inference_mode():
        output = _run_generate(vlm, inputs, kwargs, fast)
    return output[:, inputs["input_ids"].shape[1]:]


def generate_answers(
    vlm: VisionModel,
    inputs: Any,
    *,
    stream: StreamTarget = False,
    num_samples: int = 1,
    **settings: Any,
) -> list[str]:
    """Run one local generation over prepared inputs and return the decoded answers (prompt excluded).

    `stream`: True prints through TextStreamer, a callable receives each chunk, a transformers streamer is
    used as given; with `num_samples > 1` the first answer streams and all are returned. Other settings as
    `generate_token_ids`.
    """
    from transformers.generation.streamers import BaseStreamer

    streamer = collecting = None
    if stream is not False and stream is not None:
        if isinstance(stream, BaseStreamer):
            streamer = stream
        else:
            streamer = collecting = make_streamer(vlm.processor, on_text=stream if callable(stream) else None,
                                                  echo=stream is True)
    new_tokens = generate_token_ids(vlm, inputs, streamer=streamer, num_samples=num_samples, **settings)
    if collecting is not None and num_samples == 1:
        return [collecting.text]
    return _tokenizer(vlm.processor).batch_decode(new_tokens, skip_special_tokens=True)


def stream_callback(stream: StreamTarget) -> tuple[Callable[[str], Any] | None, Callable[[], None]]:
    """For backends that produce text rather than tokens: (a chunk callback or None, what to call at the end).

    True prints each chunk as it comes and ends the line, as TextStreamer does; a callable gets each chunk.
    """
    from transformers.generation.streamers import BaseStreamer

    if stream is True:
        return (lambda text: print(text, end="", flush=True)), (lambda: print(flush=True))
    if isinstance(stream, BaseStreamer):
        raise TypeError("A transformers streamer needs token ids, which only a local model produces: pass "
                        "stream=True to print, or a function that receives each piece of text.")
    if callable(stream):
        return stream, (lambda: None)
    return None, (lambda: None)


def _stop_on(event: threading.Event):
    """Stopping criteria that end generation once `event` is set (checked after every token)."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    class StopOnEvent(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            import torch

            return torch.full((input_ids.shape[0],), event.is_set(), dtype=torch.bool)

    return StoppingCriteriaList([StopOnEvent()])


def answer_messages(
    vlm: Any,
    messages: list[dict],
    image: Any = None,
    *,
    stream: StreamTarget = False,
    seed: int | None = None,
    num_samples: int = 1,
    stop_event: threading.Event | None = None,
    on_position: Callable[[int], Any] | None = None,
    **settings: Any,
) -> list[str]:
    """The answers to a conversation (checked against the rules), from wherever the model runs.

    A model object with an `answers` method (a server behind `remote.RemoteModel`, or a shared `engine.Engine`)
    gets the messages and image as they are; a locally loaded `VisionModel` tokenizes them here and generates.
    `stop_event`: set it to stop generating early (the answer so far is returned). `on_position`: called with the
    place in line while a shared engine makes the request wait.
    """
    check_conversation(messages, has_image=image is not None)
    check_sampling(num_samples=num_samples, **{name: settings.get(name, value)
                                               for name, value in DEFAULT_SETTINGS.items()})
    answers = getattr(vlm, "answers", None)
    if answers is not None:
        return answers(messages, image, stream=stream, seed=seed, num_samples=num_samples, stop_event=stop_event,
                       on_position=on_position, **settings)
    if stop_event is not None:
        settings["stopping_criteria"] = _stop_on(stop_event)
    inputs = prepare_inputs(vlm, messages, image)
    return generate_answers(vlm, inputs, stream=stream, seed=seed, num_samples=num_samples, **settings)


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

    Returns the answer as a string, or a list of `num_samples` answers drawn in one batched call. With
    `stream=True` a single answer is printed as it is generated and the returned string is exactly what was
    printed (less the final newline); with several, the first is printed as it is generated.
    `instruction=None` (or blank) asks the default question. Settings out of range raise `SettingsError`,
    a prompt too long for the model's context `ChatError`, both before anything is generated.
    Works the same on a local model and on a server (`load_model(url)`).
    """
    question = question_text(instruction)
    check_sampling(max_new_tokens=max_new_tokens, temperature=temperature, min_p=min_p, do_sample=do_sample,
                   num_samples=num_samples)
    picture = load_image(image)
    answers = answer_messages(
        vlm, [user_message(question, with_image=True)], picture, stream=stream, seed=seed,
        num_samples=num_samples, max_new_tokens=max_new_tokens, temperature=temperature, min_p=min_p,
        do_sample=do_sample, **generate_kwargs,
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
            raise ChatError(SYSTEM_WITH_IMAGE)
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
        """Ask a question (optionally giving the image now, if the chat has none yet) and return the answer.

        Settings override the chat's for this turn; `stop_event` / `on_position` as in `answer_messages`.
        """
        _refuse_num_samples(settings)
        new_image = None
        if image is not None:
            if self.image is not None:
                raise ChatError(TWO_IMAGES)
            if self._turns:
                raise ChatError(LATE_IMAGE)
            if self.system:
                raise ChatError(SYSTEM_WITH_IMAGE)
            new_image = load_image(image)
        picture = new_image if new_image is not None else self.image
        messages = self.messages(question, image_given_now=new_image is not None)
        options = {**self.settings, **settings}
        answer = answer_messages(self.vlm, messages, picture, **options)[0]
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
