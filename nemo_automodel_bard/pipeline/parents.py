"""Build the main job's AR parents (:mod:`nemo_automodel_bard.fixtures.parents`): pre-train, evaluate on the census
validation split, record (settings, checksums, loss curve, accuracy, environment), install into the package.

    python -m nemo_automodel_bard.pipeline.parents build --install          # both, about an hour on 2 cores
    python -m nemo_automodel_bard.pipeline.parents build small --install    # one
    python -m nemo_automodel_bard.pipeline.parents verify                    # checksums of the shipped ones
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from nemo_automodel_bard.fixtures.parents import (
    BUILD_STEPS,
    BUILD_THREADS,
    PARENTS,
    PARENTS_ROOT,
    RECIPE,
    ParentError,
    build_overrides,
    file_digests,
    verify_parent,
)

__all__ = ["build_parent", "run_build", "main"]


def _curve(log_dir: Path) -> list[list[float]]:
    out: dict[int, float] = {}
    path = log_dir / "training.jsonl"
    for line in path.read_text().splitlines() if path.is_file() else []:
        record = json.loads(line)
        if "loss" in record and "step" in record:
            out[int(record["step"])] = float(record["loss"])
    return [[step, loss] for step, loss in sorted(out.items())]


def run_build(name: str, out_dir: str | Path, steps: int = BUILD_STEPS, max_steps: int | None = None) -> Path:
    """Train parent ``name`` into ``out_dir`` (a fresh process, ``BUILD_THREADS`` threads); return ``out_dir``.
    ``max_steps`` stops after that many steps of the same data and schedule (the reproducibility test)."""
    from .environment import resource_root
    from .launch import stage_process_command

    overrides = build_overrides(name, steps)
    if max_steps is not None:  # the full run's schedule, stopped early
        overrides["bard.stop_after_steps"] = int(max_steps)
    overrides["checkpoint.checkpoint_dir"] = str(Path(out_dir).resolve())
    env = {**os.environ, "OMP_NUM_THREADS": str(BUILD_THREADS)}
    cmd = stage_process_command(resource_root() / RECIPE, overrides)
    result = subprocess.run(cmd, env=env, cwd=str(resource_root()))
    if result.returncode != 0:
        raise ParentError(f"building parent {name!r} failed (exit {result.returncode})")
    return Path(out_dir)


def build_parent(name: str, work_dir: str | Path, install: bool = False, eval_samples: int = 500,
                 steps: int = BUILD_STEPS, trained: str | Path | None = None) -> dict[str, Any]:
    """Build (or take ``trained``, a finished run directory of the same overrides), evaluate on the validation
    split and write ``parent.json``; with ``install`` copy the export into the package. Returns the record."""
    from .environment import environment, pin_threads
    from .evaluate import evaluate_model, heldout_records

    pin_threads(BUILD_THREADS)
    started = time.perf_counter()
    run = Path(trained) if trained is not None else run_build(name, Path(work_dir) / name, steps)
    export = run / "final"
    if not (export / "config.json").is_file():
        raise ParentError(f"{run}: no export at final/")
    from nemo_automodel_bard.recipes.ar_init import convert_ar_to_bard

    # decoded autoregressively through a Bard-VL view of the same weights (as the pipeline's AR baseline)
    view = convert_ar_to_bard(export, Path(work_dir) / f"{name}_bard_view", block_size=2, overwrite=True)
    records = heldout_records({"kind": "census", "seed": 0}, eval_samples, split="validation")
    result = evaluate_model(view, records, data_kind="census", mode="ar", batch_size=25, max_new_tokens=160)
    target = PARENTS_ROOT / name if install else Path(work_dir) / f"{name}_export"
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(export.resolve(), target)
    meta = {
        "name": name,
        "recipe": RECIPE,
        "overrides": build_overrides(name, steps),
        "threads": BUILD_THREADS,
        "validation": {"n": result["n"], "exact_match": result["accuracy"], "field_score": result["field_accuracy"]},
        "loss_curve": _curve(run),
        "environment": environment(),
        "seconds": round(time.perf_counter() - started, 1),
        "sha256": file_digests(target),
    }
    (target / "parent.json").write_text(json.dumps(meta, indent=1) + "\n")
    return meta


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nemo_automodel_bard.pipeline.parents",
                                     description="Build the main job's AR parents (see the module docstring).")
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="pre-train the parents, evaluate them, record them")
    build.add_argument("names", nargs="*", default=list(PARENTS), help="parents to build (default: all)")
    build.add_argument("--work-dir", default="runs/parents", help="training runs go here")
    build.add_argument("--install", action="store_true", help="copy the exports into the package")
    build.add_argument("--trained", default=None, help="a finished run directory to record instead of training")
    verify = sub.add_parser("verify", help="check the shipped parents' checksums")
    verify.add_argument("names", nargs="*", default=list(PARENTS))
    args = parser.parse_args(argv)
    if args.command == "verify":
        for name in args.names:
            meta = verify_parent(PARENTS_ROOT / name)
            print(f"{name}: ok (validation exact match {100 * meta['validation']['exact_match']:.1f}%)")
        return 0
    if args.trained and len(args.names) != 1:
        parser.error("--trained records one parent: name it")
    for name in args.names:
        meta = build_parent(name, args.work_dir, install=args.install, trained=args.trained)
        print(json.dumps({k: meta[k] for k in ("name", "validation", "seconds")}))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
