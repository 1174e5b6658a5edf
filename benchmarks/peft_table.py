"""LoRA against full fine-tuning from pipeline run directories: one row per run, paired tests per seed.

Each run directory is a ``bard-vl`` work dir that trained one stage (``<stage>-<hash>/training.jsonl``,
``validation.jsonl``) and evaluated it on the census **validation** split (``eval/<stage>@<threshold>.json``),
optionally with ``time_train.txt`` (``/usr/bin/time -v`` of the training command: its peak resident set). The
``--base`` and ``--new`` directories are paired seed by seed (same order); the records are the same (the evaluation
records depend only on ``data.seed``). Per pair: exact match won / lost (exact sign test, pooled over seeds) and
field score per record won / lost (records where one side's field score is higher; sign test, pooled).

    python benchmarks/peft_table.py --base runs/lora/full_s{0,1,2} --new runs/lora/lora_s{0,1,2}
    python benchmarks/peft_table.py --runs runs/lora/lora_r64_s0 runs/lora/lora_attn_s0   # rows only
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path

from nemo_automodel_bard.pipeline.aggregate import sign_test


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def run_row(run: Path, stage: str = "pbm_b2", threshold: str = "0.9") -> dict:
    """Accuracy, speed and training figures of one run directory."""
    from nemo_automodel_bard.data.census import field_score
    from nemo_automodel_bard.pipeline.evaluate import heldout_records

    result = json.loads((run / "eval" / f"{stage}@{threshold}.json").read_text())
    if result.get("split") != "validation":
        raise SystemExit(f"{run}: evaluated on {result.get('split')!r}, not the validation split")
    records = heldout_records({"kind": "census", "seed": 0}, int(result["n"]), split="validation")
    fields = [field_score(p, r.reference) for p, r in zip(result["predictions"], records)]
    [stage_dir] = [d for d in run.glob(f"{stage}-*") if d.is_dir()]
    train = _jsonl(stage_dir / "training.jsonl")
    val = _jsonl(stage_dir / "validation.jsonl")
    row = {"run": str(run), "n": int(result["n"]), "exact_match": result["accuracy"],
           "field_score": result["field_accuracy"], "tokens_per_forward": result["tokens_per_forward"],
           "correct": result["correct"], "fields": fields, "steps": len(train),
           "train_loss_last20": statistics.mean(r["loss"] for r in train[-20:]),
           "median_step_s": statistics.median(r["step_time"] for r in train[5:]),
           "val_ce": float(val[-1].get("val_ce", val[-1].get("val_loss"))) if val else None,
           "lr": max(r["lr"] for r in train)}
    timing = run / "time_train.txt"
    if timing.is_file():
        match = re.search(r"Maximum resident set size \(kbytes\): (\d+)", timing.read_text())
        row["peak_rss_mb"] = int(match.group(1)) / 1024 if match else None
    return row


def paired(base: list[dict], new: list[dict]) -> dict:
    """Won / lost of ``new`` against ``base`` on the same records, pooled over the seeds."""
    em = [0, 0]
    fs = [0, 0]
    for b, m in zip(base, new):
        if b["n"] != m["n"]:
            raise SystemExit(f"{b['run']} and {m['run']}: not the same records")
        em[0] += sum(y and not x for x, y in zip(b["correct"], m["correct"]))
        em[1] += sum(x and not y for x, y in zip(b["correct"], m["correct"]))
        fs[0] += sum(y > x for x, y in zip(b["fields"], m["fields"]))
        fs[1] += sum(y < x for x, y in zip(b["fields"], m["fields"]))
    return {"exact": (*em, sign_test(*em)), "field": (*fs, sign_test(*fs)), "pairs": sum(b["n"] for b in base)}


def _line(r: dict) -> str:
    rss = f"{r['peak_rss_mb']:.0f}" if r.get("peak_rss_mb") else "—"
    ce = f"{r['val_ce']:.3f}" if r["val_ce"] is not None else "—"
    return (f"| {r['run']} | {r['lr']:.2g} | {100 * r['exact_match']:.1f} % | {100 * r['field_score']:.1f} % | "
            f"{r['tokens_per_forward']:.2f} | {ce} | {r['train_loss_last20']:.3f} | {r['median_step_s']:.2f} | {rss} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", nargs="*", default=[], type=Path)
    parser.add_argument("--new", nargs="*", default=[], type=Path)
    parser.add_argument("--runs", nargs="*", default=[], type=Path, help="more runs, as rows only")
    parser.add_argument("--stage", default="pbm_b2")
    args = parser.parse_args(argv)
    base = [run_row(r, args.stage) for r in args.base]
    new = [run_row(r, args.stage) for r in args.new]
    rest = [run_row(r, args.stage) for r in args.runs]
    print("| run | peak lr | exact match | field score | tokens/forward | val CE | train loss (last 20) | "
          "step (s) | peak RSS (MB) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in base + new + rest:
        print(_line(r))
    for name, rows in (("base", base), ("new", new)):
        if rows:
            mean = {k: statistics.mean(r[k] for r in rows) for k in ("exact_match", "field_score",
                                                                      "tokens_per_forward", "val_ce")}
            sd = statistics.stdev(100 * r["field_score"] for r in rows) if len(rows) > 1 else 0.0
            print(f"{name} mean of {len(rows)}: exact match {100 * mean['exact_match']:.1f} %, field score "
                  f"{100 * mean['field_score']:.1f} % (sd {sd:.1f}), tokens/forward {mean['tokens_per_forward']:.2f}, "
                  f"val CE {mean['val_ce']:.3f}")
    if base and new:
        if len(base) != len(new):
            raise SystemExit("--base and --new need one run per seed each, in the same order")
        p = paired(base, new)
        print(f"paired, {p['pairs']} record pairs: exact match new won {p['exact'][0]} / lost {p['exact'][1]}, "
              f"p = {p['exact'][2]:.2g}; field score per record new higher {p['field'][0]} / lower {p['field'][1]}, "
              f"p = {p['field'][2]:.2g}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
