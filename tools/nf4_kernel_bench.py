"""4-bit matrix products of one decode step on the 11B shapes: correctness against bitsandbytes, then time.

Run on a GPU machine with bitsandbytes:  python3 tools/nf4_kernel_bench.py [--layers 40] [--out DIR]

Builds every language-model linear of the 11B model (32 self-attention and 8 cross-attention layers, random
weights) as bitsandbytes `Linear4bit` nf4 modules with double quantization, as `load_model(load_in_4bit=True)`
does, then
1. checks `nf4_matmul` against `dequantize_4bit` + matmul (float64) on every shape, joined and alone, for
   batch 1..32: relative error, NaNs, that the output is fully written, and for one token that it is identical
   to bitsandbytes' own forward;
2. times all the decode linears of one step (one token, or a batch), replayed from one CUDA graph, for:
   bitsandbytes' own forward, the nf4 kernel (joined qkv and gate/up, and one linear at a time), bf16 cuBLAS on
   the same weights dequantized, and PyTorch's int4 tinygemm (`_weight_int4pack_mm`, its own layout, for scale).
Prints a Markdown table last; with --out also writes it and a JSON file there.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from llama_vision_helpers.nf4_gemv import NF4Weight, nf4_matmul, random_nf4_linear

HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, HEAD_DIM = 4096, 14336, 32, 8, 128
CROSS_EVERY = 5  # 11B: cross-attention at layers 3, 8, 13, ... (8 of 40)


def linear4bit(n: int, k: int):
    return random_nf4_linear(n, k, "cuda")


def build_layers(count: int) -> list[dict[str, list]]:
    """Groups of linears per layer, as the fast loop joins them."""
    layers = []
    for i in range(count):
        cross = i % CROSS_EVERY == 3
        q = linear4bit(HEADS * HEAD_DIM, HIDDEN)
        groups = {"q": [q]} if cross else {"qkv": [q, linear4bit(KV_HEADS * HEAD_DIM, HIDDEN),
                                                   linear4bit(KV_HEADS * HEAD_DIM, HIDDEN)]}
        groups["o"] = [linear4bit(HIDDEN, HEADS * HEAD_DIM)]
        groups["gate_up"] = [linear4bit(INTERMEDIATE, HIDDEN), linear4bit(INTERMEDIATE, HIDDEN)]
        groups["down"] = [linear4bit(HIDDEN, INTERMEDIATE)]
        layers.append(groups)
        print(f"\rbuilt layer {i + 1}/{count}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    return layers


def reference(x: torch.Tensor, modules: list) -> torch.Tensor:
    import bitsandbytes.functional as bf

    w = torch.cat([bf.dequantize_4bit(m.weight.data, m.weight.quant_state) for m in modules])
    return x.double() @ w.double().T


def check(layers, batches) -> list[dict]:
    rows = []
    seen = set()
    for groups in layers[:5]:  # every distinct shape appears in the first five layers
        for name, modules in groups.items():
            shape = (name, sum(m.out_features for m in modules), modules[0].in_features)
            if shape in seen:
                continue
            seen.add(shape)
            joined = NF4Weight.from_linears(modules)
            for m in batches:
                x = torch.randn(m, joined.k, dtype=torch.bfloat16, device="cuda")
                ref = reference(x, modules)
                bnb_out = torch.cat([mod(x) for mod in modules], dim=-1)
                bnb_err = float((bnb_out.double() - ref).norm() / ref.norm())
                out = torch.full((m, joined.n), float("nan"), dtype=torch.bfloat16, device="cuda")  # poison
                got = nf4_matmul(x, joined, out=out)
                identical = bool(torch.equal(got, bnb_out))
                got = got.double()
                err = float((got - ref).norm() / ref.norm())
                ok = bool(torch.isfinite(got).all()) and err < 1e-2 and (identical or m > 1)
                rows.append({"group": name, "n": joined.n, "k": joined.k, "batch": m, "rel_err": err,
                             "bnb_rel_err": bnb_err, "identical_to_bnb": identical, "ok": ok})
                print(f"check {name:8} {joined.n:6}x{joined.k:5} batch {m:2}: rel err {err:.2e} "
                      f"(bnb's own forward {bnb_err:.2e}), {'identical to' if identical else 'differs from'} "
                      f"bnb's forward {'ok' if ok else 'FAIL'}", flush=True)
    return rows


def graph_time(fn, repeats: int = 30) -> float:
    """Median seconds of one replay of `fn` captured in a CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return statistics.median(times)


