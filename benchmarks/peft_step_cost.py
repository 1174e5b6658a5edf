"""Peak training memory and step time of LoRA against full fine-tuning, side by side on one machine state.

The pipeline's own stage command is captured for each arm (``bard-vl`` composed with the given Hydra overrides,
``run_recipe`` intercepted after the AR init, so the recipe, data, seeds and batch are exactly those of the real
stage), then the arms' training processes run **alternately, back to back** (full, LoRA, full, LoRA, ...) in fresh
processes for ``--steps`` steps each. Per run: the peak resident set of the training process (``os.wait4``'s
``ru_maxrss``), its CPU time, and the median ``step_time`` of ``training.jsonl`` over the steps after the first
``--skip``. Load from other processes hits both arms alike, so the ratios (LoRA / full) of the per-pair medians are
what to read; absolute times depend on the machine's load.

    python benchmarks/peft_step_cost.py --out runs/lora/cost --pairs 3 --steps 40 -- \\
        threads=1 'stages=[ar_init,pbm]' 'pbm.block_sizes=[2]' pbm.first_stage_steps=300 \\
        '++pbm.overrides={step_scheduler.global_batch_size: 16, step_scheduler.local_batch_size: 16}'

``--lora`` takes the LoRA arm's extra overrides (default ``peft=lora``). Writes ``<out>/cost.json`` and
``<out>/cost.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path


class _Captured(Exception):
    pass


def capture_stage(overrides: list[str], work_dir: Path) -> tuple[str, dict]:
    """The recipe YAML and overrides the pipeline would train its first training stage with."""
    from hydra import compose, initialize_config_dir

    import nemo_automodel_bard.pipeline.stages as stages
    from nemo_automodel_bard.pipeline.app import config_dir, run_pipeline

    with initialize_config_dir(config_dir=str(config_dir()), version_base=None):
        cfg = compose(config_name="config", overrides=[*overrides, f"work_dir={work_dir}"])
    seen: dict = {}

    def intercept(yaml_path, full, launcher, log_file):
        seen.update(yaml=str(yaml_path), overrides=dict(full))
        raise _Captured

    original = stages.run_recipe
    stages.run_recipe = intercept
    try:
        run_pipeline(cfg, work_dir)
    except _Captured:
        pass
    finally:
        stages.run_recipe = original
    if not seen:
        raise SystemExit("the overrides train no stage")
    return seen["yaml"], seen["overrides"]


def run_once(yaml: str, overrides: dict, out: Path, steps: int, threads: int) -> dict:
    from nemo_automodel_bard.pipeline.launch import stage_process_command

    full = {**overrides, "checkpoint.checkpoint_dir": str(out), "step_scheduler.max_steps": steps,
            "step_scheduler.ckpt_every_steps": 10**6, "step_scheduler.val_every_steps": 10**6,
            "bard.progress_bar": False}
    cmd = stage_process_command(yaml, full)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    started = time.perf_counter()
    with open(out.with_suffix(".log"), "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{out}: training failed, see {out.with_suffix('.log')}")
    rows = [json.loads(line) for line in (out / "training.jsonl").read_text().splitlines() if line.strip()]
    return {"peak_rss_mb": usage.ru_maxrss / 1024, "cpu_s": usage.ru_utime + usage.ru_stime,
            "wall_s": time.perf_counter() - started, "step_times": [r["step_time"] for r in rows]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--skip", type=int, default=5, help="first steps left out of the median step time")
    parser.add_argument("--lora", nargs="*", default=["peft=lora"], help="the LoRA arm's extra overrides")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of both arms (after --)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    threads = 1
    for item in args.overrides:
        if item.startswith("threads="):
            threads = int(item.split("=", 1)[1])
    arms = {"full": capture_stage(args.overrides, args.out / "capture_full"),
            "lora": capture_stage([*args.overrides, *args.lora], args.out / "capture_lora")}
    assert any(k.startswith("peft.") for k in arms["lora"][1]) and not any(k.startswith("peft.") for k in arms["full"][1])
    runs: dict[str, list[dict]] = {"full": [], "lora": []}
    for pair in range(args.pairs):
        for arm in ("full", "lora"):
            result = run_once(*arms[arm], args.out / f"{arm}{pair}", args.steps, threads)
            result["median_step_s"] = statistics.median(result["step_times"][args.skip:])
            runs[arm].append(result)
            print(json.dumps({"arm": arm, "pair": pair, **{k: v for k, v in result.items() if k != "step_times"}}),
                  flush=True)
    ratios = {key: [lo[key] / fu[key] for fu, lo in zip(runs["full"], runs["lora"])]
              for key in ("median_step_s", "peak_rss_mb", "cpu_s")}
    summary = {"overrides": args.overrides, "lora": args.lora, "steps": args.steps, "threads": threads,
               "runs": runs, "ratios": ratios,
               "median": {arm: {k: statistics.median(r[k] for r in runs[arm])
                                for k in ("median_step_s", "peak_rss_mb", "cpu_s")} for arm in runs},
               "median_ratio": {k: statistics.median(v) for k, v in ratios.items()}}
    (args.out / "cost.json").write_text(json.dumps(summary, indent=1))
    lines = [f"{args.pairs} pairs of {args.steps}-step runs, alternating full / LoRA, threads {threads}", "",
             "| pair | full step (s) | LoRA step (s) | ratio | full peak RSS (MB) | LoRA peak RSS (MB) | ratio |",
             "|---|---|---|---|---|---|---|"]
    for i, (fu, lo) in enumerate(zip(runs["full"], runs["lora"])):
        lines.append(f"| {i} | {fu['median_step_s']:.3f} | {lo['median_step_s']:.3f} | "
                     f"{lo['median_step_s'] / fu['median_step_s']:.2f} | {fu['peak_rss_mb']:.0f} | "
                     f"{lo['peak_rss_mb']:.0f} | {lo['peak_rss_mb'] / fu['peak_rss_mb']:.2f} |")
    m = summary["median_ratio"]
    lines.append(f"| median ratio | | | {m['median_step_s']:.2f} | | | {m['peak_rss_mb']:.2f} |")
    (args.out / "cost.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
