"""Benchmark the tiny pipeline's training steps: the recipe as it was against the speed options (CPU).

Each configuration trains the embedded tiny model for ``--steps`` optimizer steps of batch 32 in a
fresh child process (two torch threads) through the real NeMo recipe, and reports the median step time
after ``--skip`` warm-up steps (from the run's ``training.jsonl``) and training samples per second.
Configurations run one after the other, each ``--reps`` times in alternating order (ABAB...), so that
drift of the machine's load hits all alike. Never run this while another job uses the cores.

* ``ar`` -- AR pre-training step (``recipes/tiny/ar_pretrain.yaml``);
* ``pbm_b2`` / ``pbm_b32`` -- PBM steps at B=2 and B=32 from a tiny random Bard-VL directory.

Variants:

* ``baseline`` -- the recipe YAML as it is (collation in the training process, one sample per row);
* ``workers`` -- collation in one data-loader worker process (``dataloader.num_workers=1``), which
  overlaps the per-sample processor work with the forward and backward passes;
* ``packed`` (PBM) -- ``workers`` plus several samples per row (``pack=True``, ``max_length=512``),
  which removes most row padding (fewer, longer rows).

Usage::

    python benchmarks/bench_tiny_steps.py                     # writes docs/benchmarks/tiny_steps.md
    python benchmarks/bench_tiny_steps.py --steps 30 --reps 1 --out /tmp/x.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, logging, sys, time
import torch
torch.set_num_threads(2)
logging.basicConfig(level=logging.WARNING)
from nemo_automodel_bard.recipes.common import run_recipe
yaml_path, out, overrides = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
run_recipe(yaml_path, overrides)
"""


def _variants(kind: str) -> dict[str, list[str]]:
    workers = ["--dataloader.num_workers=1"]
    out = {"baseline": [], "workers": workers}
    if kind != "ar":
        out["packed"] = workers + ["--dataloader.collate_fn.pack=true", "--dataloader.collate_fn.max_length=512"]
    return out


def _run(kind: str, variant: list[str], steps: int, init_dir: Path, work: Path, tag: str) -> dict:
    out = work / tag
    common = [f"--step_scheduler.max_steps={steps}", "--step_scheduler.val_every_steps=100000",
              "--step_scheduler.ckpt_every_steps=100000", "--checkpoint.save_consolidated=false",
              f"--checkpoint.checkpoint_dir={out}", "--step_scheduler.preemption_signal=None"]
    if kind == "ar":
        yaml_path = ROOT / "recipes" / "tiny" / "ar_pretrain.yaml"
        common += ["--model.vision_warmup.steps=2"]
    else:
        block = int(kind.split("_b")[1])
        yaml_path = ROOT / "recipes" / "tiny" / "pbm.yaml"
        common += [f"--model.pretrained_model_name_or_path={init_dir}", f"--dataloader.collate_fn.block_size={block}"]
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", CHILD, str(yaml_path), str(out), json.dumps(common + variant)],
                   check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    records = [json.loads(line) for line in (out / "training.jsonl").read_text().splitlines()]
    return {"step_times": [r["step_time"] for r in records], "samples": [r["num_samples"] for r in records],
            "wall": time.perf_counter() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--skip", type=int, default=10)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--kinds", nargs="+", default=["ar", "pbm_b2", "pbm_b32"])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks" / "tiny_steps.md")
    args = parser.parse_args()

    from nemo_automodel_bard.fixtures.tiny import write_tiny_checkpoint

    started = time.perf_counter()
    load = os.getloadavg()[0]
    results: dict[tuple[str, str], list[float]] = {}
    throughput: dict[tuple[str, str], list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        init_dir = write_tiny_checkpoint(work / "init", seed=0, block_size=2)
        for kind in args.kinds:
            variants = _variants(kind)
            for rep in range(args.reps):
                order = list(variants) if rep % 2 == 0 else list(reversed(variants))
                for name in order:
                    run = _run(kind, variants[name], args.steps, init_dir, work, f"{kind}-{name}-{rep}")
                    times = run["step_times"][args.skip:]
                    samples = run["samples"][args.skip:]
                    results.setdefault((kind, name), []).extend(times)
                    throughput.setdefault((kind, name), []).append(sum(samples) / max(sum(times), 1e-9))
                    print(f"{kind} {name} rep {rep}: median step {statistics.median(times):.3f} s", flush=True)
    import torch

    lines = [
        "# Tiny training steps: the recipe as it was vs the speed options",
        "",
        f"Generated by `python benchmarks/bench_tiny_steps.py --steps {args.steps} --reps {args.reps}` "
        "(see its docstring for the method).",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, 2 torch threads, torch {torch.__version__}, "
        f"CPU; 1-minute load average {load:.1f} at the start and {os.getloadavg()[0]:.1f} at the end; whole "
        f"run {time.perf_counter() - started:.0f} s. Batch 32 per step; {args.steps} steps per run, the first "
        f"{args.skip} excluded.",
        "",
        "| step | variant | median step (s) | samples/s | time vs baseline |",
        "|---|---|---:|---:|---:|",
    ]
    for kind in args.kinds:
        base = statistics.median(results[(kind, "baseline")])
        for name in _variants(kind):
            med = statistics.median(results[(kind, name)])
            lines.append(f"| {kind} | {name} | {med:.3f} | {statistics.median(throughput[(kind, name)]):.0f} | "
                         f"{med / base:.2f}x |")
    text = "\n".join(lines) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
