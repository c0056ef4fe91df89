#!/usr/bin/env bash
# The GPU check of the Triton GIST kernel, for a machine with torch + triton (no Ray, MLflow or
# datasets, no network): runs from a plain checkout, no install. Writes gpu_check.json into $OUT
# (default: the current directory). Extra arguments go to gpu_check.py.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-.}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
timeout 300 python benchmarks/gpu_check.py --out "$out/gpu_check.json" "$@"
status=$?
# Optionally the kernel tests on CUDA too (GPU_CHECK_PYTEST=1; a minute or two of compiling).
# pytest needs gist_ray.kernels importable from the plain checkout: a temporary symlink.
if [ "${GPU_CHECK_PYTEST:-0}" = 1 ] && python -c "import pytest" 2>/dev/null; then
    made_link=0
    [ -e gist_ray/kernels ] || { ln -s ../kernels gist_ray/kernels && made_link=1; }
    PYTHONPATH=. timeout 200 python -m pytest tests/kernels -q -x -p no:cacheprovider 2>&1 | tail -15
    [ "$made_link" = 1 ] && rm gist_ray/kernels
fi
exit $status
