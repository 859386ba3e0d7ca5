"""`llama-vision loadtest`: will this server carry a room? N clients at once, each streaming its own answer.

For every client count, that many clients send one streamed chat request each at the same moment (through the
official `openai` client), each with its own image. Per request: time to first token (TTFT) and the stream's
tokens/s after it; per client count: the aggregate tokens/s (all tokens over the wall time) and p50/p95.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

DEFAULT_CLIENTS = (1, 8, 32)
DEFAULT_IMAGE_SIZE = 1120  # 2x2 tiles of 560 px: the real model's four tiles
QUESTION = "Describe the image accurately."


@dataclass
class StreamResult:
    """One client's request: seconds to the first token, tokens received, seconds from first token to the end."""

    client: int
    ttft_s: float
    tokens: int
    stream_s: float

    @property
    def tokens_per_s(self) -> float:
        """The stream's decode rate as its reader sees it: tokens after the first over the time after the first."""
        return (self.tokens - 1) / self.stream_s if self.tokens > 1 and self.stream_s > 0 else 0.0


def synthetic_image(index: int, size: int = DEFAULT_IMAGE_SIZE):
    """A distinct picture per client (stripes whose colour and width depend on `index`), `size` px square."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), (255 - 7 * index % 256, 40 + 13 * index % 200, 90))
    draw = ImageDraw.Draw(image)
    step = 20 + index % 17
    for x in range(0, size, 2 * step):
        draw.rectangle((x, 0, x + step, size), fill=(30 * index % 256, 200, 255 - x * 255 // size))
    return image


def percentile(values: Sequence[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(values, q)) if values else float("nan")


async def _one_stream(client: Any, model: str, index: int, image_url: str | None, max_tokens: int,
                      min_tokens: int | None, temperature: float) -> StreamResult:
    content: list[dict] = [{"type": "text", "text": QUESTION}]
    if image_url:
        content.insert(0, {"type": "image_url", "image_url": {"url": image_url}})
    extra = {"min_tokens": min_tokens} if min_tokens else None
    start = time.perf_counter()
    first = None
    chunks = 0
    usage = None
    stream = await client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": content}], max_tokens=max_tokens,
        temperature=temperature, stream=True, stream_options={"include_usage": True}, extra_body=extra)
    async for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        if chunk.choices and chunk.choices[0].delta.content:
            chunks += 1
            if first is None:
                first = time.perf_counter()
    end = time.perf_counter()
    first = first or end
    tokens = usage.completion_tokens if usage is not None else chunks
    return StreamResult(client=index, ttft_s=first - start, tokens=tokens, stream_s=end - first)


async def _round(client: Any, model: str, clients: int, image_urls: list[str | None], max_tokens: int,
                 min_tokens: int | None, temperature: float) -> tuple[list[StreamResult], list[str], float]:
    """One round: the streams that finished, what went wrong with the others, and the wall time. A request that
    fails is reported and the round goes on; if every one fails, the first error is raised."""
    start = time.perf_counter()
    outcomes = await asyncio.gather(*(
        _one_stream(client, model, i, image_urls[i % len(image_urls)], max_tokens, min_tokens, temperature)
        for i in range(clients)), return_exceptions=True)
    wall = time.perf_counter() - start
    results = [outcome for outcome in outcomes if isinstance(outcome, StreamResult)]
    failures = [outcome for outcome in outcomes if not isinstance(outcome, StreamResult)]
    if failures and not results:
        raise failures[0]
    errors = [f"client {i}: {type(outcome).__name__}: {outcome}" for i, outcome in enumerate(outcomes)
              if not isinstance(outcome, StreamResult)]
    return results, errors, wall


def summarize(clients: int, results: list[StreamResult], wall_s: float, errors: Sequence[str] = ()) -> dict:
    """The numbers a teacher reads: aggregate tokens/s, each stream's tokens/s (p50, slowest), TTFT p50/p95 (of
    the requests that finished; `errors` says what happened to the others)."""
    rates = [r.tokens_per_s for r in results]
    ttfts = [r.ttft_s for r in results]
    total = sum(r.tokens for r in results)
    return {
        "clients": clients, "tokens": total, "wall_s": round(wall_s, 3),
        "aggregate_tokens_per_s": round(total / wall_s, 1) if wall_s > 0 else 0.0,
        "stream_tokens_per_s_p50": round(percentile(rates, 50), 1),
        "stream_tokens_per_s_min": round(min(rates), 1) if rates else float("nan"),
        "ttft_s_p50": round(percentile(ttfts, 50), 3), "ttft_s_p95": round(percentile(ttfts, 95), 3),
        "requests": [asdict(r) | {"tokens_per_s": round(r.tokens_per_s, 1)} for r in results],
        "failed": len(errors), "errors": list(errors),
    }


def run_loadtest(url: str, clients: Sequence[int] = DEFAULT_CLIENTS, *, max_tokens: int = 128,
                 images: Sequence[str | Path] | None = None, image_size: int = DEFAULT_IMAGE_SIZE,
                 text_only: bool = False, force_length: bool = False, temperature: float = 0.0,
                 api_key: str | None = None, warmup_tokens: int = 8, timeout: float = 600.0,
                 on_level: Any = None) -> dict:
    """Run the rounds against an OpenAI-compatible server; returns the summary of each round (JSON-ready).

    `images`: files the clients take in turn (default: a distinct `image_size` px picture per client).
    `force_length`: ask the server for exactly `max_tokens` (`min_tokens`, an extension this package's server
    accepts), so that a model that would stop early (random weights) still produces them.
    `warmup_tokens`: before each timed round an untimed one with this many tokens (0: none), so that one-off
    work (CUDA graph capture for the batch size) is not counted.
    """
    from openai import AsyncOpenAI

    from .images import load_image
    from .wire import image_data_url

    if not clients or min(clients) < 1:
        raise ValueError("--clients needs one or more counts of at least 1")
    largest = max(clients)
    if text_only:
        urls: list[str | None] = [None]
    elif images:
        urls = [image_data_url(load_image(path)) for path in images]
    else:
        urls = [image_data_url(synthetic_image(i, image_size)) for i in range(largest)]

    async def main() -> list[dict]:
        client = AsyncOpenAI(base_url=url, api_key=api_key or "none", timeout=timeout, max_retries=0)
        try:
            model = (await client.models.list()).data[0].id
            levels = []
            for count in clients:
                if warmup_tokens:
                    await _round(client, model, count, urls, warmup_tokens,
                                 warmup_tokens if force_length else None, temperature)
                results, errors, wall = await _round(client, model, count, urls, max_tokens,
                                                     max_tokens if force_length else None, temperature)
                level = summarize(count, results, wall, errors)
                levels.append(level)
                if on_level is not None:
                    on_level(level)
            return levels
        finally:
            await client.close()

    levels = asyncio.run(main())
    return {"url": url, "max_tokens": max_tokens, "force_length": force_length, "temperature": temperature,
            "images": "none" if text_only else [str(p) for p in images] if images else f"synthetic {image_size}px",
            "levels": levels}


TABLE_COLUMNS = [("clients", "clients"), ("aggregate_tokens_per_s", "aggregate tok/s"),
                 ("stream_tokens_per_s_p50", "per stream tok/s p50"), ("stream_tokens_per_s_min", "slowest stream tok/s"),
                 ("ttft_s_p50", "TTFT p50 s"), ("ttft_s_p95", "TTFT p95 s"), ("tokens", "tokens"), ("wall_s", "wall s")]


def format_table(levels: list[dict]) -> str:
    """A Markdown table, one row per client count."""
    lines = ["| " + " | ".join(title for _, title in TABLE_COLUMNS) + " |",
             "|" + "---|" * len(TABLE_COLUMNS)]
    for level in levels:
        lines.append("| " + " | ".join(str(level[key]) for key, _ in TABLE_COLUMNS) + " |")
    for level in levels:
        if level.get("failed"):
            lines.append(f"\n{level['failed']} of {level['clients']} requests failed with {level['clients']} "
                         f"clients (the row counts the others); first: {level['errors'][0]}")
    return "\n".join(lines)
