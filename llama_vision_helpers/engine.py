"""The engine: one loaded model, a queue of requests, and a scheduler thread that runs them and streams their text.

Everything that generates for more than one caller (the HTTP server, the chat app) goes through an `Engine`, so a
room shares one model and one GPU. The engine is in three pieces:

- `Request`: one caller's work, fully prepared: the model inputs (prompt tokens and image, prepared on the CPU,
  so that preparing never waits for the GPU's queue; the scheduler moves them when the request's turn comes),
  the `Sampling` settings (seed, stop strings and token limit included), a cancel flag, and the sink the scheduler
  writes into. The caller reads `Event`s back (`Queued`, `Delta`, `Done`, `Failed`), by iterating the request or
  through its own callback.
- `RequestQueue`: what waits, in order; it knows each request's place in line and tells the request when it moves.
- `Scheduler`: takes requests from the queue and runs them on the model. `SerialScheduler` runs one request at a
  time through `generation.generate_token_ids` (the fast decode loop on a CUDA GPU, `generate` elsewhere).
  A batched scheduler implements the same one-method protocol (`run(engine)`), taking several requests at once
  with `queue.take_nowait()` between decode steps, and feeding each row's new token ids to `request.push_tokens`.

A scheduler never decodes text or applies stop strings itself: `Request.push_tokens` does both (incremental
detokenization as `TextStreamer` does it, stop strings that may span tokens) and answers whether that row still
wants tokens; `Request.finish` ends a row; `Request.fail` ends the whole request with an error.
"""

from __future__ import annotations

import dataclasses
import itertools
import queue
import threading
import warnings
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Protocol

from .defaults import DEFAULT_SETTINGS
from .generation import (PromptTooLong, check_fits_context, check_sampling, context_length, inputs_to_device,
                         prepare_inputs)
from .model import VisionModel

# --- what a request carries -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Sampling:
    """How to generate: the library's settings plus what the OpenAI API adds (stop strings, a seed per request)."""

    max_new_tokens: int = DEFAULT_SETTINGS["max_new_tokens"]
    temperature: float = DEFAULT_SETTINGS["temperature"]
    min_p: float = DEFAULT_SETTINGS["min_p"]
    do_sample: bool = DEFAULT_SETTINGS["do_sample"]
    num_samples: int = 1
    seed: int | None = None
    stop: tuple[str, ...] = ()
    min_new_tokens: int = 0  # no end of turn before this many tokens (load tests on random weights)

    def __post_init__(self) -> None:
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError(f"min_new_tokens must be between 0 and max_new_tokens, got {self.min_new_tokens}")
        check_sampling(max_new_tokens=self.max_new_tokens, temperature=self.temperature, min_p=self.min_p,
                       do_sample=self.do_sample, num_samples=self.num_samples, seed=self.seed)


@dataclass(frozen=True)
class Queued:
    """The request waits; `position` 1 means it runs next."""

    position: int


@dataclass(frozen=True)
class Delta:
    """New text of answer `index`."""

    index: int
    text: str


@dataclass(frozen=True)
class Done:
    """Answer `index` is complete: `finish_reason` is "stop" (end of turn or a stop string), "length" (the token
    limit) or "cancelled"; `completion_tokens` counts the tokens generated for it."""

    index: int
    finish_reason: str
    completion_tokens: int


@dataclass(frozen=True)
class Failed:
    """The request ended with an error; no further events follow."""

    error: BaseException


Event = Queued | Delta | Done | Failed


class EngineClosed(RuntimeError):
    """The engine was shut down; nothing more is accepted."""


class EngineBusy(RuntimeError):
    """Too many requests are waiting; the caller should try again later."""


_ids = itertools.count(1)
DEFAULT_CONTEXT = 131072  # Llama 3.2's, for a model whose config does not say
__all__ = ["Delta", "Done", "Engine", "EngineBusy", "EngineClosed", "Event", "Failed", "PromptTooLong", "Queued",
           "Request", "RequestQueue", "Sampling", "Scheduler", "SerialScheduler"]


