#!/usr/bin/env bash
# The GPU checks behind the README's numbers, for a GPU machine with PyTorch and transformers 5.17.0 installed.
# On a machine without internet, put wheels for the gpu extra (unsloth, bitsandbytes and their needs) in .whl/.
#   bash tools/gpu_run.sh tests       # the gpu-marked tests: unsloth + bnb 4-bit load, stream, Chat, samples, fast loop
#   bash tools/gpu_run.sh bench       # 11B random weights: 3 backends x (generate, fast), k = 1, 4, 8, 16
#   bash tools/gpu_run.sh spread      # 90B random weights in bf16 across every GPU (device_map), generate
#   bash tools/gpu_run.sh kernel      # 4-bit kernel: checks against bitsandbytes on the 11B shapes, step timings
#   bash tools/gpu_run.sh profile     # where a fast decode step's time goes (bf16 and bnb 4-bit, 11B)
#   bash tools/gpu_run.sh loadtest    # 11B random weights served: clients 1/8/32, batched engine vs queue, bf16 + bnb4
# Several at once: bash tools/gpu_run.sh kernel tests bench
set -euo pipefail
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
export LLAMA_VISION_CACHE=${LLAMA_VISION_CACHE:-/tmp/lvc} HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
out=${OUT:-results}  # where logs and JSON go
mkdir -p "$out"
for what in "${@:-tests}"; do
case "$what" in
  tests)  python3 -m pytest -p no:cacheprovider -o addopts="" tests/test_gpu.py -v -rA -s -k "${PYTEST_K:-}" 2>&1 | tee "$out/gpu_tests.log" ;;
  bench)  python3 -m llama_vision_helpers.cli bench --random-weights 11b ${BENCH_ARGS:-} --json "$out/bench_11b.json" \
            2>&1 | tee "$out/bench.log" ;;
  spread) python3 -m llama_vision_helpers.cli bench --random-weights 90b --spread --new-tokens 32 --repeats 2 \
            --json "$out/spread_90b.json" ;;
  loadtest) python3 tools/loadtest_gpu.py --precisions bf16 --out "$out" 2>&1 | tee "$out/loadtest.log"
            python3 tools/loadtest_gpu.py --precisions bnb4 --queue-clients 1 8 --out "$out" 2>&1 | tee -a "$out/loadtest.log" ;;
  kernel) python3 tools/nf4_kernel_bench.py --out "$out" 2>&1 | tee "$out/kernel.log" ;;
  profile) python3 tools/profile_decode.py ${PROFILE_VARIANTS:-} 2>&1 | tee "$out/profile.log" ;;
  *) echo "usage: bash tools/gpu_run.sh [tests|bench|spread|kernel|profile|loadtest ...]"; exit 2 ;;
esac || failed="${failed:-}$what "  # each stage runs even when one before it failed
done
if [ -n "${failed:-}" ]; then echo "failed: $failed"; exit 1; fi
