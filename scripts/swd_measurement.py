"""The SWD measurement in a fixed wall-clock budget: a student distilled from a stronger anchor against
the same student trained the same extra steps without the KD term.

It measures the time of a PBM step on this machine with a short probe run, sizes every stage so that
the whole chain, the evaluation and the report finish inside ``--budget`` seconds, and runs the
``bard-vl`` pipeline with those sizes::

    python scripts/swd_measurement.py --budget 480 --ar runs/tiny-shapes/ar_pretrain-.../final

Chain: AR init -> PBM B=2 -> 4 -> student B -> (anchor: B=4 trained further) -> SWD student with KD and
its control without -> evaluation on held-out images -> report. ``--ar`` skips the AR pre-training
(else the pipeline's ``ar_pretrain`` stage runs first: its steps are not sized, but its time counts
against the budget). ``--order``: the shapes task's answer order (``subset``: see docs/shapes_task.md).
The plan is written to ``<work_dir>/plan.json``; the results are the pipeline's (``report.md``,
``eval/*.json``).

On a GPU the tiny model's step is bound by the host (collation with the Hugging Face processor, one
sample at a time): give the data loader worker processes (``--workers``), which collate exactly as the
main process does (``tests/test_recipes_inprocess.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from nemo_automodel_bard.data.shapes import ANSWER_ORDERS

#: share of the training steps per stage; ``swd`` is each of the two SWD runs (KD and control), and the
#: anchor gets the most, so that it is stronger than the student
DEFAULT_FRACTIONS = {"b2": 0.15, "b4": 0.15, "student": 0.10, "anchor": 0.30, "swd": 0.15}
#: a KD step runs the teacher's forward as well
KD_COST = 1.3
#: trained stages: B=2, B=4, the student's PBM stage, the anchor, the KD run and its control
NUM_STAGES = 6


def plan_steps(
    seconds: float,
    step_s: float,
    stage_overhead_s: float,
    fractions: dict[str, float] | None = None,
    kd_cost: float = KD_COST,
    min_steps: int = 20,
) -> dict[str, int]:
    """Split ``seconds`` of training time into steps per stage.

    Every stage costs ``stage_overhead_s`` (model load, validation, checkpoint) plus ``step_s`` per step;
    ``swd`` steps are run twice, by the KD run (``kd_cost`` times a PBM step) and by its control. Raises
    ``ValueError`` when a stage would get fewer than ``min_steps`` steps.
    """
    fractions = dict(fractions or DEFAULT_FRACTIONS)
    if set(fractions) != set(DEFAULT_FRACTIONS):
        raise ValueError(f"fractions must name exactly {sorted(DEFAULT_FRACTIONS)}, got {sorted(fractions)}")
    if step_s <= 0:
        raise ValueError(f"step time must be positive, got {step_s}")
    usable = seconds - NUM_STAGES * stage_overhead_s
    cost_per_unit = step_s * sum(f * ((1.0 + kd_cost) if name == "swd" else 1.0) for name, f in fractions.items())
    units = usable / cost_per_unit if usable > 0 else 0.0
    steps = {name: int(f * units) for name, f in fractions.items()}
    short = {name: n for name, n in steps.items() if n < min_steps}
    if short:
        raise ValueError(
            f"a budget of {seconds:.0f} s at {step_s * 1000:.0f} ms/step and {stage_overhead_s:.0f} s per stage leaves "
            f"too few steps for {short} (at least {min_steps} each): raise --budget"
        )
    return steps


def step_time(training_log: Path, skip: int = 5) -> float:
    """Seconds per step from a run's ``training.jsonl`` timestamps (the first ``skip`` steps warm up)."""
    records = [json.loads(line) for line in training_log.read_text().splitlines() if line.strip()]
    times = [datetime.fromisoformat(r["timestamp"].replace("Z", "+00:00")).timestamp() for r in records]
    if len(times) < skip + 3:
        raise ValueError(f"{training_log}: {len(times)} steps are too few to time (need {skip + 3})")
    gaps = [b - a for a, b in zip(times[skip:], times[skip + 1 :])]
    return statistics.mean(gaps)