class _Row:
    """Detokenizes one answer incrementally and applies the stop strings (the scheduler only hands token ids)."""

    def __init__(self, request: "Request", index: int) -> None:
        self.request, self.index = request, index
        self.tokens: list[int] = []
        self.decoded_upto = 0  # characters of the decoded text already considered (emitted or held back)
        self.emitted = ""
        self.finish_reason: str | None = None

    def _decode(self) -> str:
        return self.request.tokenizer.decode(self.tokens, skip_special_tokens=True)

    def push(self, token_ids: list[int]) -> bool:
        if self.finish_reason is not None:
            return False
        self.tokens.extend(token_ids)
        text = self._decode()
        # as TextStreamer: hold back an incomplete character, else emit what is there
        stable = text[:-1] if text.endswith("\ufffd") else text
        self._offer(stable)
        return self.finish_reason is None and not self.request.cancelled

    def _offer(self, text: str, final: bool = False) -> None:
        stops = self.request.sampling.stop
        found = [at for stop in stops if (at := text.find(stop, max(0, len(self.emitted) - len(stop) + 1))) != -1]
        if found:  # the answer ends where the first stop string in the text begins
            self._emit(text[:min(found)])
            self.finish_reason = "stop"
            return
        hold = 0
        if not final:  # keep back a tail that could be the start of a stop string
            for stop in stops:
                for size in range(min(len(stop) - 1, len(text)), 0, -1):
                    if text.endswith(stop[:size]):
                        hold = max(hold, size)
                        break
        self._emit(text[: len(text) - hold])

    def _emit(self, text: str) -> None:
        if len(text) > len(self.emitted) and text.startswith(self.emitted):
            new, self.emitted = text[len(self.emitted):], text
            self.request._send(Delta(self.index, new))

    def finish(self, reason: str) -> None:
        if self.finish_reason is None:
            self._offer(self._decode(), final=True)
        self.finish_reason = self.finish_reason or reason
        self.request._send(Done(self.index, self.finish_reason, len(self.tokens)))


class Request:
    """One caller's prepared generation: inputs, settings, cancel flag, and the events sent back.

    `on_event` receives every event on the scheduler's thread (the server forwards them to its event loop);
    without it, events are kept for iterating the request (`for event in request`).
    """

    def __init__(self, inputs: Any, sampling: Sampling, tokenizer: Any, *,
                 on_event: Callable[[Event], Any] | None = None) -> None:
        self.id = next(_ids)
        self.inputs = inputs
        self.sampling = sampling
        self.tokenizer = tokenizer
        self.prompt_tokens = int(inputs["input_ids"].shape[1])
        self._cancel = threading.Event()
        self._events: queue.SimpleQueue[Event] = queue.SimpleQueue()
        self._on_event = on_event
        self._rows = [_Row(self, i) for i in range(sampling.num_samples)]
        self._open = set(range(sampling.num_samples))
        self._ended = threading.Event()
        self._on_end: Callable[[Request], Any] | None = None  # the queue's bookkeeping
        self._on_cancel: Callable[[Request], Any] | None = None  # the queue's, while the request waits in it
        self.error: BaseException | None = None
        self.position: int | None = None  # place in line while queued; None once running

    # --- for the caller -----------------------------------------------------------------------------

    def cancel(self) -> None:
        """Stop as soon as possible (the scheduler checks between tokens); a queued request leaves the line at once."""
        self._cancel.set()
        drop = self._on_cancel  # (read once: the scheduler's thread may clear it meanwhile)
        if drop is not None:
            drop(self)

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    @property
    def done(self) -> bool:
        return self._ended.is_set()

    def __iter__(self) -> Iterator[Event]:
        """The events until the request ends (only without `on_event`)."""
        if self._on_event is not None:
            raise RuntimeError("this request sends its events to on_event")
        remaining = self.sampling.num_samples
        while remaining:
            event = self._events.get()
            yield event
            if isinstance(event, Failed):
                return
            remaining -= isinstance(event, Done)

    # --- for the scheduler --------------------------------------------------------------------------

    def wants_tokens(self, index: int = 0) -> bool:
        """Whether answer `index` still takes tokens (not finished, not stopped, request not cancelled)."""
        return not self.cancelled and self._rows[index].finish_reason is None

    def push_tokens(self, index: int, token_ids: list[int]) -> bool:
        """New token ids of answer `index`; sends their text. Returns whether the row wants more tokens."""
        return self._rows[index].push([int(t) for t in token_ids])

    def finish(self, index: int, reason: str) -> None:
        """Answer `index` is over ("stop": end of turn, "length": token limit, "cancelled": cut short).

        Sends the rest of its text; a row ended by a stop string reports "stop" whatever the scheduler says."""
        if index in self._open:
            self._open.discard(index)
            if not self._open:
                self._end()  # before the last event, so a caller that has it sees the bookkeeping done
            self._rows[index].finish("cancelled" if self.cancelled else reason)

    def finish_all(self, reason: str) -> None:
        """End every answer still open (a request cancelled before it ran)."""
        for index in sorted(self._open):
            self.finish(index, reason)

    def fail(self, error: BaseException) -> None:
        """End the request with an error (once)."""
        if not self._ended.is_set():
            self._open.clear()
            self.error = error
            self._end()
            self._send(Failed(error))

    def _end(self) -> None:
        self._ended.set()
        if self._on_end is not None:
            self._on_end(self)

    def set_position(self, position: int | None) -> None:
        if position != self.position:
            self.position = position
            if position is not None:
                self._send(Queued(position))

    def _send(self, event: Event) -> None:
        if self._on_event is not None:
            try:
                self._on_event(event)
            except Exception as err:  # a broken listener must not stop the scheduler
                warnings.warn(f"request {self.id}: event listener failed: {err}", stacklevel=2)
                self.cancel()
        else:
            self._events.put(event)


