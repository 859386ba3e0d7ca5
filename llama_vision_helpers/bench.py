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

from .defaults import DEFAULT_INSTRUCTION

BACKENDS: dict[str, dict[str, Any]] = {
    "transformers-bf16": {"backend": "transformers", "load_in_4bit": False, "bits": 16},
    "transformers-bnb4": {"backend": "transformers", "load_in_4bit": True, "bits": 4},
    "unsloth-4bit": {"backend": "unsloth", "load_in_4bit": True, "bits": 4},
}
RESULT_PREFIX = "BENCH_RESULT "


MODES = ("generate", "fast")


@dataclass
class BenchResult:
    """What one backend measured in one decode mode; times in seconds, memory in GiB, speeds in tokens/s.

    `mode`: "generate" (Hugging Face generate) or "fast" (the CUDA-graph loop of fast_decode.py).
    The ceilings: `matmul_floor_tok_s` (all language-model linear layers applied to one token, replayed from
    one CUDA graph) and `bandwidth_limit_tok_s` (measured copy bandwidth / bytes of weights read per token).
    """

    backend: str
    model: str
    mode: str = "generate"
    device: str = ""
    load_s: float | None = None
    weights_gib: float | None = None
    fit_weights_gib: float | None = None
    peak_gib: float | None = None
    peak_k_gib: float | None = None
    ttft_s: float | None = None
    decode_tok_s: float | None = None
    samples_tok_s: dict[int, float] = field(default_factory=dict)
    samples_wall_s: dict[int, float] = field(default_factory=dict)
    new_tokens: int = 0
    logits_max_rel_diff: float | None = None
    argmax_agreement: float | None = None
    weights_read_gib: float | None = None
    copy_gbs: float | None = None
    matmul_floor_tok_s: float | None = None
    bandwidth_limit_tok_s: float | None = None
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


def _reset_peak() -> None:
    import torch

    for i in range(torch.cuda.device_count()):
        torch.cuda.reset_peak_memory_stats(i)


def _peak_gib() -> float:
    import torch

    return _gib(max(torch.cuda.max_memory_allocated(i) for i in range(torch.cuda.device_count())))


def copy_bandwidth_gbs(gib: float = 2.0, repeats: int = 10) -> float:
    """Device-to-device copy bandwidth, counting bytes read plus bytes written (GB/s)."""
    import torch

    source = torch.empty(int(gib * 1024**3), dtype=torch.uint8, device="cuda")
    target = torch.empty_like(source)
    target.copy_(source)
    seconds = median_time(lambda: target.copy_(source), repeats)
    return 2 * source.numel() / seconds / 1e9


def decode_weight_bytes(model) -> int:
    """Bytes of weights one decode step reads: the language model and lm_head, less the cross-attention key and
    value projections (the image's keys and values are cached after prefill)."""
    text = model.model.language_model
    cross = set(text.config.cross_attention_layers)
    skipped = {id(p) for i in cross for proj in ("k_proj", "v_proj")
               for p in getattr(text.layers[i].cross_attn, proj).parameters()}
    tensors = list(text.parameters()) + list(model.lm_head.parameters())
    return sum(t.numel() * t.element_size() for t in tensors if id(t) not in skipped)


def matmul_floor_seconds(model, repeats: int = 20) -> float:
    """One token through every linear layer of the language model and lm_head, replayed from one CUDA graph:
    the time a decode step would take with no overhead beyond the matrix products."""
    import torch

    text = model.model.language_model
    cross = set(text.config.cross_attention_layers)
    linears = [m for i, layer in enumerate(text.layers) for name, m in layer.named_modules()
               if isinstance(m, torch.nn.Linear) and not (i in cross and name.endswith(("k_proj", "v_proj")))]
    linears.append(model.lm_head)
    dtype = text.embed_tokens.weight.dtype
    inputs = {m.in_features: torch.randn(1, 1, m.in_features, dtype=dtype, device="cuda") for m in linears}
    with torch.inference_mode():
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for m in linears:
                m(inputs[m.in_features])
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for m in linears:
                m(inputs[m.in_features])
        graph.replay()
        return median_time(graph.replay, repeats)


