"""An OpenAI-compatible HTTP API over the engine: `GET /v1/models`, `POST /v1/chat/completions` (FastAPI + uvicorn).

Clients speak the format they already speak to vLLM or Ollama: `chat.completion` objects, or with `stream` server-sent
`chat.completion.chunk` events ending with `data: [DONE]`; errors are OpenAI error bodies. The conversation rules are
the library's (`generation.check_conversation`); this module only translates and guards the door: an optional API key
(compared in constant time), no image fetched from the web unless allowed, never a file, and limits on body size,
image pixels and prompt length. FastAPI and uvicorn are imported only here (the `serve` extra).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import time
import uuid
from typing import Any, AsyncIterator

import anyio
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.trustedhost import TrustedHostMiddleware

from .engine import Delta, Done, Engine, EngineBusy, EngineClosed, Failed, PromptTooLong, Queued, Sampling
from .defaults import DEFAULT_SETTINGS
from .generation import ChatError, SettingsError, check_conversation
from .wire import (API_KEY_ENV, DEFAULT_PORT, LOOPBACK_HOSTS, Limits, WireError, decode_image_url, error_body,
                   from_openai_messages, url_host)

MAX_STOP = 4
DISCONNECT_POLL_S = 0.5
JSON_TYPE = "application/json"
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
        if self.n > 1 and temperature == 0:
            raise WireError(f"n is {self.n} with temperature 0: greedy decoding gives the same answer every time. "
                            "Ask for n=1, or sample with a temperature above 0.", param="n", code="invalid_value")
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
               limits: Limits = Limits(), prepare_workers: int = PREPARE_WORKERS,
               trusted_hosts: list[str] | None = None) -> FastAPI:
    """The API over a running engine (not yet served: `serve` runs it with uvicorn). `prepare_workers`: requests
    whose image is decoded and preprocessed at once; the others wait their turn in order of arrival.
    `trusted_hosts`: the only Host names answered (None: any; `serve` gives the loopback names when it listens on
    this machine alone)."""
    if prepare_workers < 1:
        raise ValueError(f"prepare_workers must be at least 1, got {prepare_workers}")
    app = FastAPI(title="llama-vision", docs_url=None, redoc_url=None, openapi_url=None)
    if trusted_hosts:
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(trusted_hosts))
    served_name = engine.model_name
    created = int(time.time())
    preparing = anyio.CapacityLimiter(prepare_workers)

    # The key is checked as a dependency of the /v1 routes, not in an HTTP middleware: with one of those in the way,
    # a handler can no longer tell that its client has hung up, and a request left behind would run to its end.
    async def check_api_key(request: Request) -> None:
        if api_key:
            given = request.headers.get("authorization", "")
            scheme, _, token = given.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
                raise WireError("This server needs an API key: send `Authorization: Bearer KEY` (with the openai "
                                f"client, api_key=KEY; with this library, ${API_KEY_ENV}=KEY).", status=401,
                                type="authentication_error", code="invalid_api_key")

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(check_api_key)])

    @app.exception_handler(WireError)
    async def wire_error(request: Request, err: WireError):
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException):
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        return _error(err.status_code, f"{request.method} {request.url.path}: {err.detail}", type=kind)

    @app.get("/health")
    async def health():
        stats = {"model": served_name, **engine.stats()}
        if not engine.healthy:
            reason = engine.queue.closed_reason or "the engine is not running"
            return JSONResponse({"status": "failed", "error": reason, **stats}, status_code=503)
        return {"status": "ok", **stats}

    @v1.get("/models")
    async def models() -> dict:
        return {"object": "list", "data": [
            {"id": served_name, "object": "model", "created": created, "owned_by": "llama-vision"}]}

    @v1.post("/chat/completions")
    async def chat_completions(request: Request):
        try:
            _check_json(request)
            body = await _read_body(request, limits.max_body_bytes)
            params = _parse(body, limits)
            if params.model and params.model != served_name:
                raise WireError(f"The model {params.model!r} is not served here; this server serves "
                                f"{served_name!r} (GET /v1/models lists it).", status=404, param="model",
                                code="model_not_found")
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
        except (ChatError, SettingsError, EngineBusy, EngineClosed) as err:  # (a WireError goes to its handler)
            return _refusal(err)
        completion = _Completion(served_name, prepared.prompt_tokens, params.n)
        if params.stream:
            include_usage = bool((params.stream_options or {}).get("include_usage"))
            return StreamingResponse(_stream(request, prepared, events, completion, include_usage),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        return await _complete(request, prepared, events, completion)

    app.include_router(v1)
    return app


def _check_json(request: Request) -> None:
    """Only JSON bodies: a web page may send other types to any address without asking, this one it may not."""
    media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if media_type != JSON_TYPE:
        raise WireError(f"The body must be JSON, sent with `Content-Type: {JSON_TYPE}` (got "
                        f"{media_type or 'no Content-Type'}).", status=415, code="unsupported_media_type")


def _refusal(err: ChatError | SettingsError | EngineBusy | EngineClosed) -> JSONResponse:
    """The response to a request the library or the engine refuses, with what to do."""
    if isinstance(err, PromptTooLong):
        return _error(400, _too_long(err), param="messages", code="context_length_exceeded")
    if isinstance(err, ChatError):
        return _error(400, str(err), param="messages", code="invalid_conversation")
    if isinstance(err, SettingsError):  # sampling settings out of range
        return _error(400, str(err), code="invalid_value")
    if isinstance(err, EngineBusy):
        return _error(429, str(err), type="server_error", code="queue_full")
    return _error(503, str(err), type="server_error", code="shutting_down")


def _too_long(err: PromptTooLong) -> str:
    """The advice for a conversation that does not fit, in the API's terms (max_tokens, not max_new_tokens)."""
    if err.limit is None or err.prompt_tokens is None:
        return str(err)
    if err.prompt_tokens >= err.limit:
        return (f"The conversation is {err.prompt_tokens} tokens: more than fits in this server's context of "
                f"{err.limit} tokens with an answer. Shorten the conversation.")
    return (f"The conversation is {err.prompt_tokens} tokens and max_tokens is {err.max_new_tokens}: together more "
            f"than this server's context of {err.limit} tokens. Lower max_tokens to at most "
            f"{err.limit - err.prompt_tokens}, or shorten the conversation.")


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


