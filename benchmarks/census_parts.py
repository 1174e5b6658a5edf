"""Which part of a census answer each model gets right: the listing, the colour counts, the shape counts, the total.

Reads evaluation JSONs (the pipeline's ``eval/<model>.json`` or ``benchmarks/checkpoint_curve.py``'s
``step<s>.json``, all on the same records) and the census records they were decoded on, and prints per file how many
answers parse and how many get each part right (counts compared as multisets, in any order).

    python benchmarks/census_parts.py --split validation --num-samples 500 runs/conv/long/curve/*.json
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

from nemo_automodel_bard.data.census import parse_census
from nemo_automodel_bard.pipeline.evaluate import heldout_records


def parts(predictions: list[str], references: list[str]) -> dict[str, int]:
    """Counts over the records: ``parsed``, ``listing``, ``colour_counts``, ``shape_counts``, ``total``, ``all``."""
    out = Counter()
    for prediction, reference in zip(predictions, references):
        gold, got = parse_census(reference), parse_census(prediction)
        if gold is None:
            raise ValueError(f"reference does not parse: {reference!r}")
        if got is None:
            continue
        out["parsed"] += 1
        checks = {"listing": got.objects == gold.objects,
                  "colour_counts": Counter(got.colors) == Counter(gold.colors),
                  "shape_counts": Counter(got.shapes) == Counter(gold.shapes),
                  "total": got.total == gold.total}
        for name, ok in checks.items():
            out[name] += int(ok)
        out["all"] += int(all(checks.values()))
    return dict(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("results", nargs="+", type=Path)
    parser.add_argument("--split", default="validation")
    parser.add_argument("--num-samples", type=int, default=500)
    args = parser.parse_args(argv)
    records = heldout_records({"kind": "census", "seed": 0}, args.num_samples, split=args.split)
    references = [r.reference for r in records]
    print("| result | n | parsed | listing | colour counts | shape counts | total | all parts |")
    print("|---|---|---|---|---|---|---|---|")
    for path in args.results:
        result = json.loads(path.read_text())
        predictions = result.get("predictions")
        if not predictions or len(predictions) != len(references):
            print(f"| {path} | skipped: {len(predictions or [])} predictions for {len(references)} records |")
            continue
        c = parts(predictions, references)
        print(f"| {path} | {len(references)} | " + " | ".join(str(c.get(k, 0)) for k in
              ("parsed", "listing", "colour_counts", "shape_counts", "total", "all")) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