def compare_fast_logits(vlm, inputs, steps: int = 32) -> tuple[float, float]:
    """Feed the tokens greedy `generate` chose to the fast loop; return (max |logit difference| / max |logit|,
    share of steps whose top token agrees)."""
    import torch

    from .fast_decode import fast_decoder_for

    with torch.inference_mode():
        reference = vlm.model.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                                       output_logits=True, return_dict_in_generate=True)
    expected = torch.cat(reference.logits).float()
    tokens = reference.sequences[0, inputs["input_ids"].shape[1]:].tolist()
    got = fast_decoder_for(vlm).teacher_forced_logits(inputs, tokens)
    difference = float((got - expected).abs().max() / expected.abs().max())
    agreement = float((got.argmax(-1) == expected.argmax(-1)).float().mean())
    return difference, agreement


def bench_backend(model: str, name: str, *, new_tokens: int = 128, samples: tuple[int, ...] = (1, 4, 8, 16),
                  repeats: int = 3, modes: tuple[str, ...] = MODES) -> list[BenchResult]:
    """Load one backend in this process and measure it in each decode mode."""
    import torch

    from .architecture import estimate_memory
    from .generation import generate_answers, prepare_inputs, user_message
    from .model import load_model

    spec = BACKENDS[name]
    cuda = torch.cuda.is_available()
    common = BenchResult(backend=name, model=model, new_tokens=new_tokens,
                         device=torch.cuda.get_device_name() if cuda else platform.processor() or "cpu")
    dtype = torch.bfloat16 if spec["bits"] == 16 else None
    start = time.perf_counter()
    vlm = load_model(model, backend=spec["backend"], load_in_4bit=spec["load_in_4bit"], dtype=dtype)
    _sync()
    common.load_s = time.perf_counter() - start
    if cuda:
        common.weights_gib = _gib(sum(torch.cuda.memory_allocated(i) for i in range(torch.cuda.device_count())))
    else:
        common.weights_gib = _gib(vlm.model.get_memory_footprint())
    common.fit_weights_gib = _gib(estimate_memory(vlm.model.config, spec["bits"]).weights)
    common.weights_read_gib = _gib(decode_weight_bytes(vlm.model))
    if cuda:
        common.copy_gbs = copy_bandwidth_gbs()
        common.bandwidth_limit_tok_s = common.copy_gbs * 1e9 / decode_weight_bytes(vlm.model)
        common.matmul_floor_tok_s = 1 / matmul_floor_seconds(vlm.model)
    inputs = prepare_inputs(vlm, [user_message(DEFAULT_INSTRUCTION, with_image=True)], benchmark_image())

    results = []
    for mode in modes:
        result = BenchResult(**{**asdict(common), "mode": mode})
        options = {"stream": False, "seed": 0, "fast": mode == "fast"}

        def run(tokens: int, k: int = 1) -> None:
            generate_answers(vlm, inputs, num_samples=k, max_new_tokens=tokens, min_new_tokens=tokens, **options)

        try:
            run(8)  # warm-up: kernels, caches, allocator, graph capture
            if cuda:
                _reset_peak()
            result.ttft_s = median_time(lambda: run(1), repeats)
            full = median_time(lambda: run(new_tokens), repeats)
            result.decode_tok_s = (new_tokens - 1) / max(full - result.ttft_s, 1e-9)
            if cuda:
                result.peak_gib = _peak_gib()
            for k in samples:
                run(8, k)  # each batch size has its own kernels (and graph)
                seconds = timed(lambda: run(new_tokens, k))
                result.samples_wall_s[k] = seconds
                result.samples_tok_s[k] = k * new_tokens / seconds
            if cuda:
                result.peak_k_gib = _peak_gib()
            if mode == "fast":
                result.logits_max_rel_diff, result.argmax_agreement = compare_fast_logits(vlm, inputs)
        except Exception as err:  # one mode failing leaves the other's numbers
            result.error = f"{type(err).__name__}: {err}"[:500]
        results.append(result)
    return results


def _result_from_json(data: dict) -> BenchResult:
    for key in ("samples_tok_s", "samples_wall_s"):
        data[key] = {int(k): v for k, v in data[key].items()}
    return BenchResult(**data)


