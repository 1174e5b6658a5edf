"""The real-size pipeline trains as published: the recipes' epochs, not the tiny step caps."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from helpers import record_training
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import nemo_automodel_bard.pipeline.stages as stages
from nemo_automodel_bard.pipeline.app import REPO_ROOT, config_dir, run_pipeline
from nemo_automodel_bard.pipeline.manifest import Manifest
from nemo_automodel_bard.pipeline.validate import PipelineConfigError


def _compose(overrides):
    with initialize_config_dir(config_dir=str(config_dir()), version_base=None):
        return compose(config_name="config", overrides=overrides)


@pytest.mark.parametrize("size", ["qwen3_vl_2b", "qwen3_vl_4b", "qwen3_vl_8b"])
def test_real_sizes_have_no_tiny_step_caps(size):
    cfg = _compose([f"model={size}"])
    assert cfg.pbm.max_steps is None and cfg.pbm.first_stage_steps is None
    assert cfg.swd.max_steps is None and cfg.swd.anchor_extra_steps == 0 and cfg.threads is None
    tiny = _compose([])
    assert tiny.pbm.max_steps == 200 and tiny.swd.max_steps == 100 and tiny.threads == 2


@pytest.mark.slow
def test_cfg_job_shows_the_real_size_settings():
    out = subprocess.run([sys.executable, "-m", "nemo_automodel_bard.cli", "model=qwen3_vl_4b", "--cfg", "job"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    job = OmegaConf.create(out.stdout)
    assert job.pbm.max_steps is None and job.swd.max_steps is None and job.model.init == "Qwen/Qwen3-VL-4B-Instruct"


def test_stages_that_train_by_epochs_pass_no_step_cap(tmp_path, monkeypatch):
    runs = record_training(monkeypatch)
    train = tmp_path / "train.jsonl"
    train.write_text('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n')
    cfg = OmegaConf.to_container(_compose(["model=qwen3_vl_4b", f"work_dir={tmp_path}", "data=jsonl",
                                           f"data.path={train}", "pbm.block_sizes=[4,8]",
                                           "swd.student_block_sizes=[8]", "swd.control=false"]), resolve=True)
    cfg.pop("hydra", None)
    ctx = stages.Context(cfg=cfg, work_dir=tmp_path, output_dir=tmp_path, repo_root=REPO_ROOT,
                         manifest=Manifest(tmp_path))
    ctx.outputs["ar_init"] = {"model_dir": str(tmp_path / "init")}
    ctx.outputs["pbm"] = stages.stage_pbm(ctx)
    stages.stage_swd(ctx)
    assert [r["_recipe"] for r in runs] == ["pbm.yaml", "pbm.yaml", "swd.yaml"]
    for overrides in runs:
        assert "step_scheduler.max_steps" not in overrides  # the recipe's num_epochs
        assert overrides["dataset.kind"] == "jsonl"


def test_fresh_shapes_data_needs_a_step_count(tmp_path):
    cfg = _compose([f"work_dir={tmp_path}", "pbm.max_steps=null", "stages=[pbm]"])
    with pytest.raises(PipelineConfigError, match="stages that train by epochs"):
        run_pipeline(cfg)


def test_stage_overrides_reach_only_their_block_size(tmp_path, monkeypatch):
    runs = record_training(monkeypatch)
    cfg = OmegaConf.to_container(_compose([f"work_dir={tmp_path}", "pbm.block_sizes=[4,8,16]",
                                           "+pbm.stage_overrides={8: {dataset.path: /data/b8.jsonl}}"]), resolve=True)
    cfg.pop("hydra", None)
    ctx = stages.Context(cfg=cfg, work_dir=tmp_path, output_dir=tmp_path, repo_root=REPO_ROOT,
                         manifest=Manifest(tmp_path))
    ctx.outputs["ar_init"] = {"model_dir": str(tmp_path / "init")}
    stages.stage_pbm(ctx)
    assert [r.get("dataset.path") for r in runs] == [None, "/data/b8.jsonl", None]
    bad = _compose([f"work_dir={tmp_path}", "+pbm.stage_overrides={64: {a: 1}}"])
    with pytest.raises(PipelineConfigError, match="pbm.stage_overrides: 64 is not one of pbm.block_sizes"):
        run_pipeline(bad)
