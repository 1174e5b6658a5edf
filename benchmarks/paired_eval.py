"""Paired comparison of two recipes from their evaluation JSONs, seed by seed.

Each side is a list of evaluation directories, one per seed in the same order (``.../eval`` holding
``<model>@<threshold>.json`` as the pipeline writes them, all on the same held-out records). For every model and
threshold found on both sides: accuracy and tokens per forward per seed and on average, and the records one side
gets right and the other wrong, pooled over seeds, with the exact two-sided sign test.

    python benchmarks/paired_eval.py --base runs/a-seed0/eval runs/a-seed1/eval --new runs/b-seed0/eval runs/b-seed1/eval

``--pair pbm_b32@0.9 self_distill_b32@0.9`` compares two models of the same runs (``--new`` may then be left out).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from nemo_automodel_bard.pipeline.aggregate import sign_test


def _load(directory: str) -> dict[str, dict]:
    out = {}
    for path in sorted(Path(directory).glob("*.json")):
        result = json.loads(path.read_text())
        if "correct" in result:
            out[path.stem] = result
    if not out:
        raise SystemExit(f"{directory}: no evaluation results with per-record 'correct' lists")
    return out


def compare(base_dirs: list[str], new_dirs: list[str], models: list[str] | None = None,
            pair: tuple[str, str] | None = None) -> list[dict]:
    """One row per model@threshold present in every directory of both sides (``pair``: one row, the first
    result name on the base side against the second on the new side)."""
    if len(base_dirs) != len(new_dirs):
        raise SystemExit("--base and --new need one directory per seed each, in the same order")
    base = [_load(d) for d in base_dirs]
    new = [_load(d) for d in new_dirs]
    if pair:
        missing = [f"{name} in {d}" for side, dirs, name in ((base, base_dirs, pair[0]), (new, new_dirs, pair[1]))
                   for results, d in zip(side, dirs) if name not in results]
        if missing:
            raise SystemExit(f"--pair: no result {', '.join(missing)}")
        base = [{f"{pair[0]} -> {pair[1]}": r[pair[0]]} for r in base]
        new = [{f"{pair[0]} -> {pair[1]}": r[pair[1]]} for r in new]
    keys = set.intersection(*(set(r) for r in base + new))
    rows = []
    for key in sorted(keys):
        if models and not pair and key.split("@")[0] not in models:
            continue
        wins = losses = n = 0
        acc_b, acc_n, tpf_b, tpf_n = [], [], [], []
        for b, m in zip(base, new):
            cb, cn = b[key]["correct"], m[key]["correct"]
            if len(cb) != len(cn):
                raise SystemExit(f"{key}: {len(cb)} against {len(cn)} records -- not the same held-out set")
            n += len(cb)
            wins += sum(1 for x, y in zip(cb, cn) if y and not x)
            losses += sum(1 for x, y in zip(cb, cn) if x and not y)
            acc_b.append(100 * b[key]["accuracy"])
            acc_n.append(100 * m[key]["accuracy"])
            tpf_b.append(b[key]["tokens_per_forward"])
            tpf_n.append(m[key]["tokens_per_forward"])
        rows.append({"model": key, "n": n, "base": acc_b, "new": acc_n, "tpf_base": sum(tpf_b) / len(tpf_b),
                     "tpf_new": sum(tpf_n) / len(tpf_n), "won": wins, "lost": losses, "p": sign_test(wins, losses)})
    return rows


def render(rows: list[dict]) -> str:
    lines = ["| model | n (pairs) | base % per seed | new % per seed | base mean | new mean | won | lost | p | "
             "tokens/forward base -> new |", "|---|---:|---|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['n']} | {', '.join(f'{a:.1f}' for a in r['base'])} | "
            f"{', '.join(f'{a:.1f}' for a in r['new'])} | {sum(r['base']) / len(r['base']):.1f} | "
            f"{sum(r['new']) / len(r['new']):.1f} | {r['won']} | {r['lost']} | {r['p']:.2g} | "
            f"{r['tpf_base']:.2f} -> {r['tpf_new']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", nargs="+", required=True, help="evaluation directories of the baseline, one per seed")
    parser.add_argument("--new", nargs="+", help="evaluation directories of the change, same seeds (default: --base)")
    parser.add_argument("--models", nargs="*", help="only these model names (e.g. pbm_b2 pbm_b32)")
    parser.add_argument("--pair", nargs=2, metavar=("BASE", "NEW"),
                        help="compare result BASE (e.g. pbm_b32@0.9) with result NEW of the same or the --new runs")
    args = parser.parse_args(argv)
    if args.new is None and not args.pair:
        parser.error("--new is required unless --pair compares two models of the same runs")
    print(render(compare(args.base, args.new or args.base, args.models, tuple(args.pair) if args.pair else None)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
