"""The shipped recipe YAMLs parse with NeMo's loader, cover every stage through overrides and carry the published
settings."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from nemo_automodel_bard.recipes.common import load_recipe_config

ROOT = Path(__file__).resolve().parents[1] / "recipes"
BLOCKS = (2, 4, 8, 16, 32)
SIZES = ("qwen3_vl_2b", "qwen3_vl_4b", "qwen3_vl_8b")


def _load(path: Path, monkeypatch):
    monkeypatch.delenv("BARD_RUNS", raising=False)
    monkeypatch.delenv("BARD_TINY_RUNS", raising=False)
    monkeypatch.delenv("BARD_DATA", raising=False)
    return load_recipe_config(path)


def _recipe_class(cfg):
    module, name = str(cfg.get("recipe")).rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


def _load_with(path: Path, overrides: list[str], monkeypatch):
    monkeypatch.delenv("BARD_RUNS", raising=False)
    monkeypatch.delenv("BARD_TINY_RUNS", raising=False)
    monkeypatch.delenv("BARD_DATA", raising=False)
    return load_recipe_config(path, overrides)


@pytest.mark.parametrize("folder", ["tiny", *SIZES])
def test_one_recipe_per_stage_kind(folder):
    """At most three recipe YAMLs per model size: block sizes, initialisation and outputs are overrides."""
    names = sorted(p.name for p in (ROOT / folder).glob("*.yaml"))
    assert names == (["ar_pretrain.yaml", "pbm.yaml", "swd.yaml"] if folder == "tiny" else ["pbm.yaml", "swd.yaml"])


@pytest.mark.parametrize("folder", ["tiny", *SIZES])
def test_pbm_recipe_is_the_first_stage_and_takes_later_ones_as_overrides(folder, monkeypatch):
    runs = "runs/tiny" if folder == "tiny" else f"runs/{folder}"
    cfg = _load(ROOT / folder / "pbm.yaml", monkeypatch)
    assert _recipe_class(cfg).__name__ == "BardVLPBMRecipe"
    assert cfg.get("dataloader.collate_fn.block_size") == 2
    assert str(cfg.get("model.pretrained_model_name_or_path")) == f"{runs}/ar_init"
    assert str(cfg.get("checkpoint.checkpoint_dir")) == f"{runs}/pbm_b2"
    assert cfg.get("checkpoint.save_consolidated") == "final"
    assert cfg.get("bard.certainty_weight") == 0.0  # the PBM objective
    base = cfg.to_dict()
    for previous, block in zip(BLOCKS, BLOCKS[1:]):
        later = _load_with(ROOT / folder / "pbm.yaml", [
            f"--dataloader.collate_fn.block_size={block}",
            f"--model.pretrained_model_name_or_path={runs}/pbm_b{previous}/final",
            f"--checkpoint.checkpoint_dir={runs}/pbm_b{block}"], monkeypatch)
        assert later.get("dataloader.collate_fn.block_size") == block
        changed = later.to_dict()
        # everything else is the first stage's
        changed["dataloader"]["collate_fn"]["block_size"] = 2
        changed["model"]["pretrained_model_name_or_path"] = f"{runs}/ar_init"
        changed["checkpoint"]["checkpoint_dir"] = f"{runs}/pbm_b2"
        assert changed == base


@pytest.mark.parametrize("size", SIZES)
def test_real_size_templates_carry_the_published_hyperparameters(size, monkeypatch):
    cfg = _load(ROOT / size / "pbm.yaml", monkeypatch)
    assert cfg.get("optimizer.lr") == pytest.approx(2e-5)
    assert list(cfg.get("optimizer.betas")) == [0.9, 0.95]
    assert cfg.get("optimizer.weight_decay") == (0.01 if "8b" in size else 0.0)  # published 8B PBM: 0.01
    assert cfg.get("lr_scheduler.min_lr") == pytest.approx(1e-6)  # published: cosine to 0.05x
    assert cfg.get("processor.min_pixels") == 65536 and cfg.get("processor.max_pixels") == 4194304
    assert cfg.get("dataloader.collate_fn.max_length") == 8192
    groups = [dict(g.to_dict()) for g in cfg.get("optimizer.param_group_overrides")]
    assert groups[0]["lr_mult"] == 1.0 and "merger" in groups[0]["pattern"]  # merger: 2e-5
    assert groups[1]["lr_mult"] == pytest.approx(0.1)  # vision tower: 2e-6
    assert cfg.get("step_scheduler.global_batch_size") == 256
    assert cfg.get("lr_scheduler.lr_decay_style") == "cosine"
    assert cfg.get("clip_grad_norm.max_norm") == 1.0
    # fp32 master weights, bf16 compute (bf16 weights drop Adam steps smaller than their rounding)
    assert cfg.get("model.torch_dtype") == "float32"
    assert cfg.get("distributed.mp_policy.param_dtype") == "bfloat16"
    assert cfg.get("model.attn_implementation") == "flex_attention"
    assert cfg.get("distributed.strategy") == "fsdp2"
    assert cfg.get("dist_env.backend") == "nccl"
    assert str(cfg.get("dataset.path")) == "data/bard_vl/train.jsonl"
    assert str(cfg.get("dataset.image_root")) == "data/bard_vl"


def test_param_group_patterns_split_the_three_components():
    import re

    from nemo_automodel_bard.recipes.common import param_group_kind

    cfg = load_recipe_config(ROOT / "qwen3_vl_4b" / "pbm.yaml")
    patterns = [g.get("pattern") for g in cfg.get("optimizer.param_group_overrides")]

    def group(name: str) -> int:  # NeMo's rule: the first matching pattern wins, else group 0
        return next((i + 1 for i, p in enumerate(patterns) if re.search(p, name)), 0)

    names = {
        "model.language_model.layers.0.mlp.up_proj.weight": (0, "language"),
        "lm_head.weight": (0, "language"),
        "model.visual.merger.linear_fc1.weight": (1, "merger"),
        "model.visual.deepstack_merger_list.0.norm.weight": (1, "merger"),
        "model.visual.blocks.3.attn.qkv.weight": (2, "vision"),
        "model.visual.patch_embed.proj.weight": (2, "vision"),
        "model.visual.pos_embed.weight": (2, "vision"),
    }
    for name, (index, kind) in names.items():
        assert group(name) == index, name
        assert param_group_kind(name) == kind, name


def test_tiny_ar_pretrain_recipe(monkeypatch):
    cfg = _load(ROOT / "tiny" / "ar_pretrain.yaml", monkeypatch)
    assert _recipe_class(cfg).__name__ == "BardVLARPretrainRecipe"
    assert str(cfg.get("checkpoint.checkpoint_dir")) == "runs/tiny/ar"
    assert cfg.get("model.tiny") is not None


@pytest.mark.parametrize("size", SIZES)
def test_real_size_swd_templates_follow_the_published_distillation(size, monkeypatch):
    name = "swd.yaml"
    cfg = _load(ROOT / size / name, monkeypatch)
    assert cfg.get("step_scheduler.global_batch_size") == 64  # 1 x 8 accumulation x 8 GPUs
    assert cfg.get("optimizer.lr") == pytest.approx(6e-6)
    assert all(g.get("lr_mult") == 1.0 for g in cfg.get("optimizer.param_group_overrides"))  # one lr for all
    assert cfg.get("lr_scheduler.min_lr") == pytest.approx(3e-6) and cfg.get("step_scheduler.num_epochs") == 3
    assert cfg.get("processor.max_pixels") == 1048576
    assert cfg.get("dataloader.collate_fn.max_length") == 8192
    assert cfg.get("model.torch_dtype") == "float32" and cfg.get("distributed.mp_policy.param_dtype") == "bfloat16"
