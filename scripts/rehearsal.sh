#!/usr/bin/env bash
# The real-size rehearsal on CPU (docs/rehearsal.md): random-weight stand-ins with the published Qwen3-VL widths
# and vocabulary, every stage of `bard-vl model=qwen3_vl_<size>` for two steps each under torchrun (gloo), an
# 8B-width SWD teacher, evaluation, one `bard-vl infer` and one served request. Arguments go to
# `python -m nemo_automodel_bard.pipeline.rehearsal` (--help lists them), e.g.
#   scripts/rehearsal.sh --size 4b --out runs/rehearsal/4b
#   scripts/rehearsal.sh --size 2b --length 2048 --image-side 1024 --text-layers 1 --vision-layers 1
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-}"
if [[ -z "$python" ]]; then
  if [[ -x "$here/.venv/bin/python" ]]; then python="$here/.venv/bin/python"; else python=python3; fi
fi
export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}"
cd "$here"
exec "$python" -m nemo_automodel_bard.pipeline.rehearsal "$@"
