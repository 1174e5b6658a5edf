"""scripts/swd_measurement.py: sizing the stages to a wall-clock budget, timing steps from a training log."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "swd_measurement.py"


@pytest.fixture(scope="module")
def measurement():
    spec = importlib.util.spec_from_file_location("swd_measurement", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_plan_fills_the_budget_and_no_more(measurement):
    seconds, step_s, overhead = 400.0, 0.05, 10.0
    steps = measurement.plan_steps(seconds, step_s, overhead)
    cost = measurement.NUM_STAGES * overhead + step_s * (
        steps["b2"] + steps["b4"] + steps["student"] + steps["anchor"] + steps["swd"] * (1 + measurement.KD_COST))
    assert cost <= seconds
    assert cost > seconds - 6 * step_s * (1 + measurement.KD_COST)  # only int rounding is left over
    # the anchor (B=4) gets more steps than the student's chain before SWD
    assert steps["b2"] + steps["b4"] + steps["anchor"] > steps["b2"] + steps["b4"] + steps["student"]
    assert steps == {"b2": 976, "b4": 976, "student": 650, "anchor": 1952, "swd": 976}


def test_the_plan_scales_with_the_step_time(measurement):
    fast = measurement.plan_steps(400.0, 0.05, 10.0)
    slow = measurement.plan_steps(400.0, 0.10, 10.0)
    assert all(abs(slow[k] - fast[k] / 2) <= 1 for k in fast)


def test_a_budget_too_small_is_refused_with_the_numbers(measurement):
    with pytest.raises(ValueError, match=r"budget of 100 s at 500 ms/step and 10 s per stage .* raise --budget"):
        measurement.plan_steps(100.0, 0.5, 10.0)
    with pytest.raises(ValueError, match="fractions must name exactly"):
        measurement.plan_steps(400.0, 0.05, 10.0, fractions={"b2": 1.0})
    with pytest.raises(ValueError, match="step time must be positive"):
        measurement.plan_steps(400.0, 0.0, 10.0)


def test_step_time_skips_the_warm_up_steps(measurement, tmp_path):
    seconds = [0.0, 5.0, 5.5, 6.0, 6.5, 7.0, 7.3, 7.6, 7.9, 8.2]  # slow start, then 0.3 s per step
    log = tmp_path / "training.jsonl"
    log.write_text("".join(json.dumps({"step": i, "timestamp": f"2026-11-27T22:00:{s:06.3f}Z"}) + "\n"
                           for i, s in enumerate(seconds)))
    assert measurement.step_time(log, skip=5) == pytest.approx(0.3)
    with pytest.raises(ValueError, match="too few to time"):
        measurement.step_time(log, skip=8)
