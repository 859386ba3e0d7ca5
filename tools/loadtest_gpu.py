"""The README's room numbers: random-weight 11B served on one GPU, `loadtest` against the batched engine and
against the one-at-a-time queue, in bf16 and bitsandbytes 4-bit; plus the greedy agreement of batched decoding
with batch-1 decoding on the same inputs. Each precision loads the model once; each engine is served in this
process on a free port.

    python3 tools/loadtest_gpu.py --precisions bf16 --out results/   (a CUDA GPU; writes results/loadtest_bf16.json)
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from llama_vision_helpers.batch_decode import BatchDecoder, SlotRequest, slot_bytes, slots_that_fit
from llama_vision_helpers.batch_scheduler import BatchScheduler
from llama_vision_helpers.bench import random_weights_checkpoint
from llama_vision_helpers.engine import Engine, SerialScheduler
from llama_vision_helpers.generation import prepare_inputs, user_message
from llama_vision_helpers.loadtest import QUESTION, format_table, synthetic_image
from llama_vision_helpers.model import load_model
from llama_vision_helpers.server import create_app

GIB = 1024**3
CUDA = torch.cuda.is_available()


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def log(*parts) -> None:
    print(f"[{time.strftime('%H:%M:%S')}]", *parts, file=sys.stderr, flush=True)


def agreement(vlm, requests: int, tokens: int, image_size: int) -> dict:
    """Greedy tokens of `requests` image prompts decoded together against each decoded alone (same code, batch 1),
    and the batch-1 decode rate."""
    inputs = [prepare_inputs(vlm, [user_message(QUESTION, True)], synthetic_image(i, image_size))
              for i in range(requests)]

    def request(i):
        return SlotRequest(inputs[i], max_new_tokens=tokens, min_new_tokens=tokens)

    together = BatchDecoder(vlm.model, max_batch=requests).run([request(i) for i in range(requests)])
    # prefilled one by one, decoded together: the batched decode step alone against batch 1
    decoder = BatchDecoder(vlm.model, max_batch=requests)
    decoded_together = [request(i) for i in range(requests)]
    for one in decoded_together:
        decoder.admit([one])
    while decoder.running:
        decoder.step()
    alone, rates = [], []
    single = BatchDecoder(vlm.model, max_batch=1)
    for i in range(requests):
        one = request(i)
        single.admit([one])
        single.step()
        sync()
        start = time.perf_counter()
        while single.running:
            single.step()
        sync()
        rates.append((tokens - 1) / (time.perf_counter() - start))
        alone.append(one)
    def compare(batched: list[SlotRequest]) -> dict:
        prefix = [next((k for k, (x, y) in enumerate(zip(a.tokens, b.tokens)) if x != y), tokens)
                  for a, b in zip(batched, alone)]
        return {"identical_answers": sum(a.tokens == b.tokens for a, b in zip(batched, alone)),
                "same_first_token": sum(a.tokens[0] == b.tokens[0] for a, b in zip(batched, alone)),
                "mean_tokens_before_first_difference": round(sum(prefix) / requests, 1)}

    del decoder, single
    return {"requests": requests, "tokens": tokens,
            "prefilled_and_decoded_together": compare(together),
            "prefilled_alone_decoded_together": compare(decoded_together),
            "batch1_decode_tokens_per_s_median": round(sorted(rates)[len(rates) // 2], 1)}


def time_parts(vlm, image_size: int, rows: int = 32) -> dict:
    """Where a crowd's first tokens wait: one request's image decoding and preprocessing on the CPU, a prefill of
    1 and of 8 image prompts, and a decode step with `rows` requests running."""
    from llama_vision_helpers.wire import MAX_IMAGE_PIXELS, decode_image_url, image_data_url

    urls = [image_data_url(synthetic_image(i, image_size)) for i in range(8)]
    start = time.perf_counter()
    inputs = [prepare_inputs(vlm, [user_message(QUESTION, True)],
                             decode_image_url(url, allow_http=False, max_pixels=MAX_IMAGE_PIXELS), device="cpu")
              for url in urls]  # as the server prepares them: the prefills below include the copies to the GPU
    sync()
    parts = {"image_processor": type(vlm.processor.image_processor).__name__,
             "receive_and_preprocess_one_image_s": round((time.perf_counter() - start) / len(urls), 4)}
    decoder = BatchDecoder(vlm.model, max_batch=rows)
    decoder.warm_up()
    requests = [SlotRequest(inputs[i % len(inputs)], max_new_tokens=1000, min_new_tokens=1000) for i in range(rows)]
    warm = [SlotRequest(one, max_new_tokens=1) for one in inputs]  # the first pinned copies allocate; not timed
    decoder.admit(warm)
    decoder.discard(warm)
    for name, group in (("prefill_1_s", requests[:1]), ("prefill_8_s", requests[1:9])):
        start = time.perf_counter()
        decoder.admit(group)
        sync()
        parts[name] = round(time.perf_counter() - start, 4)
    decoder.admit(requests[9:])
    for _ in range(5):
        decoder.step()
    sync()
    start = time.perf_counter()
    for _ in range(20):
        decoder.step()
    sync()
    parts[f"decode_step_{rows}_rows_ms"] = round((time.perf_counter() - start) / 20 * 1000, 2)
    return parts


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def serve_and_load(vlm, scheduler, clients: list[int], max_tokens: int, image_size: int, **app_options) -> dict:
    """Serve `vlm` through an engine with `scheduler` (and `create_app`'s options) and run the load test on it."""
    import uvicorn

    if CUDA:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    engine = Engine(vlm, scheduler)
    port = free_port()
    config = uvicorn.Config(create_app(engine, **app_options), host="127.0.0.1", port=port, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    saved = Path(tempfile.mkdtemp()) / "loadtest.json"
    try:  # the clients run in their own process, as a room's would (not sharing this one's interpreter lock)
        subprocess.run([sys.executable, "-m", "llama_vision_helpers.cli", "loadtest", f"http://127.0.0.1:{port}/v1",
                        "--clients", *map(str, clients), "--max-tokens", str(max_tokens), "--force-length",
                        "--image-size", str(image_size), "--json", str(saved)], check=True, timeout=1800)
        result = json.loads(saved.read_text())
    finally:
        server.should_exit = True
        thread.join(30)
        engine.close()
    result["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / GIB, 2) if CUDA else None
    result["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / GIB, 2) if CUDA else None
    decoder = getattr(scheduler, "decoder", None)
    result["slots"] = decoder.max_batch if decoder is not None else 1
    if decoder is not None:  # its buffers and graphs go before the next engine measures its memory
        scheduler.decoder = None
        del decoder
        if CUDA:
            torch.cuda.empty_cache()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results")
    parser.add_argument("--model", default=None, help="default: the random-weight 11B checkpoint")
    parser.add_argument("--image-size", type=int, default=1120)
    parser.add_argument("--precisions", nargs="+", default=["bf16", "bnb4"])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--queue-clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--compare-prepare-workers", type=int, nargs="*", default=[],
                        help="also serve the batched engine with these numbers of preparing workers "
                             "(largest client count only)")
    parser.add_argument("--agreement-requests", type=int, default=16)
    parser.add_argument("--agreement-tokens", type=int, default=48)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"device": torch.cuda.get_device_name() if CUDA else "cpu", "date": datetime.now(timezone.utc).isoformat(timespec="minutes"),
              "torch": torch.__version__, "command": " ".join(sys.argv), "runs": {}}
    checkpoint = args.model or str(random_weights_checkpoint("11b"))
    for precision in args.precisions:
        log(f"loading random-weight 11B ({precision})")
        vlm = load_model(checkpoint, backend="transformers", load_in_4bit=precision == "bnb4",
                         dtype=torch.bfloat16 if precision == "bf16" else None)
        # The random checkpoint has the real vocabulary but the tiny tokenizer: most token ids have no text, so a
        # client would see no tokens arrive. Zero logits for ids beyond the tokenizer keep the random model on
        # tokens with text (the random logits of the others are above zero), as a real model's are.
        with torch.no_grad():
            vlm.model.lm_head.weight[len(vlm.processor.tokenizer):] = 0
        run = report["runs"][precision] = {"weights_gib": round(torch.cuda.memory_allocated() / GIB, 2) if CUDA else None,
                                           "slot_gib": round(slot_bytes(vlm.model) / GIB, 3),
                                           "slots_that_fit": slots_that_fit(vlm.model)}
        log(precision, run)
        try:
            run["agreement"] = agreement(vlm, args.agreement_requests, args.agreement_tokens, args.image_size)
            log("agreement", run["agreement"])
        except Exception as err:  # keep the load tests even if this part fails
            run["agreement"] = {"error": repr(err)}
            log("agreement failed:", repr(err))
        try:
            run["parts"] = time_parts(vlm, args.image_size, args.max_batch)
            log("parts", run["parts"])
        except Exception as err:
            run["parts"] = {"error": repr(err)}
            log("parts failed:", repr(err))
        for name, scheduler, clients in [("batched", BatchScheduler(args.max_batch), args.clients),
                                         ("queue", SerialScheduler(), args.queue_clients)]:
            log(f"{name}: {getattr(scheduler, 'max_batch', 1)} at a time")
            try:
                run[name] = serve_and_load(vlm, scheduler, clients, args.max_tokens, args.image_size)
            except Exception as err:  # keep what the other runs measure
                run[name] = {"error": repr(err), "levels": []}
                log(f"{name} failed:", repr(err))
            (out / f"loadtest_{'_'.join(args.precisions)}.json").write_text(json.dumps(report, indent=2))
        for workers in args.compare_prepare_workers:
            name = f"batched_prepare_workers_{workers}"
            log(name)
            try:
                run[name] = serve_and_load(vlm, BatchScheduler(args.max_batch), [max(args.clients)], args.max_tokens,
                                           args.image_size, prepare_workers=workers)
                log(name, format_table(run[name]["levels"]))
            except Exception as err:
                run[name] = {"error": repr(err), "levels": []}
                log(f"{name} failed:", repr(err))
            (out / f"loadtest_{'_'.join(args.precisions)}.json").write_text(json.dumps(report, indent=2))
        for name in (n for n in ("batched", "queue") if "error" not in run[n]):
            print(f"\n{precision}, {name} (peak {run[name]['peak_allocated_gib']} GiB allocated, "
                  f"{run[name]['peak_reserved_gib']} GiB reserved):\n{format_table(run[name]['levels'])}", flush=True)
        del vlm
        if CUDA:
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
