#!/usr/bin/env bash
# The GPU check of the Triton GIST kernels, for a machine with torch + triton (no Ray, MLflow or
# datasets, no network): runs from a plain checkout, no install, at most 540 s. Writes
# gpu_check.json into $OUT (default: the current directory) after every stage. Extra arguments
# go to gpu_check.py.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-.}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
timeout -k 10 540 python3 benchmarks/gpu_check.py --out "$out/gpu_check.json" "$@"
