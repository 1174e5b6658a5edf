"""Aggregate several pipeline runs (seeds) into one table: mean and spread per model and threshold.

One run is one draw: a tiny model's final accuracy moves by several points with its seed. So the
evidence is a sweep over seeds, ``bard-vl --multirun seed=0,1,2``, after which the Hydra callback
:class:`AggregateRuns` writes ``<sweep dir>/aggregate.md`` and ``aggregate.json``. Runs made one by one
are aggregated with ``bard-vl aggregate OUT_DIR [OUT_DIR ...]`` (each an output directory holding
``eval/*.json`` and ``summary.json``; a sweep directory stands for all its job directories).

Runs are grouped by their Hydra overrides other than ``seed`` (so a sweep over seeds *and* another key
gives one table per value of that key). With several groups, every group is compared with the first one
(the one with the fewest overrides: the baseline) model by model, paired by seed and held-out record:
the exact sign test (McNemar) on the records one model gets right and the other wrong, pooled over seeds.

Example:
    >>> from nemo_automodel_bard.pipeline.aggregate import spread_stats
    >>> spread_stats([0.9, 1.0, 0.95])["spread"]
    0.09999999999999998
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any, Iterable, Optional

from nemo_automodel_bard.decoding.defaults import DEFAULT_THRESHOLD

from .targets import ModelScores, census_targets, sign_test

#: the main job's targets over seeds (threshold 0.9, every forward counted)
AR_MEAN_TARGET, AR_SPREAD_TARGET = 0.95, 0.03
DIFFUSION_TARGETS = {32: 10.0, 16: 6.5}  # block size -> minimum tokens per forward
DIFFUSION_MARGIN, DIFFUSION_SPREAD_TARGET = 0.01, 0.05
RUN_SECONDS_TARGET = 20 * 60


def spread_stats(values: Iterable[float]) -> dict[str, float]:
    """``{"mean", "min", "max", "spread", "std"}`` of a non-empty list."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("spread_stats: no values")
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values),
            "spread": max(values) - min(values), "std": statistics.pstdev(values)}


def _overrides(run_dir: Path) -> list[str]:
    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return []
    import yaml

    return [str(o) for o in (yaml.safe_load(path.read_text()) or [])]


def _is_run_dir(path: Path) -> bool:
    return (path / "eval").is_dir()


def find_runs(paths: Iterable[str | Path]) -> list[Path]:
    """Output directories of runs: each path itself if it holds ``eval/``, else its children that do."""
    runs: list[Path] = []
    for path in map(Path, paths):
        if _is_run_dir(path):
            runs.append(path)
        elif path.is_dir():
            runs.extend(sorted(p for p in path.iterdir() if p.is_dir() and _is_run_dir(p)))
        else:
            raise FileNotFoundError(f"bard-vl aggregate: {path} is not a directory")
    return runs


def load_run(run_dir: Path) -> dict[str, Any]:
    """One run: its seed, group (overrides other than ``seed``), wall time and evaluation results."""
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    overrides = _overrides(run_dir)
    group = " ".join(sorted(o for o in overrides if not o.startswith("seed=")))
    results = []
    for path in sorted((run_dir / "eval").glob("*.json")):
        result = json.loads(path.read_text())
        result.pop("trajectory", None)
        result.pop("predictions", None)
        results.append(result)
    if not results:
        raise ValueError(f"{run_dir}: no evaluation results in {run_dir / 'eval'}")
    return {"dir": str(run_dir), "seed": summary.get("seed"), "group": group,
            "seconds": summary.get("seconds_total"), "results": results}


def _key(result: dict[str, Any]) -> tuple[str, Optional[float]]:
    return result["name"], result.get("threshold")