# --- the queue -------------------------------------------------------------------------------------------


class RequestQueue:
    """First come, first served; tells each waiting request its place when the line moves."""

    def __init__(self, max_waiting: int = 256) -> None:
        self._waiting: deque[Request] = deque()
        self._lock = threading.Condition()
        self.max_waiting = max_waiting
        self.closed = False
        self.closed_reason = ""
        self.running: set[Request] = set()
        self.counts = {"completed": 0, "cancelled": 0, "failed": 0}

    def __len__(self) -> int:
        with self._lock:
            return len(self._waiting)

    def put(self, request: Request) -> None:
        with self._lock:
            if self.closed:
                raise EngineClosed(f"{self.closed_reason}: nothing more is accepted")
            if len(self._waiting) >= self.max_waiting:
                raise EngineBusy(f"{len(self._waiting)} requests are already waiting; try again shortly")
            request._on_end, request._on_cancel = self._finished, self._drop
            self._waiting.append(request)
            request.set_position(len(self._waiting))
            self._lock.notify()

    def take(self, timeout: float | None = None) -> Request | None:
        """The next live request, waiting up to `timeout` seconds (None: until one comes or the queue closes)."""
        with self._lock:
            while True:
                request = self._pop()
                if request is not None or self.closed:
                    return request
                if not self._lock.wait(timeout):
                    return None

    def take_nowait(self) -> Request | None:
        """The next live request, or None if nothing waits (for a batched scheduler filling free slots)."""
        with self._lock:
            return self._pop()

    def _pop(self) -> Request | None:
        while self._waiting:
            request = self._waiting.popleft()
            request._on_cancel = None
            if request.cancelled:
                request.finish_all("cancelled")
                continue
            request.set_position(None)
            self.running.add(request)
            self._tell_places()
            return request
        return None

    def _drop(self, request: Request) -> None:
        """A waiting request was cancelled: it ends now, and the ones behind it move up."""
        with self._lock:
            if request not in self._waiting:  # taken meanwhile: the scheduler sees the cancel
                return
            self._waiting.remove(request)
            request._on_cancel = None
            request.finish_all("cancelled")
            self._tell_places()

    def _tell_places(self) -> None:
        place = 0
        for waiting in list(self._waiting):
            if waiting.cancelled or waiting not in self._waiting:
                continue
            place += 1
            waiting.set_position(place)
            if waiting not in self._waiting:  # its listener failed on the news, which cancels it: the next moves up
                place -= 1

    def _finished(self, request: Request) -> None:
        with self._lock:
            self.running.discard(request)
            outcome = "failed" if request.error else "cancelled" if request.cancelled else "completed"
            self.counts[outcome] += 1

    def fail_running(self, error: BaseException) -> None:
        """End every running request with `error` (their scheduler is gone)."""
        with self._lock:
            running = list(self.running)
        for request in running:  # (each takes the lock again to count itself)
            request.fail(error)

    def close(self, reason: str = "the engine shut down") -> None:
        """Accept nothing more; the waiting requests fail with `reason`."""
        with self._lock:
            if not self.closed:  # the first reason stays (an error, then the shutdown)
                self.closed, self.closed_reason = True, reason
            while self._waiting:
                request = self._waiting.popleft()
                request._on_cancel = None
                request.fail(EngineClosed(f"{reason} before this request ran"))
            self._lock.notify_all()


