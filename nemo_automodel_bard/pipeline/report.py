"""The pipeline report: a table on stdout, ``report.md`` and PNG plots.

Per model and threshold: held-out accuracy, tokens per forward (every forward counted, prefill
included) and tokens/s, next to the AR model decoded autoregressively; loss curves per training
stage (from NeMo's ``training.jsonl``); accuracy against tokens per forward; one rendered denoising
trajectory of a held-out image; and the main job's targets with what was measured.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from nemo_automodel_bard.decoding.defaults import DEFAULT_THRESHOLD

TARGETS_TEXT = {
    "ar_accuracy": "AR model held-out accuracy >= 95%",
    "b32": "B=32 within 1 point of AR at threshold 0.9 with >= 10 tokens/forward",
    "b16": "B=16 within 1 point of AR at threshold 0.9 with >= 6.5 tokens/forward",
    "swd": "SWD students beat same-step students without KD",
    "time": "whole pipeline <= 20 minutes (sum of the recorded stage times)",
}
PIPELINE_SECONDS_TARGET = 20 * 60


def _load_entries(ctx: Any) -> list[dict[str, Any]]:
    entries = []
    for entry in ctx.outputs.get("evaluate", {}).get("entries", []):
        path = Path(entry["result_file"])
        if path.exists():
            entries.append(json.loads(path.read_text()))
    return entries


def _speed(result: dict[str, Any]) -> str:
    speed = result.get("speed")
    if not speed:
        return "-"
    return f"{speed['median']:.0f} ({speed['min']:.0f}-{speed['max']:.0f})"


def _ratio(result: dict[str, Any], base: dict[str, Any] | None) -> str:
    if not result.get("speed") or base is None or not base.get("speed"):
        return "-"
    return f"{result['speed']['median'] / base['speed']['median']:.2f}x"


def _row(result: dict[str, Any], base: dict[str, Any] | None = None) -> list[str]:
    threshold = result.get("threshold")
    return [
        result["name"],
        "AR" if result.get("mode") == "ar" else str(result.get("block_size")),
        "-" if threshold is None else f"{threshold:g}",
        str(result.get("split", "heldout")),
        f"{100 * result['accuracy']:.1f}",
        f"{100 * result['field_accuracy']:.1f}" if "field_accuracy" in result else "-",
        f"{100 * result['token_f1']:.1f}" if "token_f1" in result else "-",
        f"{result['tokens_per_forward']:.2f}",
        f"{result['tokens_per_batch_forward']:.2f}" if "tokens_per_batch_forward" in result else "-",
        f"{result['tokens_per_second']:.0f}",
        _speed(result),
        _ratio(result, base),
    ]


def _table(results: list[dict[str, Any]]) -> str:
    header = ["model", "B", "threshold", "split", "exact match %", "field score %", "token F1 %", "tokens/forward",
              "tokens/batch forward", "tokens/s (batch)", "tokens/s batch 1: median (min-max)", "vs AR parent"]
    base = _find(results, "ar", None)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_row(r, base)) + " |" for r in results]
    return "\n".join(lines)


def paired_rows(results: list[dict[str, Any]], default_threshold: float) -> list[str]:
    """Markdown rows comparing each trained model with its control (SWD KD vs no-KD, self-distillation vs its
    certainty_weight=0 control) and the large parent with the small one, on the same records."""
    from .targets import ModelScores, paired

    pairs = [("ar", "ar_large")]
    for r in results:
        if r["name"].startswith("swd_kd_b"):
            pairs.append((r["name"].replace("swd_kd_", "swd_ce_"), r["name"]))
        if r["name"].startswith("self_distill_b"):
            pairs.append((r["name"].replace("self_distill_", "self_distill_ce_"), r["name"]))
    rows = []
    for base_name, name in dict.fromkeys(pairs):
        base = _find(results, base_name, None if base_name.startswith("ar") else default_threshold)
        mine = _find(results, name, None if name.startswith("ar") else default_threshold)
        if base is None or mine is None or "correct" not in base or "correct" not in mine:
            continue
        wins, losses, p = paired(ModelScores.from_results([base]), ModelScores.from_results([mine]))
        rows.append(f"| {name} vs {base_name} | {100 * mine['accuracy']:.1f} vs {100 * base['accuracy']:.1f} | "
                    f"{mine['tokens_per_forward']:.2f} vs {base['tokens_per_forward']:.2f} | {wins} | {losses} | "
                    f"{p:.3g} |")
    return rows


def _find(results: list[dict[str, Any]], name: str, threshold: float | None) -> dict[str, Any] | None:
    for r in results:
        if r["name"] == name and (threshold is None or r.get("threshold") == threshold):
            return r
    return None


def check_targets(results: list[dict[str, Any]], default_threshold: float) -> list[tuple[str, str, bool | None]]:
    """(target, what was measured, met?) for the main job's targets."""
    out: list[tuple[str, str, bool | None]] = []
    ar = _find(results, "ar", None)
    if ar is not None:
        out.append((TARGETS_TEXT["ar_accuracy"], f"{100 * ar['accuracy']:.1f}%", ar["accuracy"] >= 0.95))
    for block, minimum in ((32, 10.0), (16, 6.5)):
        candidates = [r for r in results if r.get("block_size") == block and r.get("threshold") == default_threshold
                      and r.get("mode") != "ar"]
        if not candidates or ar is None:
            continue
        best = max(candidates, key=lambda r: (r["accuracy"], r["tokens_per_forward"]))
        met = best["accuracy"] >= ar["accuracy"] - 0.01 - 1e-9 and best["tokens_per_forward"] >= minimum
        out.append((TARGETS_TEXT[f"b{block}"], f"{best['name']}: {100 * best['accuracy']:.1f}% "
                    f"(AR {100 * ar['accuracy']:.1f}%), {best['tokens_per_forward']:.2f} tokens/forward", met))
    for r in results:
        if r["name"].startswith("swd_kd_b") and r.get("threshold") == default_threshold:
            control = _find(results, r["name"].replace("swd_kd_", "swd_ce_"), default_threshold)
            if control is None:
                continue
            # beat = more accurate at no fewer tokens per forward, or as accurate with more tokens per forward
            faster = r["tokens_per_forward"] >= control["tokens_per_forward"] - 1e-9
            met = (r["accuracy"] > control["accuracy"] and faster) or (
                r["accuracy"] == control["accuracy"] and r["tokens_per_forward"] > control["tokens_per_forward"])
            out.append((TARGETS_TEXT["swd"] + f" (B={r['block_size']})",
                        f"KD {100 * r['accuracy']:.1f}% @ {r['tokens_per_forward']:.2f} vs no-KD "
                        f"{100 * control['accuracy']:.1f}% @ {control['tokens_per_forward']:.2f}", met))
    return out


