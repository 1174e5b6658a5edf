"""SWD recipe: runs, resumes exactly, never saves the teacher, refuses bad teachers; real-size YAMLs parse."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import QUICK_RECIPE, read_jsonl, read_weights

from nemo_automodel_bard.recipes.common import RecipeConfigError, load_recipe_config, run_recipe

ROOT = Path(__file__).resolve().parents[1]
SWD = ROOT / "recipes" / "tiny" / "swd.yaml"
QUICK = [*QUICK_RECIPE, "--dataloader.collate_fn.block_size=8"]
_weights, _jsonl = read_weights, read_jsonl


@pytest.fixture(scope="module")
def teacher_dir(tiny_model_dir, tmp_path_factory):
    """A different tiny model with the same tokenizer (the anchor)."""
    from nemo_automodel_bard.fixtures.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("teacher") / "anchor", seed=7, block_size=4)


def _common(student: Path, teacher: Path, steps: int) -> list[str]:
    return [
        f"--model.pretrained_model_name_or_path={student}",
        f"--teacher_model.pretrained_model_name_or_path={teacher}",
        f"--step_scheduler.max_steps={steps}",
        *QUICK,
    ]


def test_swd_resume_matches_uninterrupted_and_teacher_is_not_saved(tiny_model_dir, teacher_dir, tmp_path):
    common = _common(tiny_model_dir, teacher_dir, 4)
    full = run_recipe(SWD, [*common, f"--checkpoint.checkpoint_dir={tmp_path / 'a'}"])
    assert full.teacher_model is not None
    assert all(not p.requires_grad for p in full.teacher_model.parameters())
    assert all(p.grad is None for p in full.teacher_model.parameters())
    stopped = run_recipe(SWD, [*common, f"--checkpoint.checkpoint_dir={tmp_path / 'b'}", "--bard.stop_after_steps=2"])
    assert stopped.step_scheduler.step == 2
    checkpoint = tmp_path / "b" / "epoch_0_step_1"
    assert (checkpoint / "optim").is_dir()  # optimizer state is in the checkpoint
    saved = " ".join(p.name for p in checkpoint.rglob("*"))
    assert "teacher" not in saved
    run_recipe(SWD, [*common, f"--checkpoint.checkpoint_dir={tmp_path / 'b'}"])
    a, b = _weights(tmp_path / "a" / "final"), _weights(tmp_path / "b" / "final")
    student_keys = set(_weights(tiny_model_dir))
    assert set(a) == student_keys == set(b)  # the export is the student alone
    assert all(torch.equal(a[k], b[k]) for k in a)
    log_a, log_b = _jsonl(tmp_path / "a" / "training.jsonl"), _jsonl(tmp_path / "b" / "training.jsonl")
    assert [r["loss"] for r in log_a] == [r["loss"] for r in log_b]
    assert all(r["kd"] > 0 and r["teacher_block_size"] == 4 for r in log_a)
    config = json.loads((tmp_path / "a" / "final" / "config.json").read_text())
    assert config["block_size"] == 8
    # the anchor's weights are untouched
    assert all(torch.equal(v, _weights(teacher_dir)[k]) for k, v in _weights(teacher_dir).items())


def test_swd_kd_weight_zero_is_a_control_without_teacher(tiny_model_dir, teacher_dir, tmp_path):
    logs = []
    for name, teacher in (("c", teacher_dir), ("d", tmp_path / "no-such-anchor")):
        recipe = run_recipe(SWD, [*_common(tiny_model_dir, teacher, 2), "--bard.kd_weight=0",
                                  f"--checkpoint.checkpoint_dir={tmp_path / name}"])
        assert recipe.teacher_model is None and recipe.teacher_cache is None  # never loaded, never run
        logs.append(_jsonl(tmp_path / name / "training.jsonl"))
    assert [r["loss"] for r in logs[0]] == [r["loss"] for r in logs[1]]
    assert all("kd" not in r for r in logs[0])  # no KD term and nothing to measure it against
    bard = json.loads((tmp_path / "c" / "final" / "config.json").read_text())
    assert bard["block_size"] == 8


@pytest.mark.parametrize(
    "override, message",
    [
        ("--bard.teacher_block_size=8", "must be smaller than the student's block size"),
        ("--bard.kd_direction=sideways", "kd_direction must be 'forward' or 'reverse'"),
        ("--bard.kd_at_block_padding=sometimes", "kd_at_block_padding must be true or false"),
        ("--teacher_model.pretrained_model_name_or_path=/no/such/anchor", "does not exist"),
    ],
)
def test_swd_config_errors(tiny_model_dir, teacher_dir, tmp_path, override, message):
    with pytest.raises(RecipeConfigError, match=message):
        run_recipe(SWD, [*_common(tiny_model_dir, teacher_dir, 1), override,
                         f"--checkpoint.checkpoint_dir={tmp_path / 'x'}"])


def test_swd_refuses_a_teacher_with_another_tokenizer(tiny_model_dir, tmp_path):
    from nemo_automodel_bard.fixtures.tiny import build_tiny_tokenizer, write_tiny_checkpoint

    other = write_tiny_checkpoint(tmp_path / "other", seed=3)
    build_tiny_tokenizer(["a different corpus gives different merges"] * 3, vocab_size=300).save_pretrained(other)
    with pytest.raises(RecipeConfigError, match="teacher tokenizer .* differs"):
        run_recipe(SWD, [*_common(tiny_model_dir, other, 1), f"--checkpoint.checkpoint_dir={tmp_path / 'y'}"])


@pytest.mark.slow
def test_swd_two_process_gloo_run(tiny_model_dir, teacher_dir, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "-m", "nemo_automodel.cli.app", str(SWD), *_common(tiny_model_dir, teacher_dir, 2),
           f"--checkpoint.checkpoint_dir={tmp_path / 'np2'}"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    one = run_recipe(SWD, [*_common(tiny_model_dir, teacher_dir, 2), f"--checkpoint.checkpoint_dir={tmp_path / 'np1'}"])
    assert one is not None
    two_log, one_log = _jsonl(tmp_path / "np2" / "training.jsonl"), _jsonl(tmp_path / "np1" / "training.jsonl")
    assert [r["loss"] for r in two_log] == pytest.approx([r["loss"] for r in one_log], rel=1e-4)


@pytest.mark.parametrize("path", sorted((ROOT / "recipes").glob("qwen3_vl_*/swd*.yaml")))
def test_real_size_swd_templates_parse(path):
    cfg = load_recipe_config(path)
    assert cfg.get("recipe").endswith("BardVLSWDRecipe") if isinstance(cfg.get("recipe"), str) else True
    assert cfg.get("optimizer.lr") == pytest.approx(6e-6)
    assert cfg.get("step_scheduler.num_epochs") == 3
    assert cfg.get("lr_scheduler.lr_warmup_steps") == 100
    assert cfg.get("bard.teacher_block_size") == 4 and cfg.get("bard.kd_top_k") == 16
    assert cfg.get("bard.kd_weight") == 0.5 and cfg.get("bard.ce_weight") == 1.0
    assert "pbm_b4" in str(cfg.get("teacher_model.pretrained_model_name_or_path"))


def _offline_common(student: Path, teacher: Path, cache: Path, steps: int = 4) -> list[str]:
    """Two epochs of 2 steps (8 samples, micro-batches of 2, 2 per step) with a small validation set."""
    return [
        f"--model.pretrained_model_name_or_path={student}",
        f"--teacher_model.pretrained_model_name_or_path={teacher}",
        f"--step_scheduler.max_steps={steps}",
        f"--bard.teacher_cache={cache}",
        "--step_scheduler.global_batch_size=4",
        "--step_scheduler.local_batch_size=2",
        "--step_scheduler.ckpt_every_steps=100",
        "--step_scheduler.val_every_steps=2",
        "--dataset.size=8",
        "--validation_dataset.size=4",
        "--bard.progress_bar=false",
        "--dataloader.collate_fn.block_size=8",
    ]


def test_offline_teacher_cache_reproduces_the_online_teacher(tiny_model_dir, teacher_dir, tmp_path):
    from nemo_automodel_bard.recipes.swd_cache import build_cache_from_config

    cache = tmp_path / "cache"
    common = _offline_common(tiny_model_dir, teacher_dir, cache)
    build_cache_from_config(load_recipe_config(SWD, common), device="cpu")
    meta = json.loads((cache / "meta.json").read_text())
    assert meta["splits"]["train"]["epochs"] == [0, 1] and meta["splits"]["validation"]["epochs"] == [0]
    online = [c for c in common if not c.startswith("--bard.teacher_cache")]
    run_recipe(SWD, [*online, f"--checkpoint.checkpoint_dir={tmp_path / 'online'}"])
    # offline: the teacher is never loaded (its path may even be gone)
    offline = [c if not c.startswith("--teacher_model.") else "--teacher_model.pretrained_model_name_or_path=/gone"
               for c in common]
    runner = run_recipe(SWD, [*offline, f"--checkpoint.checkpoint_dir={tmp_path / 'offline'}"])
    assert runner.teacher_model is None and runner.teacher_cache is not None
    log_on, log_off = _jsonl(tmp_path / "online" / "training.jsonl"), _jsonl(tmp_path / "offline" / "training.jsonl")
    assert len(log_on) == len(log_off) == 4 and {r["epoch"] for r in log_off} == {0, 1}
    for a, b in zip(log_on, log_off):
        for key in ("loss", "kd", "teacher_accuracy", "teacher_agreement"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
    val_on, val_off = _jsonl(tmp_path / "online" / "validation.jsonl"), _jsonl(tmp_path / "offline" / "validation.jsonl")
    assert [r["val_loss"] for r in val_on] == pytest.approx([r["val_loss"] for r in val_off], rel=1e-4)
    w_on, w_off = _weights(tmp_path / "online" / "final"), _weights(tmp_path / "offline" / "final")
    assert all(torch.allclose(w_on[k], w_off[k], atol=1e-5) for k in w_on)


@pytest.mark.parametrize(
    "override, message",
    [
        ("--step_scheduler.max_steps=6", r"lacks training epochs \[2\]"),
        ("--bard.kd_top_k=8", "top_k: cache 16, run 8"),
        ("--dataloader.collate_fn.seed=3", r"'train' split was built with other collator settings \(seed\)"),
        ("--dataset.size=10", "built for 8 records, the run's data set has 10"),
        ("--dataset.seed=5", "built (for|from) other data"),
    ],
)
def test_offline_teacher_cache_refuses_another_run(tiny_model_dir, teacher_dir, tmp_path_factory, override, message):
    cache = tmp_path_factory.getbasetemp() / "refuse-cache"
    common = _offline_common(tiny_model_dir, teacher_dir, cache)
    if not (cache / "meta.json").exists():
        from nemo_automodel_bard.recipes.swd_cache import build_cache_from_config

        build_cache_from_config(load_recipe_config(SWD, common), device="cpu")
    out = tmp_path_factory.mktemp("refused")
    with pytest.raises(RecipeConfigError, match=message):
        run_recipe(SWD, [*common, override, f"--checkpoint.checkpoint_dir={out}"])


def test_teacher_cache_cli_usage_and_errors(tiny_model_dir, teacher_dir, capsys):
    from nemo_automodel_bard.recipes.swd_cache import main

    assert main([]) == 2 and "swd_cache" in capsys.readouterr().err
    common = [f"--model.pretrained_model_name_or_path={tiny_model_dir}",
              f"--teacher_model.pretrained_model_name_or_path={teacher_dir}"]
    assert main([str(SWD), *common]) == 1
    assert "set bard.teacher_cache" in capsys.readouterr().err
    assert main([str(SWD), *common[:1], f"--teacher_model.pretrained_model_name_or_path={ROOT}",
                 "--bard.teacher_cache=/tmp/unused-cache"]) == 1
    assert "teacher_model.pretrained_model_name_or_path" in capsys.readouterr().err  # not a model directory
