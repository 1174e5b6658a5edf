"""``bard-vl``: the Bard-VL pipeline and tools.

* ``bard-vl tiny OUT_DIR [--seed N] [--block-size B]`` — write a tiny random Bard-VL directory.
* ``bard-vl demo OUT_DIR`` — write one and run the model-card code on it (image and video).
* ``bard-vl infer MODEL_DIR [--image PATH ...] [--video PATH] --prompt TEXT [--chat] [decoding flags]`` —
  answer about images / a video, streaming block by block, then the step statistics.
* ``bard-vl serve MODEL_DIR [--host H] [--port P] [--media-root DIR] ...`` — an OpenAI-compatible server
  with continuous batching (needs the ``serve`` extra: ``pip install nemo-automodel-bard[serve]``).
* ``bard-vl aggregate RUN_DIR [RUN_DIR ...] [--out DIR]`` — mean and spread over runs (seeds) of every
  model and threshold (a sweep directory stands for all its runs).
* ``bard-vl [hydra overrides...]`` — the Hydra pipeline chaining all stages (when installed).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _tiny(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bard-vl tiny", description="Write a tiny random Bard-VL model directory.")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--block-size", type=int, default=4)
    args = parser.parse_args(argv)
    from nemo_automodel_bard.fixtures.tiny import write_tiny_checkpoint

    path = write_tiny_checkpoint(args.out_dir, seed=args.seed, block_size=args.block_size)
    print(f"wrote tiny Bard-VL checkpoint to {path}")
    return 0


def _demo(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bard-vl demo", description="Tiny checkpoint + model-card generation.")
    parser.add_argument("out_dir", type=Path)
    args = parser.parse_args(argv)
    from nemo_automodel_bard.demo import run_demo

    run_demo(args.out_dir)
    return 0


def _aggregate(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bard-vl aggregate",
                                     description="Aggregate pipeline runs (e.g. seeds): mean and spread per model.")
    parser.add_argument("runs", nargs="+", type=Path, help="run output directories, or a sweep directory")
    parser.add_argument("--out", type=Path, default=None, help="where aggregate.md goes (default: the first path)")
    args = parser.parse_args(argv)
    from nemo_automodel_bard.pipeline.aggregate import write_aggregate

    try:
        write_aggregate(args.runs, args.out or args.runs[0])
    except (ValueError, FileNotFoundError) as exc:
        print(f"bard-vl aggregate: {exc}", file=sys.stderr)
        return 2
    return 0


def _infer(argv: list[str]) -> int:
    from nemo_automodel_bard.serving.infer import main as infer_main

    return infer_main(argv)


def _serve(argv: list[str]) -> int:
    from nemo_automodel_bard.serving.server import main as serve_main

    return serve_main(argv)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``bard-vl`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "tiny":
        return _tiny(argv[1:])
    if argv and argv[0] == "demo":
        return _demo(argv[1:])
    if argv and argv[0] == "aggregate":
        return _aggregate(argv[1:])
    if argv and argv[0] == "infer":
        return _infer(argv[1:])
    if argv and argv[0] == "serve":
        return _serve(argv[1:])
    if argv and argv[0] in ("-h", "--help") and len(argv) == 1:
        from nemo_automodel_bard.pipeline.help import pipeline_help

        print(__doc__.strip() + "\n")
        try:
            print(pipeline_help())
        except FileNotFoundError as exc:  # pragma: no cover - an installation without its config tree
            print(f"(pipeline: {exc})")
        return 0
    try:
        from nemo_automodel_bard.pipeline.app import main as pipeline_main
    except ImportError as exc:  # pragma: no cover - the pipeline ships with the package
        print(f"bard-vl: the pipeline is not available ({exc}); use 'bard-vl tiny' or 'bard-vl demo'", file=sys.stderr)
        return 2
    sys.argv = [sys.argv[0], *argv]
    pipeline_main()
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
