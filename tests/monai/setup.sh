#!/usr/bin/env bash
# Creates tests/monai/.venv with the pinned MONAI reference environment.
# Usage: tests/monai/setup.sh          (idempotent; re-running only installs what is missing)
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="$HERE/.venv"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --upgrade pip
# torch from PyPI pulls its CUDA wheels (~2.7 GB); the fixtures only use the CPU.
"$VENV/bin/python" -m pip install --quiet -r "$HERE/requirements.txt"
"$VENV/bin/python" - <<'PY'
import torch, monai, nibabel, numpy, safetensors, onnx
print(f"torch {torch.__version__}, monai {monai.__version__}, nibabel {nibabel.__version__}, "
      f"numpy {numpy.__version__}, safetensors {safetensors.__version__}, onnx {onnx.__version__}")
PY
