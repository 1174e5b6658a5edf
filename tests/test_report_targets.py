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


def test_run_time_counts_only_the_stages_this_run_used(tmp_path):
    """A stage another configuration left in the manifest (here an SWD anchor a later run no longer trains) and
    other output directories' evaluations are not part of this run's time."""
    from types import SimpleNamespace

    from nemo_automodel_bard.pipeline.manifest import Manifest
    from nemo_automodel_bard.pipeline.report import run_stage_seconds

    manifest = Manifest(tmp_path)
    manifest.record("pbm_b4", "k1", {"model_dir": str(tmp_path / "b4"), "log_dir": str(tmp_path / "b4log")}, 100.0)
    manifest.record("swd_anchor_b4", "k2", {"model_dir": str(tmp_path / "anchor")}, 120.0)  # stale
    manifest.record("swd_ce_b32", "k3", {"model_dir": str(tmp_path / "ce")}, 50.0)
    manifest.record(f"evaluate:{tmp_path / 'out'}:pbm_b4@0.9", "k4", {"result_file": "x"}, 2.0)
    manifest.record(f"evaluate:{tmp_path / 'other'}:pbm_b4@0.9", "k5", {"result_file": "y"}, 3.0)
    outputs = {"pbm": {"b4_dir": str(tmp_path / "b4"), "b4_log": str(tmp_path / "b4log")},
               "swd": {"anchor_dir": str(tmp_path / "b4"), "ce_b32_dir": str(tmp_path / "ce")}}
    ctx = SimpleNamespace(manifest=manifest, outputs=outputs, output_dir=tmp_path / "out")
    seconds = run_stage_seconds(ctx)
    assert sorted(seconds) == sorted(["pbm_b4", "swd_ce_b32", f"evaluate:{tmp_path / 'out'}:pbm_b4@0.9"])
    assert sum(seconds.values()) == 152.0


def test_census_targets_pair_records_and_pool_seeds():
    from nemo_automodel_bard.pipeline.targets import ModelScores, census_targets, paired, sign_test

    def scores(acc, tpf, correct):
        return ModelScores(accuracy=acc, tokens_per_forward=tpf, correct=correct)

    right, wrong = [True] * 10, [False] * 10
    models = {"ar": scores([0.80, 0.80], [1, 1], [right[:8] + wrong[:2]] * 2),
              "ar_large": scores([0.90, 0.90], [1, 1], [right[:9] + wrong[:1]] * 2),
              "teacher_b4": scores([0.795, 0.795], [2, 2], [right] * 2),
              "swd_kd_b16": scores([0.80, 0.80], [8, 8], [right[:8] + wrong[:2]] * 2),
              "swd_ce_b16": scores([0.70, 0.70], [8, 8], [right[:7] + wrong[:3]] * 2),
              "swd_kd_b32": scores([0.78, 0.78], [16, 16], [right] * 2)}
    assert paired(models["swd_ce_b16"], models["swd_kd_b16"]) == (2, 0, sign_test(2, 0))  # pooled over 2 seeds
    met = {text.split(" ")[0] + text.split(" ")[1]: ok for text, _, ok in census_targets(models, [600.0, 1300.0])}
    assert met == {"largeAR": True, "teacher(large,": True, "SWDB=16": False, "SWDB=32": True, "eachrun": False}