async def _engine_events(request: Request, events: asyncio.Queue, prepared) -> AsyncIterator[Any]:
    """The engine's events for this request. Every `DISCONNECT_POLL_S`, whether or not events keep coming, it checks
    that the client is still there; if it has gone, the generation is cancelled."""
    next_check = time.monotonic() + DISCONNECT_POLL_S
    while True:
        event = None
        if not events.empty():
            event = events.get_nowait()
        else:
            try:
                event = await asyncio.wait_for(events.get(), max(next_check - time.monotonic(), 0.001))
            except asyncio.TimeoutError:
                pass
        if time.monotonic() >= next_check:
            if await request.is_disconnected():
                prepared.cancel()
                raise asyncio.CancelledError("client disconnected")
            next_check = time.monotonic() + DISCONNECT_POLL_S
        if event is not None:
            yield event


async def _complete(request: Request, prepared, events: asyncio.Queue, completion: _Completion):
    remaining = len(completion.texts)
    try:
        async with contextlib.aclosing(_engine_events(request, events, prepared)) as engine_events:
            async for event in engine_events:
                if isinstance(event, Delta):
                    completion.texts[event.index] += event.text
                elif isinstance(event, Done):
                    completion.record(event)
                    remaining -= 1
                    if not remaining:
                        break
                elif isinstance(event, Failed):
                    if isinstance(event.error, SettingsError):  # the request's own settings, found when it ran
                        return _refusal(event.error)
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
        async with contextlib.aclosing(_engine_events(request, events, prepared)) as engine_events:
            async for event in engine_events:
                if isinstance(event, Queued):
                    yield f": queued, place {event.position}\n\n"  # an SSE comment: clients skip it
                elif isinstance(event, Delta):
                    yield completion.chunk([completion.delta(event.index, {"content": event.text})])
                elif isinstance(event, Done):
                    completion.record(event)
                    remaining -= 1
                    yield completion.chunk([completion.delta(event.index, {}, completion.finish[event.index])])
                    if not remaining:
                        break
                elif isinstance(event, Failed):
                    body = error_body(f"Generation failed: {type(event.error).__name__}: {event.error}",
                                      "server_error")
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

    local_only = host in LOOPBACK_HOSTS
    app = create_app(engine, api_key=api_key, allow_image_urls=allow_image_urls, limits=limits,
                     trusted_hosts=[url_host(name) for name in LOOPBACK_HOSTS] if local_only else None)
    if with_app:
        from .app import mount

        app = mount(app, engine, api_key=api_key)
    uvicorn.run(app, host=host, port=port, log_level=log_level)
