"""Run seeds, fresh data per stage, fingerprints that cover code and numerics, aggregation over seeds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import record_training
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import nemo_automodel_bard.pipeline.stages as stages
from nemo_automodel_bard.pipeline.aggregate import AggregateRuns, aggregate, find_runs, load_run, write_aggregate
from nemo_automodel_bard.pipeline.app import REPO_ROOT, config_dir, run_pipeline
from nemo_automodel_bard.pipeline.environment import (
    STREAM_STRIDE,
    code_digest,
    derive_seed,
    environment,
    pin_threads,
    stream_offset,
)
from nemo_automodel_bard.pipeline.manifest import Manifest


def _cfg(tmp_path: Path, overrides: list[str]) -> dict:
    with initialize_config_dir(config_dir=str(config_dir()), version_base=None):
        cfg = compose(config_name="config", overrides=[f"work_dir={tmp_path}", *overrides])
    plain = OmegaConf.to_container(cfg, resolve=True)
    plain.pop("hydra", None)
    return plain


def _ctx(tmp_path: Path, overrides: list[str]) -> stages.Context:
    return stages.Context(cfg=_cfg(tmp_path, overrides), work_dir=tmp_path, output_dir=tmp_path,
                          repo_root=REPO_ROOT, manifest=Manifest(tmp_path))


def test_default_config_pins_threads_and_names_the_seed_in_the_work_dir():
    with initialize_config_dir(config_dir=str(config_dir()), version_base=None):
        cfg = compose(config_name="config", overrides=["seed=2"])
    assert cfg.threads == 2 and cfg.work_dir == "runs/tiny-census/seed2" and cfg.data.train_size == "auto"


def test_streams_get_their_own_seeds_and_fresh_images(tmp_path):
    ctx = _ctx(tmp_path, ["ar_pretrain.max_steps=50"])
    recipe = ctx.recipe_dir / "pbm.yaml"
    a = stages._full_overrides(ctx, recipe, {"step_scheduler.max_steps": 30}, {}, "pbm_b4")
    b = stages._full_overrides(ctx, recipe, {"step_scheduler.max_steps": 30}, {}, "pbm_b8")
    assert a["dataset.size"] == 30 * 32  # as many images as the stage consumes: no epoch is repeated
    assert a["dataset.offset"] == stream_offset(0, "pbm_b4") and b["dataset.offset"] == stream_offset(0, "pbm_b8")
    assert abs(a["dataset.offset"] - b["dataset.offset"]) >= STREAM_STRIDE  # disjoint image ranges
    assert a["seed"] != b["seed"] and a["dataloader.collate_fn.seed"] != b["dataloader.collate_fn.seed"]
    assert a["seed"] == derive_seed(0, "pbm_b4")

    other = _ctx(tmp_path, ["seed=1"])
    c = stages._full_overrides(other, recipe, {"step_scheduler.max_steps": 30}, {}, "pbm_b4")
    assert c["dataset.offset"] != a["dataset.offset"] and c["seed"] != a["seed"]
    # the held-out set and the task do not depend on the run seed
    held = {k: v for k, v in a.items() if k.startswith("validation_dataset.") or k == "dataset.seed"}
    assert held == {k: v for k, v in c.items() if k.startswith("validation_dataset.") or k == "dataset.seed"}
    # a stage's own overrides win; a fixed pool keeps its size
    d = stages._full_overrides(_ctx(tmp_path, ["data.train_size=100"]), recipe, {}, {"seed": 7}, "pbm_b4")
    assert d["seed"] == 7 and d["dataset.size"] == 100


def test_ar_stage_seeds_initialisation_and_vision_warmup(tmp_path, monkeypatch):
    seen = {}

    def fake(ctx, name, recipe, overrides, extra, stream=None):
        seen[ctx.seed] = overrides
        return {"model_dir": "x", "log_dir": "y"}

    monkeypatch.setattr(stages, "_train", fake)
    for seed in (0, 1):
        stages.stage_ar_pretrain(_ctx(tmp_path, ["data=shapes", f"seed={seed}"]))
    assert seen[0]["model.init_seed"] != seen[1]["model.init_seed"]
    assert seen[0]["model.vision_warmup.seed"] != seen[1]["model.vision_warmup.seed"]
    assert seen[0]["model.vision_warmup.data_offset"] != seen[1]["model.vision_warmup.data_offset"]
    assert seen[0]["model.vision_warmup.data_seed"] == seen[1]["model.vision_warmup.data_seed"] == 0


def test_swd_student_and_control_see_the_same_stream(tmp_path, monkeypatch):
    runs = record_training(monkeypatch)
    ctx = _ctx(tmp_path, ["data=shapes", "swd.student_block_sizes=[16]", "swd.anchor_extra_steps=5",
                          "swd.control=true", "swd.student_init=null"])
    ctx.outputs["pbm"] = {"b4_dir": str(tmp_path / "b4"), "b16_dir": str(tmp_path / "b16")}
    stages.stage_swd(ctx)
    anchor, kd, control = runs
    assert kd["bard.kd_weight"] > 0 and control["bard.kd_weight"] == 0
    for key in ("seed", "dataloader.collate_fn.seed", "dataset.offset", "dataset.size"):
        assert kd[key] == control[key], key  # paired: same images, order and noise
        assert anchor[key] != kd[key], key  # the anchor's extra steps read other images


def test_default_swd_is_the_released_configuration(tmp_path, monkeypatch):
    """The main job: the teacher stage's B=4 model teaches; each student starts from its own PBM block size;
    every student has its no-KD control on the same stream; blocks are masked 10-50 % as published."""
    runs = record_training(monkeypatch)
    ctx = _ctx(tmp_path, [])
    ctx.outputs["pbm"] = {f"b{b}_dir": str(tmp_path / f"b{b}") for b in (4, 16, 32)}
    ctx.outputs["teacher"] = {"model_dir": str(tmp_path / "teacher_b4"), "block_size": 4}
    result = stages.stage_swd(ctx)
    inits = [(r["dataloader.collate_fn.block_size"], r["bard.kd_weight"] > 0, r["model.pretrained_model_name_or_path"])
             for r in runs]
    assert inits == [(16, True, str(tmp_path / "b16")), (16, False, str(tmp_path / "b16")),
                     (32, True, str(tmp_path / "b32")), (32, False, str(tmp_path / "b32"))]
    for r in runs:
        assert r["teacher_model.pretrained_model_name_or_path"] == str(tmp_path / "teacher_b4")
        assert r["bard.teacher_block_size"] == 4 and r["dataloader.collate_fn.level_range"] == [0.1, 0.5]
        assert (r["bard.kd_top_k"], r["bard.kd_direction"], r["bard.kd_temperature"]) == (16, "forward", 1.0)
        assert r["bard.ce_weight"] == 1.0 and r["bard.kd_weight"] in (0.0, 0.5)
    assert {"kd_b16_dir", "ce_b16_dir", "kd_b32_dir", "ce_b32_dir"} <= set(result)
    assert result["anchor_dir"] == str(tmp_path / "teacher_b4")
    ctx.outputs.pop("teacher")
    with pytest.raises(ValueError, match="swd.anchor=teacher needs the teacher stage"):
        stages.stage_swd(ctx)


def test_shapes_swd_students_start_from_the_named_pbm_exports_and_controls_follow_the_list(tmp_path, monkeypatch):
    runs = record_training(monkeypatch)
    ctx = _ctx(tmp_path, ["data=shapes"])  # students B=16 (from PBM B=32) and B=32, a control for B=32 only
    ctx.outputs["pbm"] = {f"b{b}_dir": str(tmp_path / f"b{b}") for b in (4, 16, 32)}
    result = stages.stage_swd(ctx)
    inits = [(r["dataloader.collate_fn.block_size"], r["bard.kd_weight"] > 0, r["model.pretrained_model_name_or_path"])
             for r in runs]
    assert inits == [(16, True, str(tmp_path / "b32")), (32, True, str(tmp_path / "b32")),
                     (32, False, str(tmp_path / "b32"))]
    assert all(r["teacher_model.pretrained_model_name_or_path"] == str(tmp_path / "b4") for r in runs)
    assert "kd_b16_dir" in result and "ce_b16_dir" not in result and "ce_b32_dir" in result
    # without student_init each student starts from its own block size
    runs.clear()
    other = tmp_path / "other"  # (same work_dir: the B=32 student would be reused, its fingerprint unchanged)
    other.mkdir()
    ctx = _ctx(other, ["data=shapes", "swd.student_init=null", "swd.control=false"])
    ctx.outputs["pbm"] = {f"b{b}_dir": str(tmp_path / f"b{b}") for b in (4, 16, 32)}
    stages.stage_swd(ctx)
    assert [r["model.pretrained_model_name_or_path"] for r in runs] == [str(tmp_path / "b16"), str(tmp_path / "b32")]


def test_training_fingerprint_covers_code_recipe_and_numerics(tmp_path, monkeypatch):
    ctx = _ctx(tmp_path, [])
    recipe = ctx.recipe_dir / "pbm.yaml"
    full = stages._full_overrides(ctx, recipe, {}, {}, "pbm_b4")
    key = stages._training_fingerprint(ctx, recipe, full)
    assert stages._training_fingerprint(ctx, recipe, full) == key
    monkeypatch.setattr(stages, "code_digest", lambda parts: "changed-code")
    assert stages._training_fingerprint(ctx, recipe, full) != key
    monkeypatch.undo()
    monkeypatch.setattr(stages, "numerics", lambda: {"threads": 99})
    assert stages._training_fingerprint(ctx, recipe, full) != key
    monkeypatch.undo()
    assert stages._training_fingerprint(ctx, recipe, {**full, "seed": full["seed"] + 1}) != key


def test_recipe_content_is_part_of_the_fingerprint(tmp_path):
    ctx = _ctx(tmp_path, [])
    recipe = ctx.recipe_dir / "pbm.yaml"
    full = stages._full_overrides(ctx, recipe, {}, {}, "pbm_b4")
    path = tmp_path / "recipe.yaml"
    path.write_text(recipe.read_text())
    before = stages._training_fingerprint(ctx, path, full)
    path.write_text(recipe.read_text().replace("lr: 5.0e-4", "lr: 4.0e-4"))
    assert stages._training_fingerprint(ctx, path, full) != before


def test_code_digest_and_environment():
    assert code_digest(("diffusion",)) == code_digest(("diffusion",)) != code_digest(("data",))
    env = environment()
    assert "+" not in str(env["nemo_automodel"])  # the installed version, not NeMo's git-decorated __version__
    for key in ("threads", "cpu_capability", "torch", "transformers", "nemo_automodel", "PIL", "commit",
                "training_code", "evaluation_code"):
        assert key in env, key
    import torch

    before = torch.get_num_threads()
    try:
        assert pin_threads(1) == 1 and torch.get_num_threads() == 1
        assert pin_threads(None) is None and torch.get_num_threads() == 1
        with pytest.raises(ValueError, match="threads"):
            pin_threads(0)
    finally:
        torch.set_num_threads(before)


def test_bad_seed_and_threads_fail_before_any_work(tmp_path):
    from nemo_automodel_bard.pipeline.validate import PipelineConfigError

    with initialize_config_dir(config_dir=str(config_dir()), version_base=None):
        for override, message in (("seed=-1", "seed must be a non-negative integer"),
                                  ("threads=0", "threads must be a positive integer"),
                                  ("data.train_size=0", "data.train_size must be a positive integer")):
            cfg = compose(config_name="config", overrides=[f"work_dir={tmp_path}", override])
            with pytest.raises(PipelineConfigError, match=message):
                run_pipeline(cfg)


def _fake_run(root: Path, seed: int, ar: float, b32: tuple[float, float], extra: list[str] = (), minutes=15.0,
              correct: list[bool] | None = None):
    run = root / f"seed={seed}"
    (run / "eval").mkdir(parents=True)
    (run / ".hydra").mkdir()
    (run / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in [f"seed={seed}", *extra]))
    (run / "summary.json").write_text(json.dumps({"seed": seed, "seconds_total": minutes * 60}))
    (run / "eval" / "ar.json").write_text(json.dumps(
        {"name": "ar", "mode": "ar", "threshold": None, "block_size": None, "accuracy": ar, "tokens_per_forward": 1.0}))
    (run / "eval" / "pbm_b32@0.9.json").write_text(json.dumps(
        {"name": "pbm_b32", "mode": "diffusion", "threshold": 0.9, "block_size": 32, "accuracy": b32[0],
         "tokens_per_forward": b32[1], "trajectory": {"big": [1] * 10},
         **({"correct": correct} if correct is not None else {})}))
    return run


def test_aggregate_over_seeds_means_spreads_and_targets(tmp_path):
    sweep = tmp_path / "multirun"
    _fake_run(sweep, 0, 0.96, (0.96, 11.0))
    _fake_run(sweep, 1, 0.98, (0.97, 12.0))
    _fake_run(sweep, 2, 0.97, (0.95, 10.0), minutes=21.0)
    runs = [load_run(p) for p in find_runs([sweep])]
    assert [r["seed"] for r in runs] == [0, 1, 2] and {r["group"] for r in runs} == {""}
    (group,) = aggregate(runs).values()
    rows = {r["name"]: r for r in group["table"]}
    assert rows["ar"]["accuracy"]["mean"] == pytest.approx(0.97)
    assert rows["ar"]["accuracy"]["spread"] == pytest.approx(0.02)
    assert rows["pbm_b32"]["tokens_per_forward"]["mean"] == pytest.approx(11.0)
    targets = {text.split(" ")[0] + text.split(" ")[1]: met for text, _, met in group["targets"]}
    assert targets["eachrun"] is False  # one run took 21 minutes
    assert targets["ARparent"] is True  # 97 % mean, spread 2 points
    assert targets["bestB=32"] is True  # 96 % >= 97 - 1 at 11 tokens/forward, spread 2

    report = write_aggregate([sweep], sweep)
    text = report.read_text()
    assert "| pbm_b32 | 32 | 0.9 | 3 | 96.0 |" in text and "96.0, 97.0, 95.0" in text
    assert json.loads((sweep / "aggregate.json").read_text())


def test_aggregate_groups_by_the_other_overrides_and_the_hydra_callback(tmp_path):
    sweep = tmp_path / "multirun"
    for seed in (0, 1):
        for cap in ("10", "100"):
            _fake_run(sweep / cap, seed, 0.9, (0.9, 10.0), extra=[f"pbm.cap={cap}"])
    runs = [load_run(p) for p in find_runs([sweep / "10", sweep / "100"])]
    assert set(aggregate(runs)) == {"pbm.cap=10", "pbm.cap=100"}
    AggregateRuns().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep / "10")}}}))
    assert (sweep / "10" / "aggregate.md").exists()


def test_cli_aggregate(tmp_path, capsys):
    from nemo_automodel_bard.cli import main

    _fake_run(tmp_path / "s", 0, 0.9, (0.9, 10.0))
    assert main(["aggregate", str(tmp_path / "s"), "--out", str(tmp_path / "agg")]) == 0
    assert (tmp_path / "agg" / "aggregate.md").exists()
    assert main(["aggregate", str(tmp_path / "nothing")]) == 2
    assert "not a directory" in capsys.readouterr().err


def test_objective_options_reach_every_pbm_stage_and_first_stage_overrides_only_the_first(tmp_path, monkeypatch):
    runs = record_training(monkeypatch)
    ctx = _ctx(tmp_path, ["pbm.block_sizes=[2,4]", "pbm.complementary=true", "pbm.max_loss_weight=10",
                          "+pbm.first_stage_overrides={optimizer.lr: 0.001}"])
    ctx.outputs["ar_init"] = {"model_dir": str(tmp_path / "init")}
    stages.stage_pbm(ctx)
    first, second = runs
    for run in runs:
        assert run["dataloader.collate_fn.complementary"] is True
        assert run["dataloader.collate_fn.max_loss_weight"] == 10.0
    assert first["optimizer.lr"] == 0.001 and "optimizer.lr" not in second
    plain = stages._objective_overrides({"complementary": False, "max_loss_weight": None}, 4)
    assert plain == {}  # published behaviour: nothing passed, fingerprints unchanged
    small = {"complementary": [2, 4, 8], "max_loss_weight": None}
    assert [stages._objective_overrides(small, b) for b in (4, 16)] == [{"dataloader.collate_fn.complementary": True}, {}]


def test_bad_objective_options_fail_before_any_work(tmp_path):
    from nemo_automodel_bard.pipeline.validate import PipelineConfigError

    with initialize_config_dir(config_dir=str(config_dir()), version_base=None):
        cfg = compose(config_name="config", overrides=[f"work_dir={tmp_path}", "pbm.max_loss_weight=-1"])
    with pytest.raises(PipelineConfigError, match="pbm.max_loss_weight must be a positive number"):
        run_pipeline(cfg)


def test_sign_test_and_paired_comparison_against_the_baseline(tmp_path):
    from nemo_automodel_bard.pipeline.aggregate import paired_comparisons, sign_test

    assert sign_test(0, 0) == 1.0 and sign_test(5, 5) == 1.0
    assert sign_test(10, 0) == pytest.approx(2 / 2**10) and sign_test(0, 10) == sign_test(10, 0)
    assert sign_test(7, 3) == pytest.approx(2 * sum(__import__("math").comb(10, i) for i in range(4)) / 2**10)
    base = [True, True, False, False, True]
    better = [True, True, True, True, True]
    for seed in (0, 1):
        _fake_run(tmp_path / "base", seed, 0.9, (0.6, 10.0), correct=base)
        _fake_run(tmp_path / "new", seed, 0.9, (1.0, 10.0), extra=["pbm.complementary=true"], correct=better)
    runs = [load_run(p) for p in find_runs([tmp_path / "base", tmp_path / "new"])]
    (c,) = paired_comparisons(runs)
    assert c["group"] == "pbm.complementary=true" and c["baseline"] == "" and c["name"] == "pbm_b32"
    assert (c["n"], c["wins"], c["losses"], c["seeds"]) == (10, 4, 0, [0, 1])
    assert c["baseline_accuracy"] == pytest.approx(0.6) and c["accuracy"] == 1.0
    assert c["p_value"] == pytest.approx(sign_test(4, 0))
    text = write_aggregate([tmp_path / "base", tmp_path / "new"], tmp_path).read_text()
    assert "| pbm.complementary=true | pbm_b32 | 0.9 | 10 | 60.0 | 100.0 | 4 | 0 |" in text


def test_paired_eval_pools_seeds_and_counts_discordant_records(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("paired_eval", REPO_ROOT / "benchmarks" / "paired_eval.py")
    paired_eval = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(paired_eval)

    def write(directory, correct, tpf):
        directory.mkdir(parents=True)
        (directory / "pbm_b32@0.9.json").write_text(json.dumps(
            {"correct": correct, "accuracy": sum(correct) / len(correct), "tokens_per_forward": tpf}))

    write(tmp_path / "b0", [1, 1, 0, 0], 10.0)
    write(tmp_path / "b1", [1, 0, 1, 1], 12.0)
    write(tmp_path / "n0", [1, 1, 1, 1], 11.0)
    write(tmp_path / "n1", [0, 1, 1, 1], 13.0)
    (row,) = paired_eval.compare([str(tmp_path / "b0"), str(tmp_path / "b1")], [str(tmp_path / "n0"), str(tmp_path / "n1")])
    assert (row["n"], row["won"], row["lost"]) == (8, 3, 1)
    assert row["base"] == [50.0, 75.0] and row["new"] == [100.0, 75.0]
    assert row["tpf_base"] == 11.0 and row["tpf_new"] == 12.0
    assert row["p"] == pytest.approx(0.625)
    assert "| pbm_b32@0.9 | 8 |" in paired_eval.render([row])
    # two models of the same runs
    for d, correct in (("b0", [1, 1, 1, 0]), ("b1", [1, 1, 1, 1])):
        (tmp_path / d / "self_distill_b32@0.9.json").write_text(json.dumps(
            {"correct": correct, "accuracy": sum(correct) / len(correct), "tokens_per_forward": 15.0}))
    dirs = [str(tmp_path / "b0"), str(tmp_path / "b1")]
    (row,) = paired_eval.compare(dirs, dirs, pair=("pbm_b32@0.9", "self_distill_b32@0.9"))
    assert row["model"] == "pbm_b32@0.9 -> self_distill_b32@0.9"
    assert (row["n"], row["won"], row["lost"]) == (8, 2, 0) and row["tpf_new"] == 15.0
    with pytest.raises(SystemExit, match="no result nothing@0.9"):
        paired_eval.compare(dirs, dirs, pair=("nothing@0.9", "pbm_b32@0.9"))
