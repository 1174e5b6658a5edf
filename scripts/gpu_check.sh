#!/usr/bin/env bash
# GPU acceptance check of Bard-VL at Qwen3-VL-4B width, for the few minutes a GPU is lent (<= 8 min on one H100 or
# H200): one PBM and one SWD training step (time, peak memory), the decode per-forward cost (AR 1-token step vs
# B=16 / B=32 block step) and a serving smoke request. Writes gpu_check.json and gpu_check.md into --out.
#
#   scripts/gpu_check.sh                     # on the GPU machine: full depth, CUDA, bf16 compute
#   scripts/gpu_check.sh --dry-run           # CPU, one text and one vision layer, short rows: checks the script
#   scripts/gpu_check.sh --out DIR           # default runs/gpu_check
#
# Exit status: 0 every check passed, 1 a check failed (the JSON says which and why), 2 no CUDA device without
# --dry-run. What each check measures: benchmarks/gpu_check.py and docs/gpu.md.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${PYTHON:-}" ]; then
  PY=$PYTHON
elif [ -x .venv/bin/python ]; then
  PY=.venv/bin/python
else
  PY=python3
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's package, whatever the environment installed
exec "$PY" benchmarks/gpu_check.py "$@"
