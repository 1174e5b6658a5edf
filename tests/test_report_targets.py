"""The report's automatic target check, against hand-made results."""

from __future__ import annotations

from nemo_automodel_bard.pipeline.report import check_targets


def _r(name, accuracy, tpf, block=None, threshold=0.9, mode="diffusion"):
    return {"name": name, "accuracy": accuracy, "tokens_per_forward": tpf, "block_size": block,
            "threshold": threshold, "mode": mode}


AR = _r("ar", 0.96, 1.0, threshold=None, mode="ar")


def test_ar_and_block_targets():
    results = [AR, _r("pbm_b32", 0.95, 10.5, 32), _r("pbm_b16", 0.94, 7.0, 16), _r("pbm_b32", 0.99, 3.0, 32, 0.7)]
    verdicts = dict((text, met) for text, _, met in check_targets(results, 0.9))
    assert verdicts["AR model held-out accuracy >= 95%"] is True
    assert verdicts["B=32 within 1 point of AR at threshold 0.9 with >= 10 tokens/forward"] is True
    # 2 points below the AR model: not met, although fast
    assert verdicts["B=16 within 1 point of AR at threshold 0.9 with >= 6.5 tokens/forward"] is False


def test_block_target_needs_the_tokens_per_forward():
    results = [AR, _r("pbm_b32", 0.97, 9.9, 32)]
    (b32,) = [met for text, _, met in check_targets(results, 0.9) if text.startswith("B=32")]
    assert b32 is False


def test_swd_beats_its_control_only_when_it_dominates():
    cases = [
        ((0.95, 6.0), (0.93, 6.0), True),   # more accurate, as fast
        ((0.95, 5.0), (0.93, 6.0), False),  # more accurate but slower
        ((0.93, 7.0), (0.93, 6.0), True),   # as accurate, faster
        ((0.93, 6.0), (0.93, 6.0), False),  # a tie is not a win
        ((0.90, 9.0), (0.93, 6.0), False),  # faster but less accurate
    ]
    for (kd_acc, kd_tpf), (ce_acc, ce_tpf), expected in cases:
        results = [AR, _r("swd_kd_b16", kd_acc, kd_tpf, 16), _r("swd_ce_b16", ce_acc, ce_tpf, 16)]
        (met,) = [m for text, _, m in check_targets(results, 0.9) if text.startswith("SWD")]
        assert met is expected, (kd_acc, kd_tpf, ce_acc, ce_tpf)
