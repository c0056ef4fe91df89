#!/usr/bin/env bash
# The GPU check of the Triton GIST kernels (docs/gpu.md), for a machine with torch + triton +
# transformers + sentence-transformers (no Ray, MLflow or datasets, no network): runs from a
# plain checkout, no install, at most 400 s. Everything goes to $OUT (default ./gpu_check_out):
# header.json first, gpu_check.json after every stage, gpu_check.log, stages/, tracebacks/.
# Extra arguments go to gpu_check.py (e.g. --stages smoke,correctness).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu_check_out}"
mkdir -p "$out"
timeout -k 10 440 python3 benchmarks/gpu_check.py --out "$out" "$@"