# --- schedulers ------------------------------------------------------------------------------------------


class Scheduler(Protocol):
    """Runs the engine's queued requests on its model, on the engine's thread, until the queue closes.

    Contract: take requests with `engine.queue.take()` / `take_nowait()`; for each answer row feed the new token
    ids to `request.push_tokens(index, ids)` (it returns False once that row is stopped or the request cancelled),
    call `request.finish(index, "stop" | "length")` for every row, and `request.fail(error)` if running it raised.
    Never let one request's failure stop the loop.
    """

    def run(self, engine: "Engine") -> None: ...


class SerialScheduler:
    """One request at a time: `generate_token_ids` with its own seed, streaming a single answer token by token."""

    def run(self, engine: "Engine") -> None:
        while True:
            request = engine.queue.take()
            if request is None:
                return
            try:
                self.run_one(engine.vlm, request)
            except Exception as err:  # reported to that caller; the engine keeps serving
                request.fail(err)

    @staticmethod
    def run_one(vlm: VisionModel, request: Request) -> None:
        from transformers import StoppingCriteria, StoppingCriteriaList
        from transformers.generation.streamers import BaseStreamer

        from .generation import generate_token_ids

        sampling = request.sampling
        single = sampling.num_samples == 1

        class Stop(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                import torch

                return torch.full((input_ids.shape[0],), not any(
                    request.wants_tokens(i) for i in range(sampling.num_samples)), dtype=torch.bool)

        class Sink(BaseStreamer):
            """The first `put` is the prompt; then one token at a time."""

            prompt_seen = False

            def put(self, value) -> None:
                if not self.prompt_seen:
                    self.prompt_seen = True
                    return
                request.push_tokens(0, [t for t in value.reshape(-1).tolist() if t not in eos])

            def end(self) -> None:
                pass

        eos = _eos_ids(vlm)
        new_tokens = generate_token_ids(
            vlm, inputs_to_device(request.inputs, vlm.device), streamer=Sink() if single else None,
            seed=sampling.seed,
            num_samples=sampling.num_samples, max_new_tokens=sampling.max_new_tokens,
            temperature=sampling.temperature, min_p=sampling.min_p, do_sample=sampling.do_sample,
            stopping_criteria=StoppingCriteriaList([Stop()]),
            **({"min_new_tokens": sampling.min_new_tokens} if sampling.min_new_tokens else {}),
        )
        for index, row in enumerate(new_tokens.tolist()):
            ended = next((at for at, token in enumerate(row) if token in eos), None)
            tokens = row if ended is None else row[:ended]
            if not single:
                request.push_tokens(index, tokens)
            # no end-of-turn token and short of the limit: stopped by a stop string or a cancel (the row knows which)
            reason = "stop" if ended is not None else "length" if len(tokens) >= sampling.max_new_tokens else "cancelled"
            request.finish(index, reason)


def _eos_ids(vlm: VisionModel) -> set[int]:
    eos = vlm.model.generation_config.eos_token_id
    return {eos} if isinstance(eos, int) else set(eos or [])


# --- the engine ------------------------------------------------------------------------------------------


class Engine:
    """Owns one loaded model; `submit` prepares a request and queues it; one scheduler thread runs them.

    Also usable as a model for `describe_image` and `Chat` (it implements `answers`), which is how the chat app
    shares the engine with the HTTP server.
    """

    def __init__(self, vlm: VisionModel, scheduler: Scheduler | None = None, *, max_waiting: int = 256) -> None:
        self.vlm = vlm
        self.scheduler = scheduler or SerialScheduler()
        self.queue = RequestQueue(max_waiting)
        # tokens an answer may have with its prompt: the model's context, or less where the scheduler holds less
        self.context_length = min(filter(None, (context_length(vlm) or DEFAULT_CONTEXT,
                                                getattr(self.scheduler, "context_length", None))))
        self.failure: BaseException | None = None  # what stopped the scheduler, if it stopped on an error
        self._thread = threading.Thread(target=self._run, name="llama-vision-engine", daemon=True)
        self._thread.start()

    # what the app shows about the model
    model_name = property(lambda self: self.vlm.model_name)
    backend = property(lambda self: self.vlm.backend)
    is_random = property(lambda self: self.vlm.is_random)

    def _run(self) -> None:
        try:
            self.scheduler.run(self)
        except BaseException as err:
            # the scheduler itself broke (not one request): nobody must wait for it, and nothing more is accepted
            self.failure = err
            reason = f"the engine stopped on an error ({type(err).__name__}: {err})"
            self.queue.close(reason)
            self.queue.fail_running(EngineClosed(reason))
            raise

    def prepare(self, messages: list[dict], image: Any, sampling: Sampling, *,
                on_event: Callable[[Event], Any] | None = None, fit_max_tokens: bool = False) -> Request:
        """Tokenize and preprocess on the caller's thread, on the CPU (not yet queued: `queue.put` it).

        Refuses a prompt that does not fit the context with the answer it asks for; `fit_max_tokens` instead
        lowers the token limit to what fits (for callers that did not choose one).
        """
        inputs = prepare_inputs(self.vlm, messages, image, device="cpu")  # moved to the GPU when its turn comes
        prompt_tokens = int(inputs["input_ids"].shape[1])
        room = self.context_length - prompt_tokens
        if fit_max_tokens and 1 <= room < sampling.max_new_tokens:
            sampling = dataclasses.replace(sampling, max_new_tokens=room,
                                           min_new_tokens=min(sampling.min_new_tokens, room))
        check_fits_context(self.vlm, prompt_tokens, sampling.max_new_tokens, limit=self.context_length)
        check_samples = getattr(self.scheduler, "check_samples", None)  # a scheduler with a fixed number of slots
        if check_samples is not None:
            check_samples(sampling.num_samples)
        tokenizer = getattr(self.vlm.processor, "tokenizer", self.vlm.processor)
        return Request(inputs, sampling, tokenizer, on_event=on_event)

    def submit(self, messages: list[dict], image: Any, sampling: Sampling, *,
               on_event: Callable[[Event], Any] | None = None) -> Request:
        """Prepare and queue a request; read its events by iterating it, or through `on_event`."""
        request = self.prepare(messages, image, sampling, on_event=on_event)
        self.queue.put(request)
        return request

    def waiting(self) -> int:
        """How many requests wait (not counting those running)."""
        return len(self.queue)

    def stats(self) -> dict[str, int]:
        """Requests waiting and running now, and how the others ended (completed, cancelled, failed)."""
        return {"waiting": len(self.queue), "running": len(self.queue.running), **self.queue.counts}

    @property
    def healthy(self) -> bool:
        """Whether the engine still serves: open, and its scheduler thread running."""
        return self.failure is None and not self.queue.closed and self._thread.is_alive()

    def close(self, timeout: float | None = 30) -> None:
        """Stop accepting requests, fail the waiting ones, and let the running one finish."""
        self.queue.close()
        self._thread.join(timeout)

    # --- as a model for generation.describe_image / Chat ---------------------------------------------

    def answers(self, messages: list[dict], image: Any, *, stream: Any = False, seed: int | None = None,
                num_samples: int = 1, stop_event: threading.Event | None = None,
                on_position: Callable[[int], Any] | None = None, **settings: Any) -> list[str]:
        """Run one conversation through the queue and return its answers (see `generation.answer_messages`)."""
        from .generation import stream_callback

        sampling = Sampling(seed=seed, num_samples=num_samples, **{**DEFAULT_SETTINGS, **settings})
        request = self.submit(messages, image, sampling)
        on_text, close = stream_callback(stream)
        texts = [""] * num_samples
        watcher = _cancel_when_set(stop_event, request)
        try:
            for event in request:
                if isinstance(event, Queued) and on_position is not None:
                    on_position(event.position)
                elif isinstance(event, Delta):
                    texts[event.index] += event.text
                    if on_text is not None and event.index == 0:  # of several answers, the first streams
                        on_text(event.text)
                elif isinstance(event, Failed):
                    raise event.error
        except BaseException:
            request.cancel()
            raise
        finally:
            if watcher is not None:
                watcher.set()
        close()
        return texts


def _cancel_when_set(stop_event: threading.Event | None, request: Request) -> threading.Event | None:
    """Cancel `request` when `stop_event` is set; returns the event that ends the watch."""
    if stop_event is None:
        return None
    finished = threading.Event()

    def watch() -> None:
        while not finished.wait(0.05):
            if stop_event.is_set():
                request.cancel()
                return

    threading.Thread(target=watch, daemon=True).start()
    return finished
