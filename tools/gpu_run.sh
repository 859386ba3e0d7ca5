#!/usr/bin/env bash
# The GPU checks behind the README's numbers, for a GPU machine with PyTorch and transformers 5.17.0 installed.
# On a machine without internet, put wheels for the gpu extra (unsloth, bitsandbytes and their needs) in .whl/.
#   bash tools/gpu_run.sh tests       # the gpu-marked tests: unsloth + bnb 4-bit load, stream, Chat, samples, fast loop
#   bash tools/gpu_run.sh bench       # 11B random weights: 3 backends x (generate, fast), k = 1, 4, 8, 16
#   bash tools/gpu_run.sh spread      # 90B random weights in bf16 across every GPU (device_map), generate
#   bash tools/gpu_run.sh kernel      # 4-bit kernel: checks against bitsandbytes on the 11B shapes, step timings
#   bash tools/gpu_run.sh profile     # where a fast decode step's time goes (bf16 and bnb 4-bit, 11B)
#   bash tools/gpu_run.sh prefill     # where an image prefill's time goes; batched decode steps, eager or compiled
#   bash tools/gpu_run.sh loadtest    # 11B random weights served: clients 1/8/32, batched engine vs queue, bf16 + bnb4
#   bash tools/gpu_run.sh serve       # 11B random weights behind `llama-vision serve`: doctor over HTTP, then
#                                     # notebooks 01-06 under nbval with LLAMA_VISION_MODEL=the server, timed
#     serve needs fastapi, uvicorn, openai, nbval and ipykernel (wheels in .whl/ where there is no internet).
#     SERVE_MODEL=tiny-random runs the same steps on a CPU; NOTEBOOKS="notebooks/01_captioning.ipynb" picks some.
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
serve_and_run_notebooks() {
  local missing port url model nb name start seconds result
  missing=$(python3 -c 'import importlib.util as u; print(" ".join(m for m in ("fastapi", "uvicorn", "openai", "nbval", "ipykernel") if u.find_spec(m) is None))')
  if [ -n "$missing" ]; then
    echo "serve needs: $missing. Without internet: pip download -d .whl $missing (and their needs), then run again."
    exit 2
  fi
  port=${PORT:-8000}
  url=http://127.0.0.1:$port/v1
  model=${SERVE_MODEL:-$(python3 -c 'from llama_vision_helpers.bench import random_weights_checkpoint as r; print(r("11b"))')}
  python3 -m llama_vision_helpers.cli serve --model "$model" --backend "${SERVE_BACKEND:-transformers}" --port "$port" \
    >"$out/serve.log" 2>&1 &
  server_pid=$!  # global: the EXIT trap runs after this function has returned
  trap 'kill "$server_pid" 2>/dev/null || true' EXIT
  # wait for the model to load and the server to answer (or to die)
  until python3 -c "import sys, urllib.request; urllib.request.urlopen('http://127.0.0.1:$port/health', timeout=2)" 2>/dev/null; do
    kill -0 "$server_pid" 2>/dev/null || { echo "the server exited:"; tail -30 "$out/serve.log"; exit 1; }
    sleep 2
  done
  python3 -m llama_vision_helpers.cli doctor --model "$url" 2>&1 | tee "$out/doctor.log" || true
  printf "notebook\tseconds\tresult\n" | tee "$out/notebook_times.tsv"
  : >"$out/nbval.log"
  for nb in ${NOTEBOOKS:-notebooks/0[1-6]_*.ipynb}; do
    name=$(basename "$nb")
    start=$(date +%s.%N)
    if LLAMA_VISION_MODEL=$url LLAMA_VISION_TRIALS=${LLAMA_VISION_TRIALS:-2} python3 -m pytest -q -p no:cacheprovider \
         -o addopts="" --nbval --nbval-current-env --nbval-sanitize-with tests/sanitize.cfg "$nb" >>"$out/nbval.log" 2>&1
    then result=passed; else result=failed; fi
    seconds=$(python3 -c "print(f'{$(date +%s.%N) - $start:.1f}')")
    printf "%s\t%s\t%s\n" "$name" "$seconds" "$result" | tee -a "$out/notebook_times.tsv"
  done
  python3 -c "import json, urllib.request; print(json.load(urllib.request.urlopen('http://127.0.0.1:$port/health')))" \
    | tee -a "$out/notebook_times.tsv"
}

for what in "${@:-tests}"; do
case "$what" in
  tests)  python3 -m pytest -p no:cacheprovider -o addopts="" tests/test_gpu.py -v -rA -s -k "${PYTEST_K:-}" 2>&1 | tee "$out/gpu_tests.log" ;;
  bench)  python3 -m llama_vision_helpers.cli bench --random-weights 11b ${BENCH_ARGS:-} --json "$out/bench_11b.json" \
            2>&1 | tee "$out/bench.log" ;;
  spread) python3 -m llama_vision_helpers.cli bench --random-weights 90b --spread --new-tokens 32 --repeats 2 \
            --json "$out/spread_90b.json" ;;
  loadtest) python3 tools/loadtest_gpu.py --precisions bf16 --out "$out" 2>&1 | tee "$out/loadtest.log"
            python3 tools/loadtest_gpu.py --precisions bnb4 --queue-clients 1 8 --out "$out" 2>&1 | tee -a "$out/loadtest.log" ;;
  serve)  serve_and_run_notebooks ;;
  kernel) python3 tools/nf4_kernel_bench.py --out "$out" 2>&1 | tee "$out/kernel.log" ;;
  prefill) python3 tools/profile_prefill.py --out "$out" 2>&1 | tee "$out/prefill.log" ;;
  profile) python3 tools/profile_decode.py ${PROFILE_VARIANTS:-} 2>&1 | tee "$out/profile.log" ;;
  *) echo "usage: bash tools/gpu_run.sh [tests|bench|spread|kernel|profile|prefill|loadtest|serve ...]"; exit 2 ;;
esac || failed="${failed:-}$what "  # each stage runs even when one before it failed
done
if [ -n "${failed:-}" ]; then echo "failed: $failed"; exit 1; fi