def _loss_curves(ctx: Any) -> dict[str, list[tuple[int, float]]]:
    """Training loss per step of the AR pre-training and of every model the stages trained (by its name)."""
    from .records import trained_models

    runs = []
    if ctx.outputs.get("ar_pretrain", {}).get("log_dir"):
        runs.append(("ar_pretrain", ctx.outputs["ar_pretrain"]["log_dir"]))
    runs += [(m.name, m.log_dir) for m in trained_models(ctx.outputs) if m.log_dir]
    curves: dict[str, list[tuple[int, float]]] = {}
    for label, log_dir in runs:
        path = Path(log_dir) / "training.jsonl"
        if not path.exists():
            continue
        by_step: dict[int, float] = {}  # a resumed run may log a step twice: the later record wins
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "loss" in record and "step" in record:
                by_step[int(record["step"])] = float(record["loss"])
        curves[label] = sorted(by_step.items())
    return curves


#: loss-curve panels: stage kind -> title
_STAGE_KINDS = {"ar_pretrain": "AR pre-training", "teacher": "teacher (larger parent)", "pbm": "PBM",
                "swd": "SWD students and controls", "anchor": "anchor", "self_distill": "self-distillation"}


def _kind(label: str) -> str:
    """The panel of a training run's curve (``pbm_b8`` -> ``pbm``, ``swd_kd_b16`` -> ``swd``)."""
    return next((k for k in _STAGE_KINDS if label.startswith(k)), "pbm")


def _save(fig: Any, path: Path, written: list[Path]) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    written.append(path)


