"""Where a crowd's time goes on the GPU: an image prompt's prefill (vision encoder, projector, language model; the
vision encoder's split attention against transformers' masked sdpa) and the batched decode step (elementwise work
eager or compiled) and the attention backends for the vision encoder's shape.

Run on a GPU machine:  python3 tools/profile_prefill.py [--out DIR]   (random-weight 11B checkpoint, bf16)
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from llama_vision_helpers.batch_decode import BatchDecoder, SlotRequest
from llama_vision_helpers.bench import median_time, random_weights_checkpoint
from llama_vision_helpers.generation import prepare_inputs, user_message
from llama_vision_helpers.loadtest import QUESTION, synthetic_image
from llama_vision_helpers.model import load_model
from llama_vision_helpers.vision_attention import NAME


def milliseconds(fn, repeats: int = 5) -> float:
    """Median milliseconds of `fn`, the GPU's queued work included (after one warm-up call)."""
    fn()
    return 1000 * median_time(fn, repeats)


def batch_inputs(vlm, rows: int) -> dict:
    parts = [prepare_inputs(vlm, [user_message(QUESTION, True)], synthetic_image(i)) for i in range(rows)]
    return {name: torch.cat([p[name] for p in parts]) for name in parts[0].keys()}


def split_prefill(model, inputs: dict) -> dict:
    """Milliseconds of one prefill and of its vision encoder and projector (CUDA events around the modules)."""
    marks: dict[str, list] = defaultdict(list)
    handles = []
    for name, module in (("vision", model.model.vision_model), ("projector", model.model.multi_modal_projector)):
        def before(_module, _args, name=name):
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            marks[name].append([event])

        def after(_module, _args, _output, name=name):
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            marks[name][-1].append(event)

        handles += [module.register_forward_pre_hook(before), module.register_forward_hook(after)]
    try:
        total = milliseconds(lambda: model(**inputs, use_cache=True, logits_to_keep=1))
    finally:
        for handle in handles:
            handle.remove()
    parts = {name: statistics.median(a.elapsed_time(b) for a, b in pairs[1:]) for name, pairs in marks.items()}
    return {"total_ms": round(total, 2), **{f"{k}_ms": round(v, 2) for k, v in parts.items()},
            "language_model_ms": round(total - sum(parts.values()), 2)}


def served_prefill(vlm, rows: int) -> dict:
    """A prefill as the batched engine runs it (`FastDecoder.prefill_forward`: no host read mid-pass), with the
    inputs already on the GPU and prepared on the CPU (pinned copies): milliseconds until the call returns (the
    CPU's launching) and until the GPU is done, and the GPU's busy time (sum of its kernels)."""
    from llama_vision_helpers.fast_decode import FastDecoder

    fast = FastDecoder(vlm.model)
    parts = [prepare_inputs(vlm, [user_message(QUESTION, True)], synthetic_image(i), device="cpu") for i in range(rows)]
    on_cpu = {name: torch.cat([p[name] for p in parts]) for name in parts[0].keys()}
    on_gpu = {name: value.to(fast.device) for name, value in on_cpu.items()}
    result = {}
    for where, inputs in (("gpu_inputs", on_gpu), ("cpu_inputs", on_cpu)):
        launch, done = [], []
        for _ in range(4):
            torch.cuda.synchronize()
            start = time.perf_counter()
            fast.prefill_forward(inputs)
            launch.append(time.perf_counter() - start)
            torch.cuda.synchronize()
            done.append(time.perf_counter() - start)
        result[where] = {"launched_ms": round(1000 * statistics.median(launch[1:]), 1),
                         "done_ms": round(1000 * statistics.median(done[1:]), 1)}
    result["kernels"] = top_kernels(lambda: fast.prefill_forward(on_gpu), 16)
    print(f"served prefill, {rows} images:", json.dumps(result, indent=1), flush=True)
    return result


def top_kernels(fn, count: int = 12) -> list[str]:
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type.name == "CUDA" and e.self_device_time_total > 0]
    total = sum(e.self_device_time_total for e in events)
    lines = [f"total {total / 1000:.1f} ms in {sum(e.count for e in events)} kernels"]
    for event in sorted(events, key=lambda e: e.self_device_time_total, reverse=True)[:count]:
        lines.append(f"{event.self_device_time_total / 1000:8.2f} ms {event.count:5}x  {event.key[:100]}")
    return lines


