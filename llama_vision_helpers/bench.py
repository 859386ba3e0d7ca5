"""Benchmark: load time, GPU memory, time to first token, decode speed and k-sample throughput per backend.

Each backend runs in its own Python process so that one backend's imports (unsloth patches transformers)
and memory do not leak into the next. `--random-weights 11b` builds the real architecture with random
weights (speed and memory do not depend on the values) so the benchmark runs without any download.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

BACKENDS: dict[str, dict[str, Any]] = {
    "transformers-bf16": {"backend": "transformers", "load_in_4bit": False, "bits": 16},
    "transformers-bnb4": {"backend": "transformers", "load_in_4bit": True, "bits": 4},
    "unsloth-4bit": {"backend": "unsloth", "load_in_4bit": True, "bits": 4},
}
RESULT_PREFIX = "BENCH_RESULT "
PROMPT = "Describe the image accurately."


@dataclass
class BenchResult:
    """What one backend measured; times in seconds, memory in GiB, speeds in tokens/s."""

    backend: str
    model: str
    device: str = ""
    load_s: float | None = None
    weights_gib: float | None = None
    peak_gib: float | None = None
    fit_weights_gib: float | None = None
    ttft_s: float | None = None
    decode_tok_s: float | None = None
    samples_tok_s: dict[int, float] = field(default_factory=dict)
    samples_wall_s: dict[int, float] = field(default_factory=dict)
    new_tokens: int = 0
    error: str | None = None


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any]) -> float:
    """Wall seconds of fn(), with the GPU's queued work included."""
    _sync()
    start = time.perf_counter()
    fn()
    _sync()
    return time.perf_counter() - start


def median_time(fn: Callable[[], Any], repeats: int) -> float:
    return statistics.median(timed(fn) for _ in range(repeats))


def _gib(n: float) -> float:
    return n / 1024**3


def benchmark_image(side: int = 1120):
    """A deterministic 1120x1120 image (4 tiles of 560 px) with some structure."""
    import numpy as np
    from PIL import Image

    grid = np.indices((side, side)).sum(axis=0) % 256
    return Image.fromarray(np.stack([grid, grid[::-1], grid.T], axis=-1).astype("uint8"))


def bench_backend(model: str, name: str, *, new_tokens: int = 128, samples: tuple[int, ...] = (1, 4, 8, 16),
                  repeats: int = 3, generate_options: dict | None = None) -> BenchResult:
    """Measure one backend in this process."""
    import torch

    from .architecture import estimate_memory
    from .generation import generate_answers, prepare_inputs, user_message
    from .model import load_model

    spec = BACKENDS[name]
    result = BenchResult(backend=name, model=model, new_tokens=new_tokens)
    cuda = torch.cuda.is_available()
    result.device = torch.cuda.get_device_name() if cuda else platform.processor() or "cpu"
    dtype = torch.bfloat16 if spec["bits"] == 16 else None
    start = time.perf_counter()
    vlm = load_model(model, backend=spec["backend"], load_in_4bit=spec["load_in_4bit"], dtype=dtype)
    _sync()
    result.load_s = time.perf_counter() - start
    if cuda:
        result.weights_gib = _gib(sum(torch.cuda.memory_allocated(i) for i in range(torch.cuda.device_count())))
        for i in range(torch.cuda.device_count()):
            torch.cuda.reset_peak_memory_stats(i)
    else:
        result.weights_gib = _gib(vlm.model.get_memory_footprint())
    config = vlm.model.config
    result.fit_weights_gib = _gib(estimate_memory(config, spec["bits"]).weights)

    inputs = prepare_inputs(vlm, [user_message(PROMPT, with_image=True)], benchmark_image())
    options = {"stream": False, "seed": 0, **(generate_options or {})}

    def run(tokens: int, k: int = 1) -> None:
        generate_answers(vlm, inputs, num_samples=k, max_new_tokens=tokens, min_new_tokens=tokens, **options)

    run(8)  # warm-up: kernels, caches, allocator
    result.ttft_s = median_time(lambda: run(1), repeats)
    full = median_time(lambda: run(new_tokens), repeats)
    result.decode_tok_s = (new_tokens - 1) / max(full - result.ttft_s, 1e-9)
    for k in samples:
        seconds = timed(lambda: run(new_tokens, k))
        result.samples_wall_s[k] = seconds
        result.samples_tok_s[k] = k * new_tokens / seconds
    if cuda:
        result.peak_gib = _gib(max(torch.cuda.max_memory_allocated(i) for i in range(torch.cuda.device_count())))
    return result


