"""lmms-eval on the tiny task with one process and with two (``accelerate launch --num_processes 2``, CPU).

lmms-eval pins other library versions than this project's environment, so it lives in a virtual environment of
its own (``--lmms-python``, docs/evaluation.md): that environment runs lmms-eval, this one builds the model and
the task. The model is the tests' toy checkpoint (a tiny Bard-VL trained for a few seconds on three questions,
two about a picture; the same recipe as ``tests/conftest.py``'s ``toy_model_dir``), the task ``bard_tiny`` with
those questions repeated (``--copies``, 7 questions by default so the two ranks get unequal shares). It runs

1. ``python -m lmms_eval --model bard_vl ... --device cpu`` (one process), and
2. ``python -m accelerate.commands.launch --multi_gpu --num_processes 2 -m lmms_eval ... --device cpu`` (two
   processes through torchrun; with no GPU, accelerate's processes join a gloo group on the CPU; each rank answers
   its share, lmms-eval gathers them on rank 0). ``accelerate launch --cpu --num_processes 2`` is not used: it
   starts ONE process (its simple launcher) unless an MPI launcher is configured, so it would compare one
   process with itself; the check below counts the ranks that answered,

both with ``--log_samples``, and compares the task scores and every question's answer. Exit status 0 when they
are equal. Writes a JSON summary with ``--out``.

    python benchmarks/lmms_eval_two_process.py --lmms-python /work/lmms-venv/bin/python [--out runs/lmms2.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TASK = "bard_tiny"


def toy_records() -> list[dict]:
    """The three toy questions (the tests' ``TOY_PAIRS``) with their pictures."""
    sys.path.insert(0, str(ROOT / "tests"))
    try:
        from helpers import TOY_PAIRS, toy_picture
    finally:
        sys.path.remove(str(ROOT / "tests"))
    return [{"question": p, "answer": a, "image": toy_picture(*pic) if pic else None} for p, a, pic in TOY_PAIRS]


def build_toy_model(out: Path) -> Path:
    """The tests' toy checkpoint: ``bard-vl tiny`` (seed 0, block size 4) trained 100 steps on the toy questions."""
    import torch
    from transformers import AutoProcessor

    from nemo_automodel_bard import BardVLForConditionalGeneration
    from nemo_automodel_bard.fixtures.tiny import write_tiny_checkpoint
    from nemo_automodel_bard.fixtures.toy import make_example, train_toy

    torch.set_num_threads(1)
    if out.exists():
        shutil.rmtree(out)
    write_tiny_checkpoint(out, seed=0, block_size=4)
    processor = AutoProcessor.from_pretrained(out)
    examples = [make_example(processor, r["question"], r["answer"], image=r["image"]) for r in toy_records()]
    model = BardVLForConditionalGeneration.from_pretrained(out, dtype=torch.float32)
    losses = train_toy(model, examples, steps=100, lr=3e-3, copies=8, seed=0)
    if losses[-1] >= 0.5:
        raise RuntimeError(f"the toy model did not learn its questions: last losses {losses[-5:]}")
    model.save_pretrained(out)
    return out


def run_lmms_eval(python: str, model_dir: Path, task_dir: Path, out_dir: Path, processes: int,
                  batch_size: int = 2, timeout: int = 900) -> dict:
    """One lmms-eval run on ``bard_tiny``; returns its scores, every question's answer and the wall time."""
    stats = out_dir / "stats.jsonl"
    args = ["--model", "bard_vl", "--model_args",
            f"pretrained={model_dir},block_size=4,system_prompt=,stats_path={stats}",
            "--tasks", TASK, "--include_path", str(task_dir), "--batch_size", str(batch_size), "--device", "cpu",
            "--output_path", str(out_dir / "out"), "--log_samples"]
    if processes == 1:
        command = [python, "-m", "lmms_eval", *args]
    else:
        command = [python, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
                   "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                   "--main_process_port", "0", "-m", "lmms_eval", *args]
    env = dict(os.environ, HF_DATASETS_CACHE=str(out_dir / "hf"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(ROOT))
    env.pop("LOCAL_RANK", None), env.pop("RANK", None), env.pop("WORLD_SIZE", None)
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - started
    (out_dir / "log.txt").write_text(done.stdout + "\n--- stderr ---\n" + done.stderr)
    if done.returncode != 0:
        raise RuntimeError(f"lmms-eval ({processes} processes) exited with {done.returncode}:\n"
                           f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    results = [json.loads(p.read_text()) for p in (out_dir / "out").rglob("*results*.json")]
    if len(results) != 1:
        raise RuntimeError(f"expected one results file under {out_dir / 'out'}, found {len(results)}")
    samples = {}
    for path in (out_dir / "out").rglob(f"*samples_{TASK}*.jsonl"):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            answer = record.get("filtered_resps") or record.get("resps")
            while isinstance(answer, list):
                answer = answer[0] if answer else ""
            samples[int(record["doc_id"])] = answer
    reports = [json.loads(line) for line in stats.read_text().splitlines()] if stats.exists() else []
    return {"processes": processes, "scores": results[0]["results"][TASK], "answers": samples, "wall_s": wall,
            "samples_per_rank": [r["samples"] for r in reports]}


def compare(python: str, model_dir: Path, work: Path, copies: int = 2, extra: int = 1) -> dict:
    """Both runs on one task folder; ``same_scores`` and ``same_answers`` say whether they agree."""
    from nemo_automodel_bard.evaluation.tiny_task import write_tiny_task

    records = toy_records()
    task_dir = write_tiny_task(work / "task", records * copies + records[:extra])
    runs = {}
    for processes in (1, 2):
        out = work / f"p{processes}"
        out.mkdir(parents=True, exist_ok=True)
        runs[processes] = run_lmms_eval(python, model_dir, task_dir, out, processes)
    one, two = runs[1], runs[2]
    if len(two["samples_per_rank"]) != 2 or sum(two["samples_per_rank"]) < len(one["answers"]):
        raise RuntimeError(f"the two-process run did not answer on two ranks: samples per rank {two['samples_per_rank']}")
    strip = lambda scores: {k: v for k, v in scores.items() if k != "alias"}  # noqa: E731
    return {"questions": len(records) * copies + extra, "one_process": one, "two_processes": two,
            "same_scores": strip(one["scores"]) == strip(two["scores"]),
            "same_answers": one["answers"] == two["answers"] and len(one["answers"]) == len(records) * copies + extra}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lmms-python", required=True, help="the Python of the environment with lmms-eval")
    parser.add_argument("--model-dir", type=Path, default=None, help="a Bard-VL directory (default: build the toy one)")
    parser.add_argument("--work", type=Path, default=None, help="working folder (default: a temporary one)")
    parser.add_argument("--copies", type=int, default=2, help="times the three questions are repeated")
    parser.add_argument("--extra", type=int, default=1, help="questions added once more (unequal shares)")
    parser.add_argument("--out", type=Path, default=None, help="write the summary as JSON here")
    args = parser.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="lmms2-"))
    work.mkdir(parents=True, exist_ok=True)
    model_dir = args.model_dir or build_toy_model(work / "bard-vl-toy")
    summary = compare(args.lmms_python, model_dir, work, args.copies, args.extra)
    for key in ("one_process", "two_processes"):
        run = summary[key]
        print(f"{key}: scores {run['scores']}, wall {run['wall_s']:.1f} s, samples per rank {run['samples_per_rank']}")
    print(f"same scores: {summary['same_scores']}, same answers: {summary['same_answers']}")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return 0 if summary["same_scores"] and summary["same_answers"] else 1


if __name__ == "__main__":
    sys.exit(main())
