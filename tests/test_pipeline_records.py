"""Training stages hand their models on as typed records; the evaluation reads those, old manifests too."""

from __future__ import annotations

from helpers import record_training
from test_pipeline_seeds import _ctx

import nemo_automodel_bard.pipeline.stages as stages
from nemo_automodel_bard.pipeline.records import TrainedModel, trained_models


def test_stages_record_every_model_with_its_block_size(tmp_path, monkeypatch):
    record_training(monkeypatch)
    ctx = _ctx(tmp_path, ["data=shapes", "swd.anchor_extra_steps=5", "self_distill.max_steps=2"])
    ctx.outputs["ar_init"] = {"model_dir": str(tmp_path / "init"),
                              "models": [TrainedModel("ar", str(tmp_path / "init"), None).to_dict()]}
    ctx.outputs["pbm"] = stages.stage_pbm(ctx)
    ctx.outputs["swd"] = stages.stage_swd(ctx)
    models = trained_models(ctx.outputs)
    assert [(m.name, m.block_size) for m in models] == [
        ("ar", None), ("pbm_b2", 2), ("pbm_b4", 4), ("pbm_b8", 8), ("pbm_b16", 16), ("pbm_b32", 32),
        ("anchor_b4", 4), ("swd_kd_b16", 16), ("swd_kd_b32", 32), ("swd_ce_b32", 32)]
    assert all(m.log_dir and m.model_dir.endswith("final") for m in models[1:])
    by_name = {m.name: m for m in models}
    assert by_name["pbm_b16"].model_dir == ctx.outputs["pbm"]["b16_dir"]
    assert by_name["anchor_b4"].model_dir == ctx.outputs["swd"]["anchor_dir"]


def test_manifests_without_records_still_read(tmp_path):
    """A manifest written before stages recorded ``models`` gives the same records."""
    d = str(tmp_path)
    legacy = {
        "ar_init": {"model_dir": f"{d}/init"},
        "pbm": {"block_sizes": [4, 16], "b4_dir": f"{d}/b4", "b4_log": f"{d}/l4", "b16_dir": f"{d}/b16",
                "b16_log": f"{d}/l16"},
        "swd": {"anchor_block_size": 4, "anchor_dir": f"{d}/b4", "kd_b16_dir": f"{d}/kd", "kd_b16_log": f"{d}/lkd",
                "ce_b16_dir": f"{d}/ce", "ce_b16_log": f"{d}/lce", "teacher_cache_b16": f"{d}/cache"},
        "self_distill": {"block_size": 16, "model_dir": f"{d}/sd", "log_dir": f"{d}/lsd"},
    }
    assert trained_models(legacy) == [
        TrainedModel("ar", f"{d}/init", None), TrainedModel("pbm_b4", f"{d}/b4", 4, f"{d}/l4"),
        TrainedModel("pbm_b16", f"{d}/b16", 16, f"{d}/l16"), TrainedModel("swd_kd_b16", f"{d}/kd", 16, f"{d}/lkd"),
        TrainedModel("swd_ce_b16", f"{d}/ce", 16, f"{d}/lce"), TrainedModel("self_distill_b16", f"{d}/sd", 16, f"{d}/lsd")]
    record = TrainedModel("pbm_b4", f"{d}/b4", 4, None)
    assert TrainedModel.from_dict(record.to_dict()) == record