def _plots(ctx: Any, results: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written: list[Path] = []
    curves = _loss_curves(ctx)
    kinds = [k for k in _STAGE_KINDS if any(_kind(label) == k for label in curves)]
    if kinds:
        fig, axes = plt.subplots(1, len(kinds), figsize=(4.2 * len(kinds), 3.8), squeeze=False)
        for ax, kind in zip(axes[0], kinds):
            labels = [label for label in curves if _kind(label) == kind and curves[label]]
            colours = plt.get_cmap("tab10" if len(labels) <= 10 else "tab20")
            for i, label in enumerate(labels):
                steps, losses = zip(*curves[label])
                ax.plot(steps, losses, label=label, linewidth=1, color=colours(i))
            ax.set(xlabel="optimizer step", ylabel="training loss", yscale="log", title=_STAGE_KINDS[kind])
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, loc="upper right")
        _save(fig, out_dir / "loss_curves.png", written)
    if results:
        fig, ax = plt.subplots(figsize=(8, 5))
        diffusion = [r for r in results if r.get("mode") != "ar"]
        colours = plt.get_cmap("tab20")
        for i, r in enumerate(diffusion):
            label = f"{r['name']}" + ("" if r.get("threshold") is None else f" @{r['threshold']:g}")
            ax.scatter(r["tokens_per_forward"], 100 * r["accuracy"], s=55, color=colours(i % 20), label=label,
                       marker="s" if r["name"].startswith("teacher") else "o", zorder=3)
        for r, style in zip([r for r in results if r.get("mode") == "ar"], ("--", ":", "-.")):
            ax.axhline(100 * r["accuracy"], linestyle=style, color="black", linewidth=1,
                       label=f"{r['name']} (AR, 1 token/forward): {100 * r['accuracy']:.1f}%")
        ax.set(xlabel="tokens per forward (prefill and every forward counted)", ylabel="exact match (%)",
               title="Accuracy vs. parallelism")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
        _save(fig, out_dir / "accuracy_vs_tokens_per_forward.png", written)
    for r in results:
        trajectory = r.get("trajectory")
        if not trajectory:
            continue
        import torch
        from transformers import AutoTokenizer

        from nemo_automodel_bard.decoding.trajectory import render_trajectory

        blocks = [{k: (torch.tensor(v) if isinstance(v, list) else v) for k, v in block.items()}
                  for block in trajectory["stats"]["trajectory"]]
        tokenizer = AutoTokenizer.from_pretrained(r["model_dir"])
        path = out_dir / "trajectory.png"
        render_trajectory(blocks, path, tokenizer=tokenizer, sample=int(trajectory["sample"]),
                          title=f"{r['name']} @ {r.get('threshold')}: denoising trajectory of a held-out image")
        written.append(path)
        break
    return written


def _strings(value: Any) -> set[str]:
    if isinstance(value, str):
        return {value}
    if isinstance(value, dict):
        return set().union(*(_strings(v) for v in value.values())) if value else set()
    if isinstance(value, (list, tuple)):
        return set().union(*(_strings(v) for v in value)) if value else set()
    return set()


def run_stage_seconds(ctx: Any) -> dict[str, float]:
    """Wall seconds of the stages this run used: training stages whose outputs this run's stages returned (a
    stage left in the manifest by another configuration, e.g. an anchor a later run no longer trains, is not
    counted) and the evaluations written to this run's output directory."""
    from .manifest import Manifest

    used = _strings(ctx.outputs)
    own_eval = f"evaluate:{ctx.output_dir}:"
    out: dict[str, float] = {}
    manifests = [ctx.manifest]
    teacher_dir = ((getattr(ctx, "cfg", None) or {}).get("teacher") or {}).get("work_dir")
    if "teacher" in ctx.outputs and teacher_dir:  # the teacher's own manifest (shared by the run seeds)
        path = Path(teacher_dir)
        path = path if path.is_absolute() else Path.cwd() / path
        if (path / "manifest.json").is_file() and path.resolve() != Path(ctx.work_dir).resolve():
            manifests.append(Manifest(path))
    entries = [item for manifest in manifests for item in manifest.entries.items()]
    for name, entry in entries:
        if not isinstance(entry, dict) or "seconds" not in entry or name.startswith("stage:"):
            continue
        if name.startswith("evaluate:"):
            if name.startswith(own_eval):
                out[name] = entry["seconds"]
        elif _strings(entry.get("outputs", {})) & used:
            out[name] = entry["seconds"]
    return out


