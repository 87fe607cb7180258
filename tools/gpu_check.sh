#!/usr/bin/env bash
# One command for a GPU machine: the whole GPU path of the project checked and measured in about 8 minutes on one
# H100/H200 (steps and outputs: tools/gpu_check/__init__.py, `tools/gpu_check.sh --help`).
#
#   tools/gpu_check.sh [OUTDIR]               GPU run
#   tools/gpu_check.sh --cpu-smoke [OUTDIR]   the same steps at tiny shapes on the CPU
#
# Python: $GPU_CHECK_PYTHON, else the project's .venv when it works, else python3 from the PATH (a borrowed GPU
# machine's own Python with torch, triton, timm and torchvision is enough).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -n "${GPU_CHECK_PYTHON:-}" ]]; then PY="$GPU_CHECK_PYTHON"
elif "$ROOT/.venv/bin/python" -c "import torch" >/dev/null 2>&1; then PY="$ROOT/.venv/bin/python"
else PY="$(command -v python3 || true)"; fi
[[ -n "$PY" ]] || { echo "gpu_check: no python3 found (set GPU_CHECK_PYTHON)" >&2; exit 2; }
cd "$ROOT"
PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" exec "$PY" -m tools.gpu_check "$@"
