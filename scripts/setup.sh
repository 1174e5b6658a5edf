#!/usr/bin/env bash
# Create .venv and install the project with its test, serve, data and peft extras (the server tests use FastAPI,
# uvicorn and the openai client; the data tests Megatron-Energon and datasets; the LoRA tests load adapters with
# peft). Idempotent: re-running is fast.
# torch/torchvision are pinned to the builds this kind of machine serves from local disk; installing
# them first keeps pip from picking a CPU-only torch with triton 3.9, which breaks NeMo 0.7.0 imports.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import torch, torchvision" >/dev/null 2>&1; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
fi
if ! .venv/bin/python -c "import nemo_automodel_bard_alias, nemo_automodel, pytest, fastapi, uvicorn, openai, megatron.energon, datasets, peft" >/dev/null 2>&1 \
   || [ pyproject.toml -nt .venv/.bard-installed ]; then
  .venv/bin/python -m pip install -q -e ".[test,serve,data,peft]"
  touch .venv/.bard-installed
fi
