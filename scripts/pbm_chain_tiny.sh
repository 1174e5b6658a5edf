#!/usr/bin/env bash
# Tiny (CPU) Bard-VL chain: AR init, then PBM B = 2 -> 4 -> 8 -> 16 -> 32, each stage from the previous
# export. Arguments go to `python -m nemo_automodel_bard.recipes.chain` (see docs/recipes.md), e.g.
#   bash scripts/pbm_chain_tiny.sh                       # needs runs/tiny/ar/final (recipes/tiny/ar_pretrain.yaml)
#   bash scripts/pbm_chain_tiny.sh --ar-pretrain         # AR pre-training first
#   bash scripts/pbm_chain_tiny.sh --nproc-per-node 2 -- --step_scheduler.max_steps=50
set -euo pipefail
cd "$(dirname "$0")/.."
PY=python
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi
exec "$PY" -m nemo_automodel_bard.recipes.chain "$@"
