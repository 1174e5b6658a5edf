"""Accuracy along one training stage: decode every saved checkpoint of a stage on the census validation split.

A stage directory (``runs/<run>/seed0/pbm_b2-<hash>``) holds ``epoch_<e>_step_<s>/model`` every
``step_scheduler.ckpt_every_steps``; each is a loadable Bard-VL directory. This script decodes the same
validation records with each of them (block diffusion at the checkpoint's block size, threshold 0.9 unless
told otherwise) and, with ``--ar``, with an AR model as the reference line (e.g. the stage's AR parent). It
writes one evaluation JSON per checkpoint (``<out>/step<s>.json``, with the per-record ``correct`` lists that
``benchmarks/paired_eval.py`` reads) and a Markdown table with the stage's validation loss at each step.

    python benchmarks/checkpoint_curve.py runs/conv/long/pbm_b2-* --num-samples 500 \
        --ar nemo_automodel_bard/fixtures/parents/small --out runs/conv/long/curve

Only the validation split is read: this is for choosing step counts and levers, never for reporting.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

from nemo_automodel_bard.pipeline.aggregate import sign_test
from nemo_automodel_bard.pipeline.evaluate import evaluate_model, heldout_records, write_result

_STEP = re.compile(r"epoch_(\d+)_step_(\d+)$")


def checkpoints(stage_dir: Path, scratch: Path) -> list[tuple[int, Path]]:
    """``(steps trained, model directory)`` of every saved checkpoint of ``stage_dir``, in step order.

    A checkpoint saved as one unconsolidated shard (``model/shard-00001-model-00001-of-00001.safetensors``, the
    same parameter names as the export) is made loadable under ``scratch/step<s>``: the stage's ``final`` export
    supplies the config, processor and tokenizer files, and the shard is linked in as the weights."""
    found = []
    for path in stage_dir.iterdir():
        match = _STEP.match(path.name)
        if not match:
            continue
        steps = int(match.group(2)) + 1
        model = path / "model"
        for candidate in (model, model / "consolidated"):
            if (candidate / "config.json").is_file():
                found.append((steps, candidate))
                break
        else:
            shards = sorted(model.glob("shard-*.safetensors"))
            if len(shards) == 1 and (stage_dir / "final" / "config.json").is_file():
                target = scratch / f"step{steps}"
                target.mkdir(parents=True, exist_ok=True)
                for item in (stage_dir / "final").iterdir():
                    if item.suffix != ".safetensors" and not (target / item.name).exists():
                        (target / item.name).symlink_to(item.resolve())
                weights = target / "model-00001-of-00001.safetensors"
                if not weights.exists():
                    weights.symlink_to(shards[0].resolve())
                found.append((steps, target))
    if not found:
        raise SystemExit(f"{stage_dir}: no loadable epoch_*_step_*/model checkpoints")
    return sorted(found)


def validation_losses(stage_dir: Path) -> dict[int, float]:
    """Steps trained -> the stage's validation loss logged at that step (``validation.jsonl``)."""
    path = stage_dir / "validation.jsonl"
    if not path.is_file():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {int(r["step"]) + 1: float(r.get("val_ce", r.get("val_loss"))) for r in rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("stage_dir", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--num-samples", type=int, default=500)
    parser.add_argument("--threshold", type=float, default=0.9)
    parser.add_argument("--max-new-tokens", type=int, default=160)
    parser.add_argument("--ar", type=Path, default=None, help="an AR model decoded as the reference line")
    parser.add_argument("--every", type=int, default=1, help="decode every n-th checkpoint (the last always)")
    args = parser.parse_args(argv)

    records = heldout_records({"kind": "census", "seed": 0}, args.num_samples, split="validation")
    args.out.mkdir(parents=True, exist_ok=True)
    found = checkpoints(args.stage_dir, args.out / "models")
    found = [c for i, c in enumerate(found) if i % args.every == args.every - 1 or i == len(found) - 1]
    losses = validation_losses(args.stage_dir)
    rows = []
    reference = None
    if args.ar is not None:
        path = args.out / "ar.json"
        if not path.is_file():
            result = evaluate_model(args.ar, records, data_kind="census", mode="ar",
                                    max_new_tokens=args.max_new_tokens)
            write_result(result, path)
        reference = json.loads(path.read_text())
    for steps, model_dir in found:
        path = args.out / f"step{steps}.json"
        if not path.is_file():
            started = time.perf_counter()
            result = evaluate_model(model_dir, records, data_kind="census", threshold=args.threshold,
                                    max_new_tokens=args.max_new_tokens)
            result.update(steps=steps, model_dir=str(model_dir), seconds=time.perf_counter() - started)
            write_result(result, path)
        result = json.loads(path.read_text())
        row = {"steps": steps, "exact_match": result["accuracy"], "field_score": result["field_accuracy"],
               "tokens_per_forward": result["tokens_per_forward"], "val_ce": losses.get(steps)}
        if reference is not None:
            won = sum(a and not b for a, b in zip(result["correct"], reference["correct"]))
            lost = sum(b and not a for a, b in zip(result["correct"], reference["correct"]))
            row.update(won=won, lost=lost, p=sign_test(won, lost))
        rows.append(row)
        print(json.dumps(row), flush=True)
    lines = [f"{args.stage_dir} on {len(records)} validation records, threshold {args.threshold}", "",
             "| steps | val CE | exact match | field score | tokens/forward |" + (" vs AR (won/lost, p) |" if reference else ""),
             "|---|---|---|---|---|" + ("---|" if reference else "")]
    if reference is not None:
        lines.append(f"| AR reference | — | {100 * reference['accuracy']:.1f} % | {100 * reference['field_accuracy']:.1f} % "
                     f"| 1.00 | — |")
    for r in rows:
        ce = "—" if r["val_ce"] is None else f"{r['val_ce']:.3f}"
        line = (f"| {r['steps']} | {ce} | {100 * r['exact_match']:.1f} % | {100 * r['field_score']:.1f} % "
                f"| {r['tokens_per_forward']:.2f} |")
        if reference is not None:
            line += f" {r['won']}/{r['lost']}, p = {r['p']:.2g} |"
        lines.append(line)
    (args.out / "curve.md").write_text("\n".join(lines) + "\n")
    (args.out / "curve.json").write_text(json.dumps(rows, indent=1))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