def write_report(ctx: Any) -> dict[str, Any]:
    """Write ``report.md`` + plots into the output directory; print the table; return paths."""
    results = _load_entries(ctx)
    out_dir = ctx.output_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    thresholds = list(ctx.cfg["evaluate"]["thresholds"])
    default_threshold = thresholds[0] if thresholds else DEFAULT_THRESHOLD
    table = _table(results)
    # the targets are the embedded task's: they mean nothing for a user's own data
    kind = ctx.cfg["data"].get("kind", "shapes")
    embedded = kind in ("shapes", "census")
    if kind == "census":
        from .targets import ModelScores, census_targets

        at_default = [r for r in results if r.get("threshold") in (None, default_threshold)]
        targets = census_targets({r["name"]: ModelScores.from_results([r]) for r in at_default})
    else:
        targets = check_targets(results, default_threshold) if embedded else []
    plots = _plots(ctx, results, out_dir)
    seconds = run_stage_seconds(ctx)
    total = sum(v for v in seconds.values() if v)
    if total and embedded:
        targets.append((TARGETS_TEXT["time"], f"{total / 60:.1f} min", total <= PIPELINE_SECONDS_TARGET))
    split = results[0].get("split", "heldout") if results else "heldout"
    lines = [
        "# Bard-VL pipeline report",
        "",
        f"Model `{ctx.cfg['model']['name']}`, data `{ctx.cfg['data']['name']}`, "
        f"{results[0]['n'] if results else 0} records of the `{split}` split. Tokens per forward counts every "
        "forward a sample took part in until its EOS (prefill, denoising and commit: its cost at batch 1) and "
        "response tokens up to and including EOS; 'tokens/batch forward' divides by the batch's forwards instead "
        "(early finishers wait for the longest answer). 'tokens/s batch 1' decodes a few records one at a time, "
        "several times: the median with the slowest and fastest repeat; 'vs AR parent' is the ratio of medians to "
        "the (small) AR parent decoded autoregressively.",
        "",
        table,
        "",
    ]
    pair_rows = paired_rows(results, default_threshold)
    if pair_rows:
        lines += ["## Paired comparisons", "",
                  "The same records; won/lost: records the first model gets right and the second wrong, and the "
                  "reverse; p: two-sided exact sign test.", "",
                  "| comparison | exact match % | tokens/forward | won | lost | p |", "|---|---|---|---|---|---|",
                  *pair_rows, ""]
    lines += ["## Targets", ""]
    for text, measured, met in targets:
        lines.append(f"* {'met' if met else 'NOT met'}: {text} — measured {measured}")
    if not targets:
        lines.append("* (no results to check)" if embedded else
                     "* none: the targets belong to the embedded shapes task; free text is scored by exact match "
                     "and token-level F1 (lower-cased words, punctuation ignored)")
    unusable = next((r["unusable_records"] for r in results if "unusable_records" in r), None)
    if unusable is not None:
        lines += ["", "## Held-out records left out", ""]
        if unusable:
            lines.append(f"{len(unusable)} held-out records could not be evaluated and are not in the table:")
            lines.append("")
            lines += [f"* record {u['index']}: {u['reason']}" for u in unusable]
        else:
            lines.append("None: every held-out record was evaluated.")
    lines += ["", "## Stage wall time (s)", ""]
    lines += [f"* {name}: {value:.1f}" for name, value in sorted(seconds.items()) if value]
    env_path = out_dir / "environment.json"
    env = json.loads(env_path.read_text()) if env_path.is_file() else {}
    if env:
        lines += ["", "## Environment", "", "Results depend on these at the last digits (and the tiny pipeline "
                  "amplifies that); every stage fingerprint covers the numerics and our code.", ""]
        lines += [f"* {k}: {v}" for k, v in sorted(env.items())]
    summary = {"seed": int(ctx.cfg.get("seed", 0) or 0), "seconds_total": total,
               "targets": [{"target": t, "measured": m, "met": met} for t, m, met in targets], "environment": env}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    lines += ["", "## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots]
    report = out_dir / "report.md"
    report.write_text("\n".join(lines) + "\n")
    print("\n" + table + "\n")
    for text, measured, met in targets:
        print(f"[{'met' if met else 'NOT met'}] {text}: {measured}")
    print(f"report: {report}")
    return {"report_file": str(report), "plots": [str(p) for p in plots]}


__all__ = ["check_targets", "write_report"]
