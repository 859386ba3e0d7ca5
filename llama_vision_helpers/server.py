"""An OpenAI-compatible HTTP API over the engine: `GET /v1/models`, `POST /v1/chat/completions` (FastAPI + uvicorn).

Clients speak the format they already speak to vLLM or Ollama: `chat.completion` objects, or with `stream` server-sent
`chat.completion.chunk` events ending with `data: [DONE]`; errors are OpenAI error bodies. The conversation rules are
the library's (`generation.check_conversation`); this module only translates and guards the door: an optional API key
(compared in constant time), no image fetched from the web unless allowed, never a file, and limits on body size,
image pixels and prompt length. FastAPI and uvicorn are imported only here (the `serve` extra).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from typing import Any, AsyncIterator

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from .engine import Delta, Done, Engine, EngineBusy, EngineClosed, Failed, PromptTooLong, Queued, Sampling
from .defaults import DEFAULT_SETTINGS
from .generation import ChatError, SettingsError, check_conversation
from .wire import API_KEY_ENV, DEFAULT_PORT, Limits, WireError, decode_image_url, error_body, from_openai_messages

MAX_STOP = 4
DISCONNECT_POLL_S = 0.5
# Images decoded and preprocessed at once. Each takes a core (and the interpreter lock part of the time); with
# more, a crowd's requests finish preparing together, late, instead of one after another from the first.
PREPARE_WORKERS = 2

class ChatCompletionRequest(BaseModel):
    """The fields of OpenAI's chat completion request this server honours; others are accepted and ignored."""

    model_config = ConfigDict(extra="allow")

    model: str | None = None
    messages: list[Any]
    stream: bool = False
    n: int = Field(1, ge=1)
    seed: int | None = None
    temperature: float | None = Field(None, ge=0, le=5)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    min_p: float | None = Field(None, ge=0, le=1)  # an extension, as vLLM and others take it
    min_tokens: int | None = Field(None, ge=0)  # an extension (as vLLM's): no end of turn before this many tokens
    stop: str | list[str] | None = None
    stream_options: dict | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, value):
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop strings")
        return [stop for stop in stops if stop]

    def sampling(self) -> Sampling:
        """The engine's settings: temperature 0 means greedy; what is not given is the library's default."""
        temperature = DEFAULT_SETTINGS["temperature"] if self.temperature is None else self.temperature
        max_new_tokens = self.max_completion_tokens or self.max_tokens or DEFAULT_SETTINGS["max_new_tokens"]
        return Sampling(
            max_new_tokens=max_new_tokens,
            min_new_tokens=min(self.min_tokens or 0, max_new_tokens),
            temperature=temperature if temperature > 0 else 1.0,
            min_p=DEFAULT_SETTINGS["min_p"] if self.min_p is None else self.min_p,
            do_sample=temperature > 0,
            num_samples=self.n,
            seed=self.seed,
            stop=tuple(self.stop or ()),
        )


def _error(status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
           code: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, type, param, code), status_code=status)


