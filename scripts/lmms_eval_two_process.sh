#!/usr/bin/env bash
# lmms-eval in its own virtual environment, then the tiny task with one process and with two (CPU), compared.
#
#   bash scripts/lmms_eval_two_process.sh [VENV]     # VENV defaults to ../lmms-venv (outside the repository)
#
# Creates VENV when it has no lmms-eval yet: torch, lmms-eval 0.7, this package with its eval extra (editable),
# and fastapi/uvicorn (transformers serve, for benchmarks/serve_ar_toy.py). Then runs
# benchmarks/lmms_eval_two_process.py from the project's environment (.venv, or the python on PATH); exit 0 when
# the two runs give the same scores and the same answer to every question.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VENV="${1:-$ROOT/../lmms-venv}"
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import lmms_eval" 2>/dev/null; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install "torch==2.14.1" "torchvision==0.29.1"
  "$VENV/bin/pip" install "lmms-eval>=0.7" "filelock<4" "transformers==5.18.0" qwen-vl-utils safetensors accelerate
  "$VENV/bin/pip" install -e "$ROOT[eval]" fastapi uvicorn
fi
PY="$ROOT/.venv/bin/python"
[ -x "$PY" ] || PY=python
cd "$ROOT"
PYTHONPATH="$ROOT" "$PY" benchmarks/lmms_eval_two_process.py --lmms-python "$VENV/bin/python" --out runs/lmms_eval_two_process.json
