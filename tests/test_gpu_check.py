"""``scripts/gpu_check.sh --dry-run``: the GPU acceptance script runs on the CPU (real widths and vocabulary, one
layer per tower, short rows) and writes its JSON and Markdown summary with every check passed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_dry_run_writes_its_json_and_summary(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable}
    run = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run", "--out", str(tmp_path),
                          "--threads", "2"], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert result["mode"] == "dry-run" and result["passed"] and not result["errors"]
    assert result["config"]["text"]["vocab_size"] == 151_936 and result["config"]["text"]["hidden_size"] == 2560
    assert result["config"]["text"]["num_key_value_heads"] == 8 and result["config"]["vision"]["hidden_size"] == 1024
    assert result["settings"]["text_layers"] == 1
    assert result["params"] > 151_936 * 2560  # the real embedding matrix is there (frozen in the dry run)
    assert 0 < result["trained_params"] < result["params"] - 151_936 * 2560 + 1
    assert set(result["part_seconds"]) == {"training", "decode", "compiled_decode", "serve"}
    for step in ("pbm_step", "swd_step"):
        r = result[step]
        assert r["seconds"] > 0 and r["peak_memory_gib"] > 0 and r["finite"] and r["block_size"] == 32
    decode = result["decode"]
    assert all(decode[k] > 0 for k in ("ar_step_ms", "b16_step_ms", "b32_step_ms", "b32_over_ar"))
    compiled = result["compiled_decode"]["rows"]
    assert [r["step"] for r in compiled] == ["AR step (1 query)", "B=16 step", "B=32 step"]
    assert all(r["identical"] and r["compiled_median_ms"] > 0 and r["eager_median_ms"] > 0 for r in compiled)
    assert result["serve"]["ok"] and result["serve"]["completion_tokens"] > 0
    assert {c["name"] for c in result["checks"]} >= {"pbm step", "swd step", "decode", "compiled decode", "serve"}
    summary = (tmp_path / "gpu_check.md").read_text()
    assert "PBM STEP" in summary and "B=32" in summary and "Passed: yes" in summary


def test_gpu_check_refuses_to_run_without_a_gpu_unless_dry(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    run = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--out", str(tmp_path)],
                         env={**os.environ, "PYTHON": sys.executable}, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "no CUDA device" in run.stderr
    assert not (tmp_path / "gpu_check.json").exists()