def create_app(engine: Engine, *, api_key: str | None = None, allow_image_urls: bool = False,
               limits: Limits = Limits(), prepare_workers: int = PREPARE_WORKERS) -> FastAPI:
    """The API over a running engine (not yet served: `serve` runs it with uvicorn). `prepare_workers`: requests
    whose image is decoded and preprocessed at once; the others wait their turn in order of arrival."""
    if prepare_workers < 1:
        raise ValueError(f"prepare_workers must be at least 1, got {prepare_workers}")
    app = FastAPI(title="llama-vision", docs_url=None, redoc_url=None, openapi_url=None)
    served_name = engine.model_name
    created = int(time.time())
    preparing = anyio.CapacityLimiter(prepare_workers)

    @app.middleware("http")
    async def check_api_key(request: Request, call_next):
        if api_key and request.url.path.startswith("/v1"):
            given = request.headers.get("authorization", "")
            scheme, _, token = given.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
                return _error(401, "This server needs an API key: send `Authorization: Bearer KEY` (with the "
                                   f"openai client, api_key=KEY; with this library, ${API_KEY_ENV}=KEY).",
                              type="authentication_error", code="invalid_api_key")
        return await call_next(request)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException):
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        return _error(err.status_code, f"{request.method} {request.url.path}: {err.detail}", type=kind)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": served_name, **engine.stats()}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [
            {"id": served_name, "object": "model", "created": created, "owned_by": "llama-vision"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        try:
            body = await _read_body(request, limits.max_body_bytes)
            params = _parse(body, limits)
            messages, urls = from_openai_messages(params.messages)
            check_conversation(messages, has_image=bool(urls))
            sampling = params.sampling()
            loop = asyncio.get_running_loop()
            events: asyncio.Queue = asyncio.Queue()

            def decode_and_prepare():
                image = decode_image_url(urls[0], allow_http=allow_image_urls,
                                         max_pixels=limits.max_image_pixels) if urls else None
                return engine.prepare(messages, image, sampling, fit_max_tokens=params.max_tokens is None and
                                      params.max_completion_tokens is None,
                                      on_event=lambda event: loop.call_soon_threadsafe(events.put_nowait, event))

            prepared = await anyio.to_thread.run_sync(decode_and_prepare, limiter=preparing)
            engine.queue.put(prepared)
        except WireError as err:
            return JSONResponse(err.body(), status_code=err.status)
        except PromptTooLong as err:
            return _error(400, str(err), param="messages", code="context_length_exceeded")
        except ChatError as err:
            return _error(400, str(err), param="messages", code="invalid_conversation")
        except SettingsError as err:  # sampling settings the library refuses, with what to do
            return _error(400, str(err), code="invalid_value")
        except EngineBusy as err:
            return _error(429, str(err), type="server_error", code="queue_full")
        except EngineClosed as err:
            return _error(503, str(err), type="server_error", code="shutting_down")
        completion = _Completion(served_name, prepared.prompt_tokens, params.n)
        if params.stream:
            include_usage = bool((params.stream_options or {}).get("include_usage"))
            return StreamingResponse(_stream(request, prepared, events, completion, include_usage),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        return await _complete(request, prepared, events, completion)

    return app


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    too_big = WireError(f"The request body is larger than this server takes ({limit:,} bytes): send a smaller "
                        "image.", status=413, code="request_too_large")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


def _parse(body: bytes, limits: Limits) -> ChatCompletionRequest:
    try:
        params = ChatCompletionRequest.model_validate_json(body)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(part) for part in first.get("loc", ())) or None
        if first.get("type") == "json_invalid":
            raise WireError(f"The body is not valid JSON: {first.get('msg')}.") from err
        raise WireError(f"{where}: {first.get('msg')}." if where else str(first.get("msg")), param=where) from err
    if params.n > limits.max_n:
        raise WireError(f"n is {params.n}; this server gives at most {limits.max_n} choices a request.", param="n")
    return params


class _Completion:
    """Builds the response objects of one completion."""

    def __init__(self, model: str, prompt_tokens: int, n: int) -> None:
        self.id = "chatcmpl-" + uuid.uuid4().hex
        self.created = int(time.time())
        self.model = model
        self.prompt_tokens = prompt_tokens
        self.texts = [""] * n
        self.finish: list[str | None] = [None] * n
        self.completion_tokens = 0

    def record(self, event: Done) -> None:
        self.finish[event.index] = "stop" if event.finish_reason == "cancelled" else event.finish_reason
        self.completion_tokens += event.completion_tokens

    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}

    def response(self) -> dict:
        return {
            "id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
            "choices": [{"index": i, "message": {"role": "assistant", "content": text}, "logprobs": None,
                         "finish_reason": self.finish[i]} for i, text in enumerate(self.texts)],
            "usage": self.usage(), "system_fingerprint": None,
        }

    def chunk(self, choices: list[dict], usage: dict | None = None) -> str:
        payload = {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                   "choices": choices, "system_fingerprint": None}
        if usage is not None:
            payload["usage"] = usage
        return f"data: {json.dumps(payload)}\n\n"

    @staticmethod
    def delta(index: int, delta: dict, finish_reason: str | None = None) -> dict:
        return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}


async def _next_event(request: Request, events: asyncio.Queue, prepared) -> Any:
    """The next engine event; cancels the generation if the client has gone."""
    while True:
        try:
            return await asyncio.wait_for(events.get(), DISCONNECT_POLL_S)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                prepared.cancel()
                raise asyncio.CancelledError("client disconnected") from None


async def _complete(request: Request, prepared, events: asyncio.Queue, completion: _Completion):
    remaining = len(completion.texts)
    try:
        while remaining:
            event = await _next_event(request, events, prepared)
            if isinstance(event, Delta):
                completion.texts[event.index] += event.text
            elif isinstance(event, Done):
                completion.record(event)
                remaining -= 1
            elif isinstance(event, Failed):
                return _error(500, f"Generation failed: {type(event.error).__name__}: {event.error}",
                              type="server_error")
    finally:
        prepared.cancel()  # a no-op when finished; frees the engine when the client went away
    return JSONResponse(completion.response())


async def _stream(request: Request, prepared, events: asyncio.Queue, completion: _Completion,
                  include_usage: bool) -> AsyncIterator[str]:
    remaining = len(completion.texts)
    try:
        yield completion.chunk([completion.delta(i, {"role": "assistant", "content": ""})
                                for i in range(remaining)])
        while remaining:
            event = await _next_event(request, events, prepared)
            if isinstance(event, Queued):
                yield f": queued, place {event.position}\n\n"  # an SSE comment: clients skip it
            elif isinstance(event, Delta):
                yield completion.chunk([completion.delta(event.index, {"content": event.text})])
            elif isinstance(event, Done):
                completion.record(event)
                remaining -= 1
                yield completion.chunk([completion.delta(event.index, {}, completion.finish[event.index])])
            elif isinstance(event, Failed):
                body = error_body(f"Generation failed: {type(event.error).__name__}: {event.error}", "server_error")
                yield f"data: {json.dumps(body)}\n\n"
                break
        if include_usage:
            yield completion.chunk([], usage=completion.usage())
        yield "data: [DONE]\n\n"
    finally:
        prepared.cancel()  # the client hung up (or we are done): stop generating for it


def serve(engine: Engine, *, host: str = "127.0.0.1", port: int = DEFAULT_PORT, api_key: str | None = None,
          allow_image_urls: bool = False, limits: Limits = Limits(), with_app: bool = False,
          log_level: str = "info") -> None:
    """Run the API with uvicorn until interrupted; `with_app` also serves the chat app at /app (same engine)."""
    import uvicorn

    app = create_app(engine, api_key=api_key, allow_image_urls=allow_image_urls, limits=limits)
    if with_app:
        from .app import mount

        app = mount(app, engine, api_key=api_key)
    uvicorn.run(app, host=host, port=port, log_level=log_level)