def _worker_command(model: str, name: str, new_tokens: int, samples: tuple[int, ...], repeats: int,
                    generate_options: dict | None) -> list[str]:
    payload = json.dumps({"model": model, "name": name, "new_tokens": new_tokens, "samples": list(samples),
                          "repeats": repeats, "generate_options": generate_options or {}})
    return [sys.executable, "-m", "llama_vision_helpers.bench", "--worker", payload]


def run_backend_isolated(model: str, name: str, *, new_tokens: int, samples: tuple[int, ...], repeats: int,
                         generate_options: dict | None = None, timeout: float | None = None) -> BenchResult:
    """Run `bench_backend` in a fresh Python process; a crash there becomes an error in the result."""
    command = _worker_command(model, name, new_tokens, samples, repeats, generate_options)
    try:
        done = subprocess.run(command, stdout=subprocess.PIPE, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return BenchResult(backend=name, model=model, error=f"timed out after {timeout:g} s")
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            data = json.loads(line[len(RESULT_PREFIX):])
            for key in ("samples_tok_s", "samples_wall_s"):
                data[key] = {int(k): v for k, v in data[key].items()}
            return BenchResult(**data)
    return BenchResult(backend=name, model=model, error=f"worker exited with code {done.returncode}")


def _worker(payload: str) -> int:
    args = json.loads(payload)
    try:
        result = bench_backend(args["model"], args["name"], new_tokens=args["new_tokens"],
                               samples=tuple(args["samples"]), repeats=args["repeats"],
                               generate_options=args["generate_options"])
    except Exception as err:  # reported in the table; the other backends still run
        result = BenchResult(backend=args["name"], model=args["model"], error=f"{type(err).__name__}: {err}"[:500])
    print(RESULT_PREFIX + json.dumps(asdict(result)), flush=True)
    return 0


def run_bench(model: str, backends: list[str], *, new_tokens: int = 128, samples: tuple[int, ...] = (1, 4, 8, 16),
              repeats: int = 3, isolate: bool = True, progress: bool = True, generate_options: dict | None = None,
              on_result: Callable[[list[BenchResult]], Any] | None = None) -> list[BenchResult]:
    """Benchmark each backend on `model` (a folder, hub id or 'tiny-random'); `on_result` sees the results so
    far after each backend."""
    from tqdm.auto import tqdm

    unknown = [b for b in backends if b not in BACKENDS]
    if unknown:
        raise ValueError(f"Unknown backend(s) {', '.join(unknown)}; choose from {', '.join(BACKENDS)}.")
    results = []
    for name in tqdm(backends, desc="backends", disable=not progress):
        kwargs = dict(new_tokens=new_tokens, samples=samples, repeats=repeats, generate_options=generate_options)
        results.append(run_backend_isolated(model, name, **kwargs) if isolate else bench_backend(model, name, **kwargs))
        print(format_table(results[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
        if on_result is not None:
            on_result(results)
    return results


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_table(results: list[BenchResult]) -> str:
    """A Markdown table: one row per backend, then the k-sample throughput."""
    ks = sorted({k for r in results for k in r.samples_tok_s})
    header = ["backend", "load s", "weights GiB", "fit GiB (error)", "peak GiB", "TTFT s", "decode tok/s"]
    header += [f"k={k} tok/s" for k in ks]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in results:
        if r.error:
            lines.append(f"| {r.backend} | error: {r.error} |" + " |" * (len(header) - 2))
            continue
        fit = "-"
        if r.fit_weights_gib is not None:
            fit = _fmt(r.fit_weights_gib)
            if r.weights_gib:
                fit += f" ({100 * (r.fit_weights_gib - r.weights_gib) / r.weights_gib:+.1f}%)"
        row = [r.backend, _fmt(r.load_s, 1), _fmt(r.weights_gib), fit, _fmt(r.peak_gib), _fmt(r.ttft_s, 3),
               _fmt(r.decode_tok_s, 1)] + [_fmt(r.samples_tok_s.get(k), 1) for k in ks]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def save_json(results: list[BenchResult], path: str | Path, **metadata: Any) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), "python": platform.python_version(),
            **metadata}
    try:
        import torch
        import transformers

        meta.update(torch=torch.__version__, transformers=transformers.__version__)
    except ImportError:
        pass
    path.write_text(json.dumps({"metadata": meta, "results": [asdict(r) for r in results]}, indent=2))
    return path


def random_weights_checkpoint(size: str) -> Path:
    """The cached random-weight checkpoint of the 11B or 90B shape, built on the GPU the first time."""
    from .model import cache_dir
    from .tiny import build_random_checkpoint, is_tiny_checkpoint

    path = cache_dir() / f"random-{size}"
    if not is_tiny_checkpoint(path):
        print(f"building a random-weight {size} checkpoint in {path} ...", file=sys.stderr, flush=True)
        build_random_checkpoint(path, size)
    return path


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--worker":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(_worker(sys.argv[2]))
