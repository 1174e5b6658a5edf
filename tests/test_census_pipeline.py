"""The main job's pipeline on the census task: the teacher stage, the released SWD configuration, the evaluation
split, batch-1 speed repeats, the self-distillation control and the report's paired comparisons and targets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import record_training
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import nemo_automodel_bard.pipeline.stages as stages
from nemo_automodel_bard.pipeline.app import REPO_ROOT, config_dir, run_pipeline
from nemo_automodel_bard.pipeline.manifest import Manifest
from nemo_automodel_bard.pipeline.validate import PipelineConfigError


def _cfg(tmp_path: Path, overrides: list[str]):
    with initialize_config_dir(config_dir=str(config_dir()), version_base=None):
        return compose(config_name="config", overrides=[f"work_dir={tmp_path}", *overrides])


def _ctx(tmp_path: Path, overrides: list[str]) -> stages.Context:
    plain = OmegaConf.to_container(_cfg(tmp_path, overrides), resolve=True)
    plain.pop("hydra", None)
    return stages.Context(cfg=plain, work_dir=tmp_path, output_dir=tmp_path, repo_root=REPO_ROOT,
                          manifest=Manifest(tmp_path))


def test_default_run_starts_from_the_shipped_parents_on_census(tmp_path):
    cfg = _cfg(tmp_path, [])
    assert cfg.data.kind == "census" and cfg.model.init == "parent:small" and cfg.model.teacher_init == "parent:large"
    assert list(cfg.stages) == ["ar_init", "teacher", "pbm", "swd", "evaluate", "report"]
    assert cfg.swd.anchor == "teacher" and dict(cfg.swd.student_init) == {} and cfg.swd.control is True
    assert cfg.evaluate.split == "test" and cfg.evaluate.num_samples >= 500
    shapes = _cfg(tmp_path, ["data=shapes"])  # the quick run keeps its own settings
    assert shapes.model.init is None and "ar_pretrain" in shapes.stages and shapes.swd.anchor == "fixed"


def test_teacher_stage_converts_the_larger_parent_and_chains_its_pbm_stages(tmp_path, monkeypatch):
    from nemo_automodel_bard.fixtures.tiny import write_tiny_qwen3_vl

    large = write_tiny_qwen3_vl(tmp_path / "large", hidden_size=64)
    runs = record_training(monkeypatch)
    ctx = _ctx(tmp_path, [f"model.teacher_init={large}", "teacher.max_steps=[3,2]", f"teacher.work_dir={tmp_path}/t"])
    out = stages.stage_teacher(ctx)
    assert [r["dataloader.collate_fn.block_size"] for r in runs] == [2, 4]
    assert [r["step_scheduler.max_steps"] for r in runs] == [3, 2]
    converted = json.loads((Path(runs[0]["model.pretrained_model_name_or_path"]) / "config.json").read_text())
    assert converted["model_type"] == "bard_vl" and converted["text_config"]["hidden_size"] == 64
    assert runs[1]["model.pretrained_model_name_or_path"] == str(Path(runs[0]["checkpoint.checkpoint_dir"]) / "final")
    assert runs[0]["optimizer.lr"] == 1e-3 and "optimizer.lr" not in runs[1]  # the first stage's learning rate
    assert all(r["step_scheduler.global_batch_size"] == 16 for r in runs)
    assert runs[0]["dataset.offset"] != runs[1]["dataset.offset"]  # each stage its own fresh images
    assert runs[0]["dataset._target_"].endswith("census_dataset") and runs[0]["dataset.split"] == "train"
    assert runs[0]["validation_dataset.split"] == "validation"  # never the test split
    assert out["block_size"] == 4 and [m["name"] for m in out["models"]] == ["ar_large", "teacher_b4"]
    # one teacher for every run seed: its own seed and manifest, so another seed's run finds it trained
    assert runs[0]["seed"] == stages.derive_seed(0, "teacher_b2")
    runs.clear()
    again = stages.stage_teacher(_ctx(tmp_path / "seed1", [f"model.teacher_init={large}", "teacher.max_steps=[3,2]",
                                                           f"teacher.work_dir={tmp_path}/t", "seed=1"]))
    assert runs == [] and again["model_dir"] == out["model_dir"]


@pytest.mark.parametrize("overrides, message", [
    (["stages=[ar_init,pbm,swd]"], "swd.anchor=teacher needs the outputs of 'teacher'"),
    (["model.teacher_init=null"], "stage teacher needs model.teacher_init"),
    (["teacher.block_sizes=[4,2]"], "teacher.block_sizes must be strictly increasing"),
    (["teacher.max_steps=[10]"], r"teacher.max_steps has 1 entries for 2 block sizes"),
    (["swd.mask_range=[0.6,0.5]"], r"swd.mask_range: level_range must satisfy 0 < lo <= hi <= 1"),
    (["evaluate.split=train"], "evaluate.split must be 'test' or 'validation'"),
    (["model.init=parent:huge"], "model.init: unknown parent 'huge'"),
])
def test_census_config_errors_before_any_work(tmp_path, overrides, message):
    with pytest.raises(PipelineConfigError, match=message):
        run_pipeline(_cfg(tmp_path, overrides))
    assert not (tmp_path / "manifest.json").exists()


@pytest.mark.slow
def test_census_main_job_end_to_end_on_tiny_steps(tmp_path):
    """Every stage of the main job for real (shipped parents, teacher, PBM 2->4->8, SWD B=8 with its control,
    self-distillation with its control), a few steps each; the report pairs every model with its control."""
    overrides = ["teacher.max_steps=2", f"teacher.work_dir={tmp_path}/teacher", "pbm.block_sizes=[2,4,8]", "pbm.max_steps=2", "pbm.first_stage_steps=2",
                 "swd.student_block_sizes=[8]", "swd.max_steps=2", "evaluate.num_samples=4", "evaluate.batch_size=4",
                 "evaluate.max_new_tokens=24", "evaluate.speed_samples=1", "evaluate.speed_repeats=2",
                 "stages=[ar_init,teacher,pbm,swd,self_distill,evaluate,report]", "self_distill.block_size=8",
                 "self_distill.max_steps=2", "self_distill.num_prompts=8", "self_distill.max_new_tokens=24",
                 "self_distill.keep=all"]
    outputs = run_pipeline(_cfg(tmp_path, overrides), tmp_path)
    results = {json.loads(Path(e["result_file"]).read_text())["name"]: json.loads(Path(e["result_file"]).read_text())
               for e in outputs["evaluate"]["entries"]}
    assert {"ar", "ar_large", "teacher_b4", "pbm_b2", "pbm_b8", "swd_kd_b8", "swd_ce_b8", "self_distill_b8",
            "self_distill_ce_b8"} <= set(results)
    for r in results.values():
        assert r["split"] == "test" and r["n"] == 4 and len(r["correct"]) == 4
        speed = r["speed"]
        assert len(speed["repeats"]) == 2 and speed["min"] <= speed["median"] <= speed["max"]
    report = (tmp_path / "report.md").read_text()
    assert "## Paired comparisons" in report and "| swd_kd_b8 vs swd_ce_b8 |" in report
    assert "| self_distill_b8 vs self_distill_ce_b8 |" in report and "| ar_large vs ar |" in report
    assert "large AR parent >= small AR parent + 2 points" in report
    assert (tmp_path / "loss_curves.png").exists() and (tmp_path / "accuracy_vs_tokens_per_forward.png").exists()
