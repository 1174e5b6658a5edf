"""``bard-vl --help``: fast, built from the config tree, and every key it lists is documented."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import yaml

from nemo_automodel_bard.pipeline.environment import config_dir
from nemo_automodel_bard.pipeline.help import pipeline_help
from nemo_automodel_bard.pipeline.stages import STAGE_ORDER

ROOT = Path(__file__).resolve().parents[1]


def _config_keys(conf: Path) -> set[str]:
    """Every key of the pipeline config: ``section.key`` of conf/config.yaml and of each group option."""
    keys: set[str] = set()
    config = yaml.safe_load((conf / "config.yaml").read_text())
    for key, value in config.items():
        if key in ("defaults", "hydra"):
            continue
        keys |= {f"{key}.{k}" for k in value} if isinstance(value, dict) else {key}
    for group in ("model", "data", "launcher"):
        for path in (conf / group).glob("*.yaml"):
            body = yaml.safe_load(path.read_text()) or {}
            if "_global_" in path.read_text().split("\n", 1)[0]:  # a model group that also sets other sections
                for section, value in body.items():
                    keys |= {f"{section}.{k}" for k in value} if isinstance(value, dict) else {section}
            else:
                keys |= {f"{group}.{k}" for k in body}
    return keys


def test_help_is_fast_and_lists_stages_groups_and_keys():
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "nemo_automodel_bard.cli", "--help"], capture_output=True,
                            text=True, timeout=60, cwd=ROOT)
    elapsed = time.perf_counter() - started
    assert result.returncode == 0, result.stderr
    assert elapsed < 3.0, f"bard-vl --help took {elapsed:.1f} s"
    out = result.stdout
    for stage in STAGE_ORDER:
        assert re.search(rf"^  {stage}\s+\S", out, re.M), stage
    assert "model     qwen3_vl_2b | qwen3_vl_4b | qwen3_vl_8b | tiny (default)" in out
    assert "pbm.block_sizes=[2, 4, 8, 16, 32]" in out and "evaluate.thresholds=[0.9]" in out


def test_help_imports_neither_torch_nor_hydra():
    code = ("import sys; from nemo_automodel_bard.cli import main; main(['--help']); "
            "print('HEAVY', sorted(m for m in ('torch', 'hydra', 'transformers', 'nemo_automodel') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT).stdout
    assert out.strip().splitlines()[-1] == "HEAVY []"


def test_every_pipeline_key_is_documented():
    doc = (ROOT / "docs" / "pipeline.md").read_text()
    keys = _config_keys(config_dir())
    assert len(keys) > 60
    missing = sorted(k for k in keys if f"`{k}`" not in doc)
    assert not missing, f"keys of conf/ not in docs/pipeline.md's table: {missing}"


def test_help_text_follows_the_config_tree(tmp_path):
    conf = tmp_path / "conf"
    for group in ("model", "data", "launcher"):
        (conf / group).mkdir(parents=True)
    (conf / "model" / "tiny.yaml").write_text("name: tiny\n")
    (conf / "model" / "big.yaml").write_text("name: big\n")
    (conf / "data" / "shapes.yaml").write_text("name: shapes\nkind: shapes\n")
    (conf / "launcher" / "local.yaml").write_text("kind: local\n")
    (conf / "config.yaml").write_text("defaults:\n  - _self_\n  - model: big\n  - data: shapes\n  - launcher: local\n"
                                      "seed: 3\nstages: [pbm]\npbm:\n  max_steps: 7\n")
    text = pipeline_help(conf)
    assert "model     big (default) | tiny" in text
    assert "seed=3" in text and "pbm.max_steps=7" in text and "model.name=big" in text