def run_backend_isolated(model: str, name: str, *, new_tokens: int, samples: tuple[int, ...], repeats: int,
                         modes: tuple[str, ...] = MODES) -> list[BenchResult]:
    """Run `bench_backend` in a fresh Python process; a crash there becomes an error in the result."""
    payload = json.dumps({"model": model, "name": name, "new_tokens": new_tokens, "samples": list(samples),
                          "repeats": repeats, "modes": list(modes)})
    command = [sys.executable, "-m", "llama_vision_helpers.bench", "--worker", payload]
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True)
    results = [_result_from_json(json.loads(line[len(RESULT_PREFIX):]))
               for line in done.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    return results or [BenchResult(backend=name, model=model, error=f"worker exited with code {done.returncode}")]


def _worker(payload: str) -> int:
    args = json.loads(payload)
    try:
        results = bench_backend(args["model"], args["name"], new_tokens=args["new_tokens"],
                                samples=tuple(args["samples"]), repeats=args["repeats"], modes=tuple(args["modes"]))
    except Exception as err:  # reported in the table; the other backends still run
        results = [BenchResult(backend=args["name"], model=args["model"], error=f"{type(err).__name__}: {err}"[:500])]
    for result in results:
        print(RESULT_PREFIX + json.dumps(asdict(result)), flush=True)
    return 0


def run_bench(model: str, backends: list[str], *, new_tokens: int = 128, samples: tuple[int, ...] = (1, 4, 8, 16),
              repeats: int = 3, modes: tuple[str, ...] = MODES, isolate: bool = True, progress: bool = True,
              on_result: Callable[[list[BenchResult]], Any] | None = None) -> list[BenchResult]:
    """Benchmark each backend on `model` (a folder, hub id or 'tiny-random'); `on_result` sees the results so
    far after each backend."""
    from tqdm.auto import tqdm

    unknown = [b for b in backends if b not in BACKENDS]
    if unknown:
        raise ValueError(f"Unknown backend(s) {', '.join(unknown)}; choose from {', '.join(BACKENDS)}.")
    results = []
    for name in tqdm(backends, desc="backends", disable=not progress):
        kwargs = dict(new_tokens=new_tokens, samples=samples, repeats=repeats, modes=modes)
        measured = run_backend_isolated(model, name, **kwargs) if isolate else bench_backend(model, name, **kwargs)
        results.extend(measured)
        print("\n".join(format_table(measured).splitlines()[2:]), file=sys.stderr, flush=True)
        if on_result is not None:
            on_result(results)
    return results


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_table(results: list[BenchResult]) -> str:
    """A Markdown table: one row per backend and mode, with the k-sample throughput and the ceilings."""
    ks = sorted({k for r in results for k in r.samples_tok_s})
    header = ["backend", "mode", "load s", "weights GiB", "fit GiB (error)", "peak GiB (k=1/max k)", "TTFT s",
              "decode tok/s"] + [f"k={k} tok/s" for k in ks] + ["% of matmul floor", "% of bandwidth limit"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in results:
        if r.error and r.decode_tok_s is None:
            lines.append(f"| {r.backend} | {r.mode} | error: {r.error} |" + " |" * (len(header) - 3))
            continue
        fit = _fmt(r.fit_weights_gib)
        if r.fit_weights_gib is not None and r.weights_gib:
            fit += f" ({100 * (r.fit_weights_gib - r.weights_gib) / r.weights_gib:+.1f}%)"
        peak = "-" if r.peak_gib is None else f"{r.peak_gib:.2f} / {_fmt(r.peak_k_gib)}"
        floor = None if not (r.matmul_floor_tok_s and r.decode_tok_s) else 100 * r.decode_tok_s / r.matmul_floor_tok_s
        limit = (None if not (r.bandwidth_limit_tok_s and r.decode_tok_s)
                 else 100 * r.decode_tok_s / r.bandwidth_limit_tok_s)
        row = [r.backend, r.mode, _fmt(r.load_s, 1), _fmt(r.weights_gib), fit, peak, _fmt(r.ttft_s, 3),
               _fmt(r.decode_tok_s, 1)] + [_fmt(r.samples_tok_s.get(k), 1) for k in ks] + [_fmt(floor, 0), _fmt(limit, 0)]
        lines.append("| " + " | ".join(row) + " |")
    ceilings = [r for r in results if r.matmul_floor_tok_s]
    seen = set()
    for r in ceilings:
        if r.backend in seen:
            continue
        seen.add(r.backend)
        lines.append(f"\n{r.backend}: matmul floor {r.matmul_floor_tok_s:.0f} tok/s; {r.weights_read_gib:.2f} GiB of "
                     f"weights read per token at {r.copy_gbs:.0f} GB/s copy bandwidth -> limit "
                     f"{r.bandwidth_limit_tok_s:.0f} tok/s")
    checks = [r for r in results if r.logits_max_rel_diff is not None]
    for r in checks:
        lines.append(f"{r.backend} fast vs generate, same tokens fed: max |logit difference| = "
                     f"{100 * r.logits_max_rel_diff:.2f}% of max |logit|, top token agrees on "
                     f"{100 * r.argmax_agreement:.0f}% of steps")
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


def _device_for(name: str, device_map: dict[str, Any]) -> Any:
    """The device `device_map` gives the module holding parameter `name` (longest matching prefix)."""
    best = max((prefix for prefix in device_map if prefix == "" or name == prefix or name.startswith(prefix + ".")),
               key=len)
    return device_map[best]


def random_model_spread(config, devices: list[Any] | None = None, seed: int = 0):
    """The model with random bf16 weights created in place across `devices` (default: every GPU), with
    accelerate's device map and hooks, as `device_map="auto"` would place a checkpoint; nothing is written
    to disk (the 90B model is 177 GB)."""
    import torch
    from accelerate import dispatch_model, infer_auto_device_map, init_empty_weights
    from accelerate.utils import set_module_tensor_to_device
    from transformers import MllamaForConditionalGeneration

    if devices is None:
        devices = list(range(torch.cuda.device_count()))
    with init_empty_weights():
        model = MllamaForConditionalGeneration(config)
    if devices == ["cpu"]:
        device_map: dict[str, Any] = {"": "cpu"}
    else:
        max_memory = {d: int(torch.cuda.mem_get_info(d)[1] * 0.9) for d in devices}
        device_map = infer_auto_device_map(model, max_memory=max_memory, dtype=torch.bfloat16,
                                           no_split_module_classes=model._no_split_modules)
    generator = torch.Generator().manual_seed(seed)
    for name, parameter in list(model.named_parameters()):
        device = _device_for(name, device_map)
        value = torch.empty(parameter.shape, dtype=torch.bfloat16, device=device)
        value.normal_(0.0, 0.02, generator=None if value.is_cuda else generator)
        set_module_tensor_to_device(model, name, device, value=value, dtype=torch.bfloat16)
    for name, buffer in list(model.named_buffers()):
        set_module_tensor_to_device(model, name, _device_for(name, device_map), value=buffer)
    model.eval()
    if devices != ["cpu"]:
        model = dispatch_model(model, device_map=device_map)
    return model, device_map


def bench_spread(size: str, *, new_tokens: int = 64, repeats: int = 2, devices: list[Any] | None = None) -> dict:
    """Build the `size` architecture with random weights across all GPUs, generate, and report memory per GPU,
    time to first token and decode speed (Hugging Face generate: the fast loop needs one device)."""
    import tempfile

    import torch
    from transformers import AutoProcessor

    from .generation import generate_answers, prepare_inputs, user_message
    from .model import VisionModel
    from .tiny import random_config, save_processor, set_generation_config

    folder = Path(tempfile.mkdtemp(prefix="llama-vision-spread-"))
    config, ids = random_config(folder, size)
    save_processor(folder, tile_size=config.vision_config.image_size)
    start = time.perf_counter()
    model, device_map = random_model_spread(config, devices)
    set_generation_config(model, ids)
    build_s = time.perf_counter() - start
    cuda = torch.cuda.is_available() and devices != ["cpu"]
    first_device = next(model.parameters()).device
    vlm = VisionModel(model, AutoProcessor.from_pretrained(folder), "transformers", f"random-{size}", first_device)
    inputs = prepare_inputs(vlm, [user_message(DEFAULT_INSTRUCTION, with_image=True)], benchmark_image())

    def run(tokens: int) -> None:
        generate_answers(vlm, inputs, fast=False, stream=False, seed=0, max_new_tokens=tokens, min_new_tokens=tokens)

    run(4)
    ttft = median_time(lambda: run(1), repeats)
    full = median_time(lambda: run(new_tokens), repeats)
    report = {
        "size": size, "build_s": build_s, "ttft_s": ttft, "decode_tok_s": (new_tokens - 1) / max(full - ttft, 1e-9),
        "new_tokens": new_tokens, "devices": sorted({str(d) for d in device_map.values()}),
        "device_map_entries": {str(d): sum(1 for v in device_map.values() if v == d) for d in set(device_map.values())},
    }
    if cuda:
        report["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        report["memory_gib_per_gpu"] = [round(_gib(torch.cuda.memory_allocated(i)), 2)
                                        for i in range(torch.cuda.device_count())]
        report["peak_gib_per_gpu"] = [round(_gib(torch.cuda.max_memory_allocated(i)), 2)
                                      for i in range(torch.cuda.device_count())]
    return report


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--worker":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(_worker(sys.argv[2]))
