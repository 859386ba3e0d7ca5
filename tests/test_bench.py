"""`fit` and the benchmark's own code (table, JSON, workers) on CPU with tiny-random."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llama_vision_helpers.architecture import estimate_memory, fit_table, mllama_config, parameter_counts, vision_tokens
from llama_vision_helpers.bench import (
    BenchResult, _device_for, format_table, random_model_spread, run_bench, save_json,
)

ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30


def test_parameter_counts_match_the_published_sizes():
    assert sum(parameter_counts(mllama_config("11b")).values()) / 1e9 == pytest.approx(10.67, abs=0.01)
    assert sum(parameter_counts(mllama_config("90b")).values()) / 1e9 == pytest.approx(88.6, abs=0.05)


def test_fit_is_close_to_the_published_90b_figures():
    # The 90B model card (seeds/002): FP16 180.7 GB; Q4_K_M (about 4.5 bits a weight) 50.8 GB.
    config = mllama_config("90b")
    assert estimate_memory(config, 16).weights / 1e9 == pytest.approx(180.7, rel=0.03)
    assert sum(parameter_counts(config).values()) * 4.5 / 8 / 1e9 == pytest.approx(50.8, rel=0.03)


MEASURED = ROOT / "docs" / "bench"


def test_fit_matches_the_weights_measured_on_gpus():
    """`fit` against `llama-vision bench` runs on an H200 (docs/bench/*.json, random-weight 11B and 90B)."""
    runs = json.loads((MEASURED / "h200-11b.json").read_text())["results"]
    measured = {r["backend"]: r["weights_gib"] for r in runs}
    eleven = mllama_config("11b")
    assert estimate_memory(eleven, 16).weights / GIB == pytest.approx(measured["transformers-bf16"], rel=0.005)
    assert estimate_memory(eleven, 4).weights / GIB == pytest.approx(measured["transformers-bnb4"], rel=0.01)
    spread = json.loads((MEASURED / "h200x2-90b-spread.json").read_text())
    assert estimate_memory(mllama_config("90b"), 16).weights / GIB == pytest.approx(
        sum(spread["memory_gib_per_gpu"]), rel=0.01)


def test_estimate_parts_grow_as_they_should():
    config = mllama_config("11b")
    four = estimate_memory(config, 4, context_tokens=1000)
    sixteen = estimate_memory(config, 16, context_tokens=2000)
    assert sixteen.kv_cache == 2 * four.kv_cache  # linear in the context
    assert four.cross_attention_cache == sixteen.cross_attention_cache > 0  # one image, whatever the context
    assert vision_tokens(config) == 4 * 1608  # 4 tiles of 40x40 patches + 1 class token, padded to 1608


def test_fit_command_prints_a_table():
    out = subprocess.run([sys.executable, "-m", "llama_vision_helpers.cli", "fit", "90b", "--bits", "16", "4"],
                         capture_output=True, text=True, check=True).stdout
    assert "88.59 B parameters" in out and "| 16 |" in out and "| 4 |" in out
    bad = subprocess.run([sys.executable, "-m", "llama_vision_helpers.cli", "fit", "/no/such/model"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr


def test_fit_table_reads_a_checkpoint_folder(vlm):
    assert "Memory estimate for tiny-random" in fit_table("tiny-random", (16, 4))


def test_bench_on_tiny_random_writes_table_and_json(vlm, tmp_path):
    results = run_bench("tiny-random", ["transformers-bf16"], new_tokens=6, samples=(1, 2), repeats=1, isolate=False,
                        progress=False)
    assert [r.mode for r in results] == ["generate", "fast"]
    for r in results:
        assert r.error is None and r.decode_tok_s > 0 and r.ttft_s > 0 and set(r.samples_tok_s) == {1, 2}
        assert r.fit_weights_gib == pytest.approx(r.weights_gib, rel=0.05)
    assert results[1].logits_max_rel_diff is not None and 0 <= results[1].argmax_agreement <= 1
    table = format_table(results)
    assert table.count("| transformers-bf16 |") == 2 and "k=2 tok/s" in table
    path = save_json(results, tmp_path / "bench.json", model="tiny-random")
    saved = json.loads(path.read_text())
    assert saved["metadata"]["model"] == "tiny-random" and len(saved["results"]) == 2


def test_a_backend_that_fails_is_reported_not_raised(vlm):
    results = run_bench("tiny-random", ["unsloth-4bit"], new_tokens=4, samples=(1,), repeats=1, progress=False)
    assert len(results) == 1 and "unsloth" in results[0].error
    assert "error:" in format_table(results)


def test_table_shows_ceilings_when_measured():
    result = BenchResult(backend="transformers-bnb4", model="m", mode="fast", decode_tok_s=120.0, ttft_s=0.1,
                         weights_gib=6.5, fit_weights_gib=6.6, matmul_floor_tok_s=200.0, bandwidth_limit_tok_s=600.0,
                         weights_read_gib=6.0, copy_gbs=4000.0, samples_tok_s={1: 100.0})
    table = format_table([result])
    assert "| 60 | 20 |" in table and "matmul floor 200 tok/s" in table and "(+1.5%)" in table


def test_random_weights_spread_builds_real_bf16_tensors():
    from llama_vision_helpers.tiny import tiny_config

    model, device_map = random_model_spread(tiny_config(520, 520, 512, [513], 514), devices=["cpu"])
    assert device_map == {"": "cpu"}
    assert all(p.dtype == torch.bfloat16 and not p.is_meta for p in model.parameters())
    assert _device_for("model.language_model.layers.3.mlp.up_proj.weight",
                       {"": 0, "model.language_model.layers.3": 1, "model.language_model.layers.30": 0}) == 1