def int4pack(w: torch.Tensor, group: int = 128):
    """PyTorch's tinygemm layout (asymmetric int4, groups of 128) of a bf16 weight, for timing only."""
    n, k = w.shape
    g = w.float().view(n, k // group, group)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    scale = ((hi - lo) / 15).clamp(min=1e-8)
    q = ((g - lo) / scale).round().clamp(0, 15).to(torch.int32).view(n, k)
    zero = lo + 8 * scale
    scales_zeros = torch.stack([scale.view(n, -1), zero.view(n, -1)], dim=-1).transpose(0, 1).contiguous()
    packed_u8 = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)
    packed = torch.ops.aten._convert_weight_to_int4pack(packed_u8, 8)
    return packed, scales_zeros.to(torch.bfloat16), group


def step_bytes(layers) -> int:
    total = 0
    for groups in layers:
        for modules in groups.values():
            for m in modules:
                qs = m.weight.quant_state
                total += m.weight.data.numel() + qs.absmax.numel() * qs.absmax.element_size()
    return total


def time_variants(layers, batches, skip_bf16: bool) -> list[dict]:
    rows = []
    weight_bytes = step_bytes(layers)
    joined = [{name: NF4Weight.from_linears(mods) for name, mods in groups.items()} for groups in layers]
    single = [[NF4Weight.from_linears([m], share_storage=False) for mods in groups.values() for m in mods]
              for groups in layers]
    modules = [m for groups in layers for mods in groups.values() for m in mods]
    variants = {
        "bitsandbytes Linear4bit forward": lambda xs: [m(xs[m.in_features]) for m in modules],
        "nf4 kernel, joined qkv and gate/up": lambda xs: [nf4_matmul(xs[w.k], w) for ws in joined for w in ws.values()],
        "nf4 kernel, one linear at a time": lambda xs: [nf4_matmul(xs[w.k], w) for ws in single for w in ws],
    }
    extra = {}
    if not skip_bf16:
        import bitsandbytes.functional as bf

        dense = [bf.dequantize_4bit(m.weight.data, m.weight.quant_state) for m in modules]
        extra["bf16 cuBLAS (same weights dequantized)"] = (
            lambda xs: [torch.nn.functional.linear(xs[w.shape[1]], w) for w in dense], 2 * sum(w.numel() for w in dense))
        try:
            packs = [(int4pack(w), w.shape[1]) for w in dense]
            extra["int4 tinygemm (PyTorch, own layout)"] = (
                lambda xs: [torch.ops.aten._weight_int4pack_mm(xs[k], p, group, sz) for (p, sz, group), k in packs],
                None)
        except Exception as err:  # layout or version mismatch: leave it out, say why
            print(f"int4 tinygemm left out: {type(err).__name__}: {err}"[:300], flush=True)
    for m in batches:
        xs = {k: torch.randn(m, k, dtype=torch.bfloat16, device="cuda") for k in (HIDDEN, INTERMEDIATE)}
        for name, fn in variants.items():
            seconds = graph_time(lambda: fn(xs))
            rows.append({"variant": name, "batch": m, "ms": 1000 * seconds, "gbs": weight_bytes / seconds / 1e9})
            print(f"time {name:40} batch {m:2}: {1000 * seconds:7.3f} ms  {weight_bytes / seconds / 1e9:6.0f} GB/s",
                  flush=True)
        for name, (fn, nbytes) in extra.items():
            try:
                seconds = graph_time(lambda: fn(xs))
            except Exception as err:
                print(f"time {name}: {type(err).__name__}: {err}"[:300], flush=True)
                continue
            gbs = (nbytes or weight_bytes) / seconds / 1e9
            rows.append({"variant": name, "batch": m, "ms": 1000 * seconds, "gbs": gbs})
            print(f"time {name:40} batch {m:2}: {1000 * seconds:7.3f} ms  {gbs:6.0f} GB/s", flush=True)
    return rows