def aggregate(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per group: per (model, threshold) the mean/min/max of accuracy and tokens per forward over runs,
    run times, and the main job's targets checked on the means and spreads."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault(run["group"], []).append(run)
    out: dict[str, Any] = {}
    for group, members in groups.items():
        rows: dict[tuple[str, Optional[float]], dict[str, Any]] = {}
        for run in members:
            for r in run["results"]:
                row = rows.setdefault(_key(r), {"name": r["name"], "threshold": r.get("threshold"),
                                                "block_size": r.get("block_size"), "mode": r.get("mode"),
                                                "accuracy": [], "tokens_per_forward": [], "seeds": []})
                row["accuracy"].append(float(r["accuracy"]))
                row["tokens_per_forward"].append(float(r["tokens_per_forward"]))
                row["seeds"].append(run["seed"])
        table = []
        for row in rows.values():
            table.append({**{k: row[k] for k in ("name", "threshold", "block_size", "mode", "seeds")},
                          "n_runs": len(row["accuracy"]), "accuracy_values": row["accuracy"],
                          "accuracy": spread_stats(row["accuracy"]),
                          "tokens_per_forward": spread_stats(row["tokens_per_forward"])})
        seconds = [run["seconds"] for run in members if run.get("seconds")]
        census = any(r.get("split") in ("test", "validation") for run in members for r in run["results"])
        targets = census_group_targets(members, seconds) if census else check_aggregate_targets(table, seconds)
        out[group] = {"runs": [run["dir"] for run in members], "seeds": [run["seed"] for run in members],
                      "seconds": seconds, "table": table, "targets": targets}
    return out


def paired_comparisons(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every group against the baseline group (fewest overrides), per (model, threshold): accuracy of both,
    records won and lost (paired by seed and record), and the sign-test p-value. Needs per-record
    ``correct`` lists in the results (written by the evaluation)."""
    groups: dict[str, dict[Any, dict[tuple, list[bool]]]] = {}
    for run in runs:
        for r in run["results"]:
            if "correct" in r:
                groups.setdefault(run["group"], {}).setdefault(run["seed"], {})[_key(r)] = list(r["correct"])
    if len(groups) < 2:
        return []
    baseline = min(groups, key=lambda g: (len(g.split()), g))
    out = []
    for group, by_seed in groups.items():
        if group == baseline:
            continue
        keys = sorted({k for per in by_seed.values() for k in per}, key=lambda k: (k[0], k[1] or 0))
        for key in keys:
            wins = losses = n = right_a = right_b = 0
            seeds = []
            for seed, per in by_seed.items():
                base = groups[baseline].get(seed, {}).get(key)
                mine = per.get(key)
                if base is None or mine is None or len(base) != len(mine):
                    continue
                seeds.append(seed)
                for a, b in zip(base, mine):
                    n += 1
                    right_a += a
                    right_b += b
                    wins += b and not a
                    losses += a and not b
            if n:
                out.append({"group": group, "baseline": baseline, "name": key[0], "threshold": key[1], "seeds": seeds,
                            "n": n, "baseline_accuracy": right_a / n, "accuracy": right_b / n, "wins": wins,
                            "losses": losses, "p_value": sign_test(wins, losses)})
    return out


def census_group_targets(members: list[dict[str, Any]], seconds: list[float],
                         threshold: float = DEFAULT_THRESHOLD) -> list[tuple[str, str, bool]]:
    """The census main job's targets over the seeds of one group (means over seeds, sign tests pooled)."""
    by_name: dict[str, list[dict[str, Any]]] = {}
    for run in sorted(members, key=lambda run: run["seed"]):
        for r in run["results"]:
            if r.get("threshold") in (None, threshold):
                by_name.setdefault(r["name"], []).append(r)
    return census_targets({name: ModelScores.from_results(rs) for name, rs in by_name.items()}, seconds)


def check_aggregate_targets(table: list[dict[str, Any]], seconds: list[float],
                            threshold: float = DEFAULT_THRESHOLD) -> list[tuple[str, str, bool]]:
    """(target, measured, met) for the main job over seeds."""
    targets: list[tuple[str, str, bool]] = []
    if seconds:
        worst = max(seconds)
        targets.append((f"each run <= {RUN_SECONDS_TARGET // 60} minutes", f"longest {worst / 60:.1f} min "
                        f"(runs: {', '.join(f'{s / 60:.1f}' for s in seconds)})", worst <= RUN_SECONDS_TARGET))
    ar = next((r for r in table if r["mode"] == "ar"), None)
    if ar is None:
        return targets
    acc = ar["accuracy"]
    targets.append((f"AR parent >= {100 * AR_MEAN_TARGET:.0f}% on average, spread <= {100 * AR_SPREAD_TARGET:.0f} "
                    "points", f"{100 * acc['mean']:.1f}% (min {100 * acc['min']:.1f}, max {100 * acc['max']:.1f})",
                    acc["mean"] >= AR_MEAN_TARGET and acc["spread"] <= AR_SPREAD_TARGET + 1e-9))
    for block, minimum in DIFFUSION_TARGETS.items():
        candidates = [r for r in table if r["block_size"] == block and r["threshold"] == threshold
                      and r["mode"] != "ar"]
        if not candidates:
            continue
        fast = [r for r in candidates if r["tokens_per_forward"]["mean"] >= minimum] or candidates
        best = max(fast, key=lambda r: (r["accuracy"]["mean"], r["tokens_per_forward"]["mean"]))
        a, t = best["accuracy"], best["tokens_per_forward"]
        met = (a["mean"] >= acc["mean"] - DIFFUSION_MARGIN - 1e-9 and t["mean"] >= minimum
               and a["spread"] <= DIFFUSION_SPREAD_TARGET + 1e-9)
        targets.append((f"best B={block} >= AR - {100 * DIFFUSION_MARGIN:.0f} point on average at >= {minimum:g} "
                        f"tokens/forward, spread <= {100 * DIFFUSION_SPREAD_TARGET:.0f} points",
                        f"{best['name']}: {100 * a['mean']:.1f}% (min {100 * a['min']:.1f}, max {100 * a['max']:.1f}) "
                        f"at {t['mean']:.2f} tokens/forward (AR {100 * acc['mean']:.1f}%)", met))
    return targets


def _fmt_threshold(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:g}"


def render_markdown(aggregated: dict[str, Any]) -> str:
    """The aggregate as Markdown: one table (and target list) per group."""
    lines = ["# Bard-VL runs aggregated over seeds", ""]
    for group, data in aggregated.items():
        if group == "_comparisons":
            continue
        lines += [f"## {group or 'default configuration'}", "",
                  f"Seeds {data['seeds']}; {len(data['runs'])} runs. Accuracy = held-out exact match; "
                  "tokens per forward count every forward (prefill included).", "",
                  "| model | B | threshold | runs | exact match % mean | min | max | spread | per seed | "
                  "tokens/forward mean | min | max |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in data["table"]:
            a, t = r["accuracy"], r["tokens_per_forward"]
            per_seed = ", ".join(f"{100 * v:.1f}" for v in r["accuracy_values"])
            lines.append(
                f"| {r['name']} | {'AR' if r['mode'] == 'ar' else r['block_size']} | {_fmt_threshold(r['threshold'])} "
                f"| {r['n_runs']} | {100 * a['mean']:.1f} | {100 * a['min']:.1f} | {100 * a['max']:.1f} | "
                f"{100 * a['spread']:.1f} | {per_seed} | {t['mean']:.2f} | {t['min']:.2f} | {t['max']:.2f} |")
        lines += ["", "Targets:", ""]
        for text, measured, met in data["targets"]:
            lines.append(f"* {'met' if met else 'NOT met'}: {text} — measured {measured}")
        lines.append("")
    comparisons = aggregated.get("_comparisons") or []
    if comparisons:
        lines += ["## Paired comparisons against the baseline", "",
                  "Paired by seed and held-out record; p: two-sided exact sign test on the records one side gets "
                  "right and the other wrong.", "",
                  "| change | model | threshold | records | baseline % | change % | won | lost | p |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for c in comparisons:
            lines.append(f"| {c['group']} | {c['name']} | {_fmt_threshold(c['threshold'])} | {c['n']} | "
                         f"{100 * c['baseline_accuracy']:.1f} | {100 * c['accuracy']:.1f} | {c['wins']} | "
                         f"{c['losses']} | {c['p_value']:.3g} |")
        lines.append("")
    return "\n".join(lines)


def write_aggregate(paths: Iterable[str | Path], out_dir: str | Path) -> Path:
    """Aggregate the runs under ``paths`` into ``out_dir/aggregate.md`` and ``aggregate.json``."""
    runs = [load_run(p) for p in find_runs(paths)]
    if not runs:
        raise ValueError(f"no runs with evaluation results under {[str(p) for p in paths]}")
    aggregated = aggregate(runs)
    comparisons = paired_comparisons(runs)
    if comparisons:
        aggregated["_comparisons"] = comparisons
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "aggregate.json").write_text(json.dumps(aggregated, indent=2, default=str) + "\n")
    report = out / "aggregate.md"
    text = render_markdown(aggregated)
    report.write_text(text)
    print(text)
    print(f"aggregate: {report}")
    return report


try:
    from hydra.experimental.callback import Callback as _HydraCallback
except ImportError:  # pragma: no cover - hydra is a dependency of the pipeline
    _HydraCallback = object  # type: ignore[assignment,misc]


class AggregateRuns(_HydraCallback):  # type: ignore[misc]
    """Hydra callback: after a ``--multirun``, aggregate its jobs into the sweep directory."""

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        try:
            write_aggregate([sweep_dir], sweep_dir)
        except (ValueError, FileNotFoundError) as exc:
            print(f"bard-vl: no aggregate written: {exc}")


__all__ = ["AggregateRuns", "aggregate", "check_aggregate_targets", "find_runs", "load_run", "paired_comparisons",
           "census_group_targets", "render_markdown", "sign_test", "spread_stats", "write_aggregate"]