def _compose(work_dir: Path, overrides: list[str], recipe_overrides: dict[str, Any]):
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    from nemo_automodel_bard.pipeline.app import config_dir

    with initialize_config_dir(config_dir=str(config_dir()), version_base=None):
        cfg = compose(config_name="config", overrides=[f"work_dir={work_dir}", *overrides])
    with open_dict(cfg):
        for section in ("ar_pretrain", "pbm", "swd"):
            cfg[section].overrides = dict(recipe_overrides)
    return cfg


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=float, required=True, help="wall-clock seconds for everything")
    parser.add_argument("--work-dir", type=Path, default=Path("runs/swd-measurement"))
    parser.add_argument("--ar", type=Path, default=None, help="AR Qwen3-VL export to start from (skips ar_pretrain)")
    parser.add_argument("--order", choices=ANSWER_ORDERS, default="reading")
    parser.add_argument("--student", type=int, default=16, help="student block size (the anchor's is 4)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", type=int, default=min(4, max((os.cpu_count() or 1) - 2, 0) // 2),
                        help="data loader worker processes (default: none on a 2-core machine, up to 4)")
    parser.add_argument("--train-size", type=int, default=100_000)
    parser.add_argument("--eval-samples", type=int, default=500)
    parser.add_argument("--eval-reserve", type=float, default=90.0, help="seconds kept for evaluation and report")
    parser.add_argument("--probe-steps", type=int, default=60)
    parser.add_argument("--safety", type=float, default=1.25,
                        help="factor on the probed step time (later stages have longer rows, steps vary)")
    parser.add_argument("--fractions", type=json.loads, default=None, help=f"JSON, default {DEFAULT_FRACTIONS}")
    args = parser.parse_args(argv)

    from nemo_automodel_bard.pipeline.app import run_pipeline

    started = time.time()
    work = args.work_dir.resolve()
    recipe_overrides = {
        "step_scheduler.global_batch_size": args.batch,
        "step_scheduler.local_batch_size": args.batch,
        "step_scheduler.ckpt_every_steps": 1_000_000,  # one checkpoint, at the end
        "step_scheduler.val_every_steps": 500,
        "dataloader.num_workers": args.workers,
        "bard.progress_bar": False,
    }
    data = [f"data.order={args.order}", f"data.train_size={args.train_size}"]
    if args.ar is not None:
        data.append(f"model.init={args.ar.resolve()}")
    # the AR model (pre-trained here unless --ar) and its Bard-VL init, outside the sizing
    outputs = run_pipeline(_compose(work, [*data, "stages=[ar_pretrain,ar_init]"], recipe_overrides))
    ar_model = outputs["ar_pretrain"]["model_path"]

    probe_start = time.time()
    probe = work / "probe"
    run_pipeline(_compose(probe, [*[d for d in data if not d.startswith("model.init")], f"model.init={ar_model}",
                                  "stages=[ar_pretrain,ar_init,pbm]", "pbm.block_sizes=[2]",
                                  f"pbm.max_steps=[{args.probe_steps}]"], recipe_overrides))
    probed = step_time(next(probe.glob("pbm_b2-*/training.jsonl")))
    overhead = max(time.time() - probe_start - args.probe_steps * probed, 0.0)
    step_s = probed * args.safety
    left = args.budget - (time.time() - started) - args.eval_reserve
    steps = plan_steps(left, step_s, overhead, args.fractions)
    plan = {"probed_step_s": probed, "step_s": step_s, "stage_overhead_s": overhead, "training_seconds": left, "steps": steps,
            "batch": args.batch, "workers": args.workers, "order": args.order, "student": args.student}
    work.mkdir(parents=True, exist_ok=True)
    (work / "plan.json").write_text(json.dumps(plan, indent=2) + "\n")
    print(f"[swd-measurement] {step_s * 1000:.0f} ms/step, {overhead:.0f} s per stage; steps {steps}", flush=True)

    run_pipeline(_compose(work, [
        *data,
        f"pbm.block_sizes=[2,4,{args.student}]",
        f"pbm.max_steps=[{steps['b2']},{steps['b4']},{steps['student']}]",
        "swd.teacher_block_size=4", f"swd.student_block_sizes=[{args.student}]",
        f"swd.anchor_extra_steps={steps['anchor']}", f"swd.max_steps={steps['swd']}", "swd.control=true",
        "evaluate.thresholds=[0.9]", f"evaluate.num_samples={args.eval_samples}", "evaluate.batch_size=100",
    ], recipe_overrides))
    print(f"[swd-measurement] done in {time.time() - started:.0f} s (budget {args.budget:.0f} s); "
          f"report: {work / 'report.md'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