def report_compiled(out: str | None) -> None:
    """Registers and spills of the compiled kernels; the PTX of the one-token kernel goes to `out`."""
    from llama_vision_helpers import nf4_gemv

    for kernel in (nf4_gemv._nf4_matvec_kernel, nf4_gemv._nf4_matmul_kernel):
        for device_cache in kernel.fn.device_caches.values():
            for compiled in device_cache[0].values():
                print(f"compiled {kernel.fn.__name__}: {compiled.n_regs} registers, {compiled.n_spills} spills, "
                      f"{compiled.metadata.num_warps} warps, {compiled.metadata.shared} B shared", flush=True)
                if out:
                    Path(out).mkdir(parents=True, exist_ok=True)
                    Path(out, f"{kernel.fn.__name__}.ptx").write_text(compiled.asm["ptx"])
                    if "sass" in compiled.asm:
                        Path(out, f"{kernel.fn.__name__}.sass").write_text(compiled.asm["sass"])


def copy_gbs() -> float:
    a = torch.empty(2 * 1024**3, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    return 2 * a.numel() / graph_time(lambda: b.copy_(a), 10) / 1e9


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=40)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    parser.add_argument("--time-batches", type=int, nargs="+", default=[1, 8, 16, 32])
    parser.add_argument("--skip-bf16", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    start = time.time()
    layers = build_layers(args.layers)
    checks = check(layers, args.batches)
    bandwidth = copy_gbs()
    timings = time_variants(layers, args.time_batches, args.skip_bf16)
    weight_bytes = step_bytes(layers)
    from llama_vision_helpers import nf4_gemv

    for kernel in (nf4_gemv._nf4_matvec_kernel, nf4_gemv._nf4_matmul_kernel):
        for key, config in kernel.cache.items():
            print(f"autotuned {kernel.fn.__name__} {key[:4]}: {config}", flush=True)
    try:
        report_compiled(args.out)
    except Exception as err:  # the report is a diagnostic: never lose the timings over it
        print(f"compiled-kernel report failed: {type(err).__name__}: {err}", flush=True)
    lines = [f"{torch.cuda.get_device_name()}, torch {torch.__version__}; {args.layers} layers; 4-bit weights read "
             f"per step {weight_bytes / 1e9:.2f} GB; copy {bandwidth:.0f} GB/s -> bytes floor "
             f"{1000 * weight_bytes / bandwidth / 1e9:.2f} ms", "",
             "| variant | batch | ms per step | GB/s of 4-bit weights |", "|---|---|---|---|"]
    lines += [f"| {r['variant']} | {r['batch']} | {r['ms']:.3f} | {r['gbs']:.0f} |" for r in timings]
    bad = [c for c in checks if not c["ok"]]
    ones = [c for c in checks if c["batch"] == 1]
    identical = sum(c["identical_to_bnb"] for c in ones)
    worst, worst_bnb = max(c["rel_err"] for c in checks), max(c["bnb_rel_err"] for c in checks)
    lines.append(f"\ncorrectness: {len(checks) - len(bad)}/{len(checks)} shape x batch checks within 1e-2 of "
                 f"dequantize_4bit + matmul, one token identical to bitsandbytes' forward in {identical}/{len(ones)}; "
                 f"worst rel err {worst:.2e} (bitsandbytes' own forward: {worst_bnb:.2e}); {time.time() - start:.0f} s")
    table = "\n".join(lines)
    print(table)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "nf4_kernel_bench.md").write_text(table + "\n")
        (out / "nf4_kernel_bench.json").write_text(json.dumps({"checks": checks, "timings": timings,
                                                                "copy_gbs": bandwidth}, indent=1))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
