"""Accuracy against tokens per forward, over confidence thresholds and commit rules, on the held-out set.

Decodes each model directory on the embedded task's held-out images (every forward counted, prefill included,
as the pipeline's evaluation) at every threshold with every rule, plus the AR model decoded autoregressively,
and reports tokens per second at batch 1 for the AR model and one chosen setting. Writes a Markdown table and a
plot (accuracy against tokens per forward, one curve per model and rule). Never run it while another job uses
the cores.

    python benchmarks/frontier.py --model b32=runs/tiny-shapes/seed0/pbm_b32-.../final --ar runs/.../ar_init-... \\
        --thresholds 0.5 0.7 0.8 0.9 0.95 0.99 --rules low_confidence_dynamic low_confidence_budget \\
        --out docs/benchmarks/frontier_seed0.md

``--prefill fused separate`` decodes every setting both with the fused prefill (the default decoder: the
prompt's forward is also block 0's first denoising step) and with the published separate prefill forward.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", required=True, help="NAME=MODEL_DIR (repeatable)")
    parser.add_argument("--ar", help="the AR model's Bard-VL directory (decoded autoregressively)")
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.5, 0.7, 0.8, 0.9, 0.95, 0.99])
    parser.add_argument("--rules", nargs="+", default=["low_confidence_dynamic", "low_confidence_budget"])
    parser.add_argument("--num-samples", type=int, default=200)
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--speed-at", default="0.9", help="threshold of the batch-1 tokens/s measurement")
    parser.add_argument("--prefill", nargs="+", choices=["fused", "separate"], default=["fused"],
                        help="decoders: fused prefill (default) and/or the separate prefill forward")
    parser.add_argument("--out", required=True, help="Markdown file; the plot and a JSON go beside it")
    args = parser.parse_args(argv)

    import torch

    from nemo_automodel_bard.pipeline.environment import pin_threads
    from nemo_automodel_bard.pipeline.evaluate import evaluate_model, heldout_records

    pin_threads(2)
    torch.manual_seed(0)
    records = heldout_records({"kind": "shapes", "seed": args.data_seed}, args.num_samples)
    rows = []
    if args.ar:
        r = evaluate_model(args.ar, records, mode="ar")
        rows.append({"model": "ar", "rule": "autoregressive", "threshold": None, "accuracy": r["accuracy"],
                     "tokens_per_forward": r["tokens_per_forward"]})
    def label(rule: str, prefill: str) -> str:
        return rule if len(args.prefill) == 1 else f"{rule} ({prefill} prefill)"

    for spec in args.model:
        name, _, model_dir = spec.partition("=")
        for prefill in args.prefill:
            for rule in args.rules:
                for threshold in args.thresholds:
                    r = evaluate_model(model_dir, records, threshold=threshold, remasking_strategy=rule,
                                       fused_prefill=prefill == "fused")
                    rows.append({"model": name, "rule": label(rule, prefill), "threshold": threshold,
                                 "accuracy": r["accuracy"], "tokens_per_forward": r["tokens_per_forward"]})
                    print(f"{name} {label(rule, prefill)} {threshold}: {100 * r['accuracy']:.1f} % @ "
                          f"{r['tokens_per_forward']:.2f}", flush=True)
    speed = []
    if args.ar:
        r = evaluate_model(args.ar, records, mode="ar", batch_size=1)
        speed.append(("ar (autoregressive)", r["accuracy"], r["tokens_per_second"]))
    for spec in args.model:
        name, _, model_dir = spec.partition("=")
        for prefill in args.prefill:
            for rule in args.rules:
                r = evaluate_model(model_dir, records, threshold=float(args.speed_at), remasking_strategy=rule,
                                   batch_size=1, fused_prefill=prefill == "fused")
                speed.append((f"{name} {label(rule, prefill)} @ {args.speed_at}", r["accuracy"],
                              r["tokens_per_second"]))

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"# Accuracy against tokens per forward ({args.num_samples} held-out images, data seed "
             f"{args.data_seed})", "", "| model | rule | threshold | exact match % | tokens/forward |",
             "|---|---|---:|---:|---:|"]
    for r in rows:
        threshold = "-" if r["threshold"] is None else f"{r['threshold']:g}"
        lines.append(f"| {r['model']} | {r['rule']} | {threshold} | {100 * r['accuracy']:.1f} | "
                     f"{r['tokens_per_forward']:.2f} |")
    lines += ["", "Tokens per second at batch 1 (CPU, 2 threads; response tokens up to EOS over decoding time):", "",
              "| setting | exact match % | tokens/s |", "|---|---:|---:|"]
    lines += [f"| {name} | {100 * acc:.1f} | {tps:.1f} |" for name, acc, tps in speed]
    out.write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps({"rows": rows, "speed": speed}, indent=2) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name in dict.fromkeys(r["model"] for r in rows if r["threshold"] is not None):
        for rule in dict.fromkeys(r["rule"] for r in rows if r["threshold"] is not None):
            pts = sorted((r["tokens_per_forward"], 100 * r["accuracy"]) for r in rows
                         if r["model"] == name and r["rule"] == rule)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{name} {rule}")
    for r in rows:
        if r["threshold"] is None:
            ax.axhline(100 * r["accuracy"], color="grey", linestyle="--", label="AR model")
    ax.set_xlabel("tokens per forward (every forward counted)")
    ax.set_ylabel("exact match %")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)
    print(out.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
