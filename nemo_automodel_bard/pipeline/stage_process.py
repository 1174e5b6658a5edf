"""One training stage in a fresh Python process: ``python -m nemo_automodel_bard.pipeline.stage_process RECIPE.yaml
--key=value ...``.

The pipeline starts one per training stage with ``launcher=local`` (one process): a process that has already
trained earlier stages runs later ones markedly slower per step on the same data and weights (measured on the
tiny pipeline: a PBM step 0.51 s inside the pipeline process after the AR and B=2 stages vs 0.33 s in a fresh
process, bit-identical losses; docs/pipeline.md), so each stage pays a few seconds of start-up instead. The
thread count is the parent's (``OMP_NUM_THREADS``, which the pipeline pins).

SIGTERM or SIGINT (forwarded by the pipeline, or sent by a scheduler) stops the training cleanly: the step in
progress ends, is checkpointed, ``<checkpoint_dir>/stopped.json`` says where, and the process exits with
128 + the signal's number (143 for SIGTERM, 130 for SIGINT); the same command resumes from that checkpoint.
"""

from __future__ import annotations

import logging
import os
import sys


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        print("usage: python -m nemo_automodel_bard.pipeline.stage_process RECIPE.yaml [--key=value ...]",
              file=sys.stderr)
        return 2
    import torch

    threads = os.environ.get("OMP_NUM_THREADS")
    if threads:
        torch.set_num_threads(int(threads))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s | %(levelname)s | %(name)s | %(message)s")
    from nemo_automodel_bard.recipes.common import run_recipe

    runner = run_recipe(args[0], args[1:], install_signal_handler=True)
    if getattr(runner, "stop_signal", None) is not None:
        return 128 + int(runner.stop_signal)
    return 0


if __name__ == "__main__":  # pragma: no cover - the pipeline runs it as a module
    raise SystemExit(main())
