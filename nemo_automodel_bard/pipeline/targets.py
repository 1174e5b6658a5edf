"""The main job's targets on the census task, checked the same way for one run (the report) and for several seeds
(the aggregate): the paper's claims in miniature.

Each model is a :class:`ModelScores`: its exact match, tokens per forward and per-record correctness, one entry per
seed (the records are the same for every seed, so two models' lists pair record by record). Comparisons between two
models use the exact two-sided sign test on the records one gets right and the other wrong, pooled over seeds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

__all__ = ["ModelScores", "TARGETS", "census_targets", "paired", "sign_test"]

#: minutes one run of the main job may take (everything it needs included)
RUN_MINUTES = 20

TARGETS = {
    "parents": "large AR parent >= small AR parent + 2 points",
    "teacher": "teacher (large, B=4) >= small AR parent - 1 point",
    "swd16": "SWD B=16 > its no-KD control by >= 1 point (sign test p < 0.05) and >= small AR parent - 1 point",
    "swd32": "SWD B=32 >= small AR parent - 2 points at >= 16 tokens/forward",
    "time": f"each run <= {RUN_MINUTES} minutes",
}


def sign_test(wins: int, losses: int) -> float:
    """Two-sided exact sign test p-value of ``wins`` against ``losses`` discordant pairs (ties dropped).

    Example:
        >>> round(sign_test(8, 1), 4)
        0.0391
        >>> sign_test(0, 0)
        1.0
    """
    n = wins + losses
    if n == 0:
        return 1.0
    k = min(wins, losses)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * tail)


@dataclass
class ModelScores:
    """One model over seeds: exact match, tokens per forward and per-record correctness (one entry per seed)."""

    accuracy: list[float] = field(default_factory=list)
    tokens_per_forward: list[float] = field(default_factory=list)
    correct: list[list[bool]] = field(default_factory=list)

    @property
    def mean(self) -> float:
        return sum(self.accuracy) / len(self.accuracy)

    @property
    def tpf(self) -> float:
        return sum(self.tokens_per_forward) / len(self.tokens_per_forward)

    @classmethod
    def from_results(cls, results: Iterable[Mapping]) -> "ModelScores":
        """From evaluation results (one per seed, same records): ``accuracy``, ``tokens_per_forward``, ``correct``."""
        out = cls()
        for r in results:
            out.accuracy.append(float(r["accuracy"]))
            out.tokens_per_forward.append(float(r["tokens_per_forward"]))
            out.correct.append([bool(c) for c in r.get("correct", [])])
        return out


def paired(a: ModelScores, b: ModelScores) -> tuple[int, int, float]:
    """Records ``b`` gets right and ``a`` wrong (wins), the reverse (losses), and the sign-test p, pooled over the
    seeds both have (records paired within a seed)."""
    wins = losses = 0
    for ca, cb in zip(a.correct, b.correct):
        if len(ca) != len(cb):
            raise ValueError(f"paired: {len(ca)} vs {len(cb)} records -- not the same evaluation set")
        wins += sum(1 for x, y in zip(ca, cb) if y and not x)
        losses += sum(1 for x, y in zip(ca, cb) if x and not y)
    return wins, losses, sign_test(wins, losses)


def _pct(value: float) -> str:
    return f"{100 * value:.1f}%"


def census_targets(models: Mapping[str, ModelScores], seconds: Sequence[float] = ()) -> list[tuple[str, str, bool]]:
    """``(target, measured, met)`` for the main job (models by evaluation name at the default threshold: ``ar``,
    ``ar_large``, ``teacher_b4``, ``swd_kd_b16``, ``swd_ce_b16``, ``swd_kd_b32``, ...); targets whose models are
    missing are left out."""
    out: list[tuple[str, str, bool]] = []
    small, large = models.get("ar"), models.get("ar_large")
    if small is not None and large is not None:
        wins, losses, p = paired(small, large)
        out.append((TARGETS["parents"], f"large {_pct(large.mean)} vs small {_pct(small.mean)} (won {wins}, lost "
                    f"{losses}, p = {p:.3g})", large.mean >= small.mean + 0.02 - 1e-9))
    teacher = next((models[n] for n in sorted(models) if n.startswith("teacher_b")), None)
    if small is not None and teacher is not None:
        out.append((TARGETS["teacher"], f"teacher {_pct(teacher.mean)} vs small AR {_pct(small.mean)}",
                    teacher.mean >= small.mean - 0.01 - 1e-9))
    kd, ce = models.get("swd_kd_b16"), models.get("swd_ce_b16")
    if kd is not None and ce is not None and small is not None:
        wins, losses, p = paired(ce, kd)
        met = kd.mean >= ce.mean + 0.01 - 1e-9 and p < 0.05 and kd.mean >= small.mean - 0.01 - 1e-9
        out.append((TARGETS["swd16"], f"KD {_pct(kd.mean)} @ {kd.tpf:.2f} vs no-KD {_pct(ce.mean)} @ {ce.tpf:.2f} "
                    f"(won {wins}, lost {losses}, p = {p:.3g}); small AR {_pct(small.mean)}", met))
    kd32 = models.get("swd_kd_b32")
    if kd32 is not None and small is not None:
        out.append((TARGETS["swd32"], f"{_pct(kd32.mean)} @ {kd32.tpf:.2f} tokens/forward (small AR "
                    f"{_pct(small.mean)})", kd32.mean >= small.mean - 0.02 - 1e-9 and kd32.tpf >= 16 - 1e-9))
    if seconds:
        worst = max(seconds)
        out.append((TARGETS["time"], f"longest {worst / 60:.1f} min (runs: {', '.join(f'{s / 60:.1f}' for s in seconds)})",
                    worst <= RUN_MINUTES * 60))
    return out
