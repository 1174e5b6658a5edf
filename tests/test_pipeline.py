"""The bard-vl pipeline: config validation, a whole tiny chain, and a manifest that skips finished work."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from nemo_automodel_bard.pipeline.app import config_dir, run_pipeline
from nemo_automodel_bard.pipeline.validate import PipelineConfigError

SMOKE_OVERRIDES = [
    "data=shapes",  # the quick run: pre-trains its own AR model (the census main job: test_census_pipeline.py)
    "ar_pretrain.max_steps=4",
    "ar_pretrain.vision_warmup_steps=2",
    "pbm.block_sizes=[2,4,8]",
    "pbm.max_steps=2",
    "pbm.first_stage_steps=3",
    "pbm.block_steps=null",
    "swd.student_block_sizes=[8]",
    "swd.control=true",
    "swd.teacher_block_size=4",
    "swd.anchor_extra_steps=2",
    "swd.max_steps=2",
    "evaluate.num_samples=4",
    "evaluate.batch_size=4",
    "evaluate.max_new_tokens=16",
    "evaluate.thresholds=[0.9]",
    "data.train_size=64",
]


def _config(tmp_path: Path, overrides: list[str]):
    with initialize_config_dir(config_dir=str(config_dir()), version_base=None):
        return compose(config_name="config", overrides=[f"work_dir={tmp_path}", *overrides])


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["stages=[ar_init,bogus]"], "unknown stage"),
        (["pbm.block_sizes=[4,2,8]"], "strictly increasing"),
        (["swd.anchor=fixed", "swd.teacher_block_size=16", "swd.student_block_sizes=[8]", "pbm.block_sizes=[2,4,8,16]"],
         "must be smaller than the student's"),
        (["model.init=/no/such/checkpoint"], "does not exist"),
        (["stages=[pbm]"], "needs the outputs of 'ar_init'"),
        (["data=jsonl"], "data.path is required"),
        (["pbm.max_steps=[10,10]"], r"2 entries for 5 block sizes"),
        (["pbm.max_steps=[10,10,0,10,10]"], r"pbm.max_steps\[\] must be a positive integer"),
        (["pbm.first_stage_steps=0"], r"pbm.first_stage_steps must be a positive integer"),
        (["data=shapes", "data.order=sorted"], r"data.order must be one of \('reading', 'random', 'subset'\)"),
        (["swd.anchor=fixed", "swd.anchor_path=/no/such/anchor"], r"swd.anchor_path: /no/such/anchor is not an exported model directory"),
        (["evaluate.device=gpu0"], r"evaluate.device: 'gpu0' is not a device"),
        (["+swd.student_init={32: 64}"], r"swd.student_init: the B=32 student cannot start from B=64: no PBM stage"),
        (["swd.control=[yes]"], r"swd.control must be true, false or a list of student block sizes, got \['yes'\]"),
    ],
)
def test_inconsistent_configs_fail_before_any_work(tmp_path, overrides, message):
    cfg = _config(tmp_path, overrides)
    with pytest.raises(PipelineConfigError, match=message):
        run_pipeline(cfg)
    assert not (tmp_path / "manifest.json").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_evaluation_is_refused_without_a_gpu(tmp_path):
    from nemo_automodel_bard.pipeline.evaluate import resolve_device

    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(PipelineConfigError, match="evaluate.device: 'cuda' asks for CUDA"):
        run_pipeline(_config(tmp_path, ["evaluate.device=cuda"]))


@pytest.mark.slow
def test_cli_reports_config_errors_cleanly(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "nemo_automodel_bard.cli", f"work_dir={tmp_path}", "pbm.block_sizes=[8,4]"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 2
    assert "configuration error: pbm.block_sizes must be strictly increasing" in result.stderr


@pytest.mark.slow
def test_whole_tiny_chain_and_manifest_skip(tmp_path, monkeypatch):
    cfg = _config(tmp_path, SMOKE_OVERRIDES)
    outputs = run_pipeline(cfg, tmp_path)
    for stage in ("ar_pretrain", "ar_init", "pbm", "swd", "evaluate", "report"):
        assert stage in outputs, stage
    assert (Path(outputs["ar_init"]["model_dir"]) / "config.json").exists()
    for block, steps in ((2, 3), (4, 2), (8, 2)):
        config = json.loads((Path(outputs["pbm"][f"b{block}_dir"]) / "config.json").read_text())
        assert config["block_size"] == block and config["model_type"] == "bard_vl"
        log = Path(outputs["pbm"][f"b{block}_log"]) / "training.jsonl"
        assert [json.loads(line)["step"] for line in log.read_text().splitlines()][-1] == steps - 1
    for key in ("kd_b8_dir", "ce_b8_dir", "anchor_dir"):
        assert (Path(outputs["swd"][key]) / "config.json").exists()
        assert list(Path(outputs["swd"][key]).glob("*.safetensors"))
    results = [json.loads(Path(e["result_file"]).read_text()) for e in outputs["evaluate"]["entries"]]
    names = {r["name"] for r in results}
    assert {"ar", "pbm_b2", "pbm_b8", "swd_kd_b8", "swd_ce_b8"} <= names
    for r in results:
        assert 0.0 <= r["accuracy"] <= 1.0 and r["tokens_per_forward"] > 0 and r["n"] == 4
    report = Path(outputs["report"]["report_file"])
    assert report.exists() and "| model |" in report.read_text()
    assert (tmp_path / "accuracy_vs_tokens_per_forward.png").exists()
    assert (tmp_path / "loss_curves.png").exists()

    # the same command again: every stage is found in the manifest, nothing is trained or decoded
    import nemo_automodel_bard.pipeline.evaluate as evaluate
    import nemo_automodel_bard.pipeline.stages as stages

    def refuse(*args, **kwargs):
        raise AssertionError("a finished stage ran again")

    monkeypatch.setattr(stages, "run_recipe", refuse)
    monkeypatch.setattr(evaluate, "evaluate_model", refuse)
    again = run_pipeline(_config(tmp_path, SMOKE_OVERRIDES), tmp_path)
    assert again["pbm"] == outputs["pbm"] and again["swd"] == outputs["swd"]

    # a moved work directory keeps every finished stage: paths inside it are stored relative to it
    import shutil

    moved = tmp_path.parent / f"{tmp_path.name}-moved"
    shutil.copytree(tmp_path, moved, symlinks=True)
    assert "{work_dir}" in (moved / "manifest.json").read_text()
    relocated = run_pipeline(_config(moved, SMOKE_OVERRIDES), moved)
    assert relocated["pbm"]["b8_dir"] == outputs["pbm"]["b8_dir"].replace(str(tmp_path.resolve()), str(moved.resolve()))
    assert Path(relocated["pbm"]["b8_dir"]).is_dir()

    # a KD sweep retrains the distilled student only: the no-KD control does not depend on KD settings
    trained = []

    def fake_training(yaml_path, overrides, launcher, log_file):
        trained.append(overrides["bard.kd_weight"])
        final = Path(overrides["checkpoint.checkpoint_dir"]) / "final"
        final.mkdir(parents=True)
        (final / "config.json").write_text("{}")

    monkeypatch.setattr(stages, "run_recipe", fake_training)
    sweep = _config(tmp_path, [*SMOKE_OVERRIDES, "swd.direction=reverse", "swd.temperature=2.0",
                               "stages=[swd]"])
    swept = run_pipeline(sweep, tmp_path)
    assert trained == [0.5]
    assert swept["swd"]["ce_b8_dir"] == outputs["swd"]["ce_b8_dir"]
    assert swept["swd"]["kd_b8_dir"] != outputs["swd"]["kd_b8_dir"]

    # an anchor trained elsewhere (swd.anchor_path) teaches every student as it is: no anchor stage runs
    external = outputs["pbm"]["b2_dir"]
    teachers = []

    def record_teacher(yaml_path, overrides, launcher, log_file):
        teachers.append(overrides["teacher_model.pretrained_model_name_or_path"])  # KeyError for a PBM run
        fake_training(yaml_path, overrides, launcher, log_file)

    monkeypatch.setattr(stages, "run_recipe", record_teacher)
    other = run_pipeline(_config(tmp_path, [*SMOKE_OVERRIDES, f"swd.anchor_path={external}", "stages=[swd]"]), tmp_path)
    assert other["swd"]["anchor_dir"] == str(Path(external).resolve())
    assert teachers == [str(Path(external).resolve())] * 2  # the KD student and its control

    # offline teacher (swd.teacher_cache): the anchor's top-k is cached once per student and reused by a
    # KD sweep; the no-KD control keeps its run
    runs = []

    def record_cache(yaml_path, overrides, launcher, log_file):
        runs.append((overrides["bard.kd_weight"], overrides.get("bard.teacher_cache")))
        fake_training(yaml_path, overrides, launcher, log_file)

    monkeypatch.setattr(stages, "run_recipe", record_cache)
    with_external = [*SMOKE_OVERRIDES, f"swd.anchor_path={external}", "swd.teacher_cache=true", "stages=[swd]"]
    offline = run_pipeline(_config(tmp_path, with_external), tmp_path)
    cache = offline["swd"]["teacher_cache_b8"]
    meta = json.loads((Path(cache) / "meta.json").read_text())
    assert meta["teacher"] == str(Path(external).resolve()) and meta["splits"]["train"]["num_samples"] == 64
    assert runs == [(0.5, cache)] and offline["swd"]["ce_b8_dir"] == other["swd"]["ce_b8_dir"]
    import nemo_automodel_bard.recipes.swd_cache as swd_cache

    monkeypatch.setattr(swd_cache, "build_cache_from_config", refuse)
    swept = run_pipeline(_config(tmp_path, [*with_external, "swd.kd_weight=0.25"]), tmp_path)
    assert runs[-1] == (0.25, cache) and swept["swd"]["teacher_cache_b8"] == cache


def test_torchrun_splits_the_tiny_micro_batch_over_ranks():
    from nemo_automodel_bard.pipeline.stages import _batch_overrides, _world_size

    yaml_path = Path(config_dir()).parent / "recipes" / "tiny" / "pbm.yaml"
    assert _world_size({"kind": "local"}) == 1
    assert _world_size({"kind": "torchrun", "nproc_per_node": 2, "nnodes": 1}) == 2
    assert _batch_overrides(yaml_path, 1, {}) == {}
    assert _batch_overrides(yaml_path, 2, {}) == {"step_scheduler.local_batch_size": 16}
    assert _batch_overrides(yaml_path, 2, {"step_scheduler.local_batch_size": 4}) == {}  # the user's choice wins
    with pytest.raises(ValueError, match="does not split over 3 ranks"):
        _batch_overrides(yaml_path, 3, {})


def test_pbm_steps_per_block_size():
    from nemo_automodel_bard.pipeline.stages import pbm_steps

    assert pbm_steps({"block_sizes": [2, 4, 8], "max_steps": 5}) == [5, 5, 5]
    assert pbm_steps({"block_sizes": [2, 4, 8], "max_steps": 5, "first_stage_steps": 9}) == [9, 5, 5]
    assert pbm_steps({"block_sizes": [2, 4], "max_steps": [7, 3], "first_stage_steps": 9}) == [7, 3]
    # block_steps names steps for some block sizes (the tiny default: B=4 and B=8 train 200); others are ignored
    section = {"block_sizes": [2, 4, 8, 16], "max_steps": 300, "first_stage_steps": 400, "block_steps": {4: 200, 64: 9}}
    assert pbm_steps(section) == [400, 200, 300, 300]
    with pytest.raises(ValueError, match="1 entries for 2 block sizes"):
        pbm_steps({"block_sizes": [2, 4], "max_steps": [7]})


def test_shapes_answer_order_reaches_training_and_evaluation():
    from nemo_automodel_bard.data.shapes import ShapesTask
    from nemo_automodel_bard.pipeline.evaluate import _score, heldout_records
    from nemo_automodel_bard.pipeline.stages import _data_overrides, _validation_overrides

    random_order = {"data": {"kind": "shapes", "seed": 0, "train_size": 10, "order": "random"}}
    assert _data_overrides(random_order)["dataset.order"] == "random"
    assert _validation_overrides(random_order)["validation_dataset.order"] == "random"
    reading = {"data": {"kind": "shapes", "seed": 0, "train_size": 10, "order": "reading"}}
    assert "dataset.order" not in _data_overrides(reading)  # reading-order runs keep their fingerprints
    records = heldout_records(random_order["data"], 3)
    task = ShapesTask(seed=0, order="random")
    assert [r.reference for r in records] == [task.sample("heldout", i).answer for i in range(3)]
    in_reading_order = [ShapesTask(seed=0).sample("heldout", i).answer for i in range(3)]
    refs = [r.reference for r in records]
    assert _score("shapes", in_reading_order, refs, order="random")["accuracy"] == 1.0
    assert _score("shapes", in_reading_order, refs)["accuracy"] < 1.0


def test_subset_evaluation_scores_against_the_whole_layout():
    from nemo_automodel_bard.data.shapes import ShapesTask, format_answer
    from nemo_automodel_bard.pipeline.evaluate import _score, heldout_records
    from nemo_automodel_bard.pipeline.stages import _data_overrides

    data = {"kind": "shapes", "seed": 0, "train_size": 10, "order": "subset"}
    assert _data_overrides({"data": data})["dataset.order"] == "subset"
    records = heldout_records(data, 4)
    task, subset = ShapesTask(seed=0), ShapesTask(seed=0, order="subset")
    assert [r.reference for r in records] == [format_answer(task.layout("heldout", i)) for i in range(4)]
    assert [r.messages[0]["content"][-1]["text"] for r in records] == [subset.sample("heldout", i).prompt
                                                                      for i in range(4)]
    gold = [subset.sample("heldout", i).answer for i in range(4)]
    assert _score("shapes", gold, [r.reference for r in records], order="subset")["accuracy"] == 1.0
    whole = [r.reference for r in records]  # listing every object is not a subset answer
    assert _score("shapes", whole, [r.reference for r in records], order="subset")["accuracy"] == 0.0
