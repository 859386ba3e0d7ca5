"""Where a fast decode step's time goes: kernels per step by kind, against the CUDA-graph step time.

Run on a GPU machine:  python3 tools/profile_decode.py [bf16|bnb4 ...] [--rows K]   (random-weight 11B checkpoint)
K rows: the step of k samples of one prompt (default 1).
"""

import argparse
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from llama_vision_helpers.bench import benchmark_image, median_time, random_weights_checkpoint
from llama_vision_helpers.defaults import DEFAULT_INSTRUCTION
from llama_vision_helpers.fast_decode import FastDecoder
from llama_vision_helpers.generation import prepare_inputs, user_message
from llama_vision_helpers.model import load_model

STEPS = 10


def kind(name: str) -> str:
    lowered = name.lower()
    if any(k in lowered for k in ("gemv", "gemm", "cutlass", "sm90_xmma", "nvjet", "matmul", "dequantize", "nf4")):
        return "matrix products (incl. 4-bit dequantize)"
    if any(k in lowered for k in ("attention", "fmha", "flash", "softmax")):
        return "attention"
    return "elementwise, norms, copies, reductions"


def profile_backend(path: str, variant: str, rows: int = 1) -> None:
    vlm = load_model(path, backend="transformers", load_in_4bit=variant == "bnb4",
                     dtype=torch.bfloat16 if variant == "bf16" else None)
    profile_decoder(vlm, variant, rows)
    del vlm
    torch.cuda.empty_cache()


@torch.inference_mode()  # as the fast loop's `generate` runs it (with grad on, the compiled step would copy each cache)
def profile_decoder(vlm, variant: str, rows: int) -> None:
    inputs = prepare_inputs(vlm, [user_message(DEFAULT_INSTRUCTION, with_image=True)], benchmark_image())
    prompt = inputs["input_ids"].shape[1]
    token = torch.full((rows,), 5, device=vlm.device)
    for use_graph in (True, False):
        decoder = FastDecoder(vlm.model, use_cuda_graph=use_graph)
        state, _ = decoder._prefill(inputs, rows, 128)
        for step in range(3):
            decoder._decode(state, token, prompt + step)
        seconds = median_time(lambda: decoder._decode(state, token, prompt + 3), 20)
        print(f"{variant}: one decode step {'replayed from a CUDA graph' if use_graph else 'launched eagerly'}: "
              f"{1000 * seconds:.2f} ms")
        if use_graph:  # the whole loop: the steps plus sampling, stop checks and the host's reads
            wall = median_time(lambda: decoder.generate(inputs, max_new_tokens=128, min_new_tokens=128,
                                                        num_return_sequences=rows), 3)
            print(f"{variant}: 128 tokens x {rows} rows through the fast loop: {wall:.3f} s, "
                  f"{1000 * wall / 128:.2f} ms a token (prefill included)")
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for step in range(STEPS):
            decoder._decode(state, token, prompt + 3 + step)
        torch.cuda.synchronize()
    totals, counts = defaultdict(float), defaultdict(int)
    for event in prof.key_averages():
        if event.device_type.name != "CUDA" or event.self_device_time_total <= 0:
            continue
        totals[kind(event.key)] += event.self_device_time_total / STEPS
        counts[kind(event.key)] += event.count // STEPS
    variant = f"{variant}, {rows} rows" if rows > 1 else variant
    print(f"{variant}: {sum(counts.values())} kernels per step, {sum(totals.values()) / 1000:.2f} ms of GPU time")
    for name in sorted(totals, key=totals.get, reverse=True):
        print(f"  {name:45} {counts[name]:5} kernels  {totals[name] / 1000:6.2f} ms")
    top = sorted(prof.key_averages(), key=lambda e: e.self_device_time_total, reverse=True)[:8]
    for event in top:
        print(f"    {event.key[:70]:70} {event.count // STEPS:4}x {event.self_device_time_total / STEPS / 1000:6.3f} ms")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("variants", nargs="*", default=["bf16", "bnb4"], choices=["bf16", "bnb4"])
    parser.add_argument("--rows", type=int, default=1)
    args = parser.parse_args()
    checkpoint = str(random_weights_checkpoint("11b"))
    for variant in args.variants:
        profile_backend(checkpoint, variant, args.rows)