def attention_backends(images: int = 8, head_dims: tuple[int, ...] = (80,)) -> dict:
    """Milliseconds of the vision encoder's unmasked attention (16 heads over 4 tiles) per backend; the heads are
    80 wide, other widths show what zero-padding them would cost."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    result = {}
    for head_dim in head_dims:
        q, k, v = (torch.randn(images, 16, 6432, head_dim, dtype=torch.bfloat16, device="cuda") for _ in range(3))
        for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
            name = backend.name if head_dim == 80 else f"{backend.name}_head_dim_{head_dim}"
            try:
                with sdpa_kernel([backend]):
                    attention = torch.nn.functional.scaled_dot_product_attention
                    result[name] = round(milliseconds(lambda: attention(q, k, v, scale=80 ** -0.5)), 2)
            except RuntimeError as err:
                result[name] = repr(err)[:100]
    print("attention backends,", images, "images:", result, flush=True)
    return result


def decode_steps(model, inputs: dict, compile_elementwise: bool, rows_list=(1, 8, 32)) -> dict:
    """Step milliseconds of the batched decoder with `rows` image requests running, its warm-up seconds, and the
    top kernels of a step with the most rows."""
    start = time.perf_counter()
    decoder = BatchDecoder(model, max_batch=max(rows_list), compile_elementwise=compile_elementwise)
    decoder.warm_up()
    torch.cuda.synchronize()
    result = {"warm_up_s": round(time.perf_counter() - start, 1)}
    one = {name: value[:1] for name, value in inputs.items()}
    for rows in rows_list:
        while decoder.free_slots < decoder.max_batch:
            decoder.discard(decoder.running)
        decoder.admit([SlotRequest(one, max_new_tokens=10_000, min_new_tokens=10_000) for _ in range(rows)])
        for _ in range(3):
            decoder.step()
        torch.cuda.synchronize()
        begin = time.perf_counter()
        for _ in range(20):
            decoder.step()
        torch.cuda.synchronize()
        result[f"step_{rows}_rows_ms"] = round((time.perf_counter() - begin) / 20 * 1000, 2)
    result["kernels_of_a_step"] = top_kernels(decoder.step, 8)
    print(f"compiled {compile_elementwise}", json.dumps(result, indent=1), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results")
    parser.add_argument("--no-decode", action="store_true", help="skip the batched decode steps (and compilation)")
    parser.add_argument("--attention-only", action="store_true",
                        help="only the attention backends, for head widths 64, 80, 96 and 128 (no model)")
    args = parser.parse_args()
    if args.attention_only:
        print(json.dumps(attention_backends(head_dims=(64, 80, 96, 128)), indent=1))
        return
    report: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    vlm = load_model(str(random_weights_checkpoint("11b")), backend="transformers", dtype=torch.bfloat16)
    model = vlm.model
    report["attn_implementation"] = model.config.vision_config._attn_implementation
    one, eight = batch_inputs(vlm, 1), batch_inputs(vlm, 8)
    config = model.model.vision_model.config
    with torch.inference_mode():
        logits = {}
        for name in (NAME, "sdpa"):  # the vision encoder's split attention (load_model's), transformers' own
            config._attn_implementation = name
            logits[name] = model(**one, use_cache=True, logits_to_keep=1).logits.float()
            report[f"prefill_{name}"] = {"1_image": split_prefill(model, one), "8_images": split_prefill(model, eight)}
            report[f"prefill_kernels_1_image_{name}"] = top_kernels(
                lambda: model(**one, use_cache=True, logits_to_keep=1))
            print(name, json.dumps(report[f"prefill_{name}"]), *report[f"prefill_kernels_1_image_{name}"], sep="\n",
                  flush=True)
        config._attn_implementation = NAME
        reference = logits["sdpa"]
        report["prefill_logits_max_diff_of_max"] = round(float((logits[NAME] - reference).abs().max()
                                                               / reference.abs().max()), 4)
        report["served_prefill_1_image"] = served_prefill(vlm, 1)
        report["served_prefill_8_images"] = served_prefill(vlm, 8)
        report["vision_attention_backends_ms"] = attention_backends()
        for compiled in (() if args.no_decode else (False, True)):
            key = f"decode_compiled_{compiled}"
            try:
                report[key] = decode_steps(model, one, compiled)
            except Exception as err:
                report[key] = {"error": repr(err)[:300]}
                print(key, repr(err), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "profile_prefill.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
