"""The real-size rehearsal (nemo_automodel_bard.pipeline.rehearsal) and the one owner of the published Qwen3-VL
configurations (nemo_automodel_bard.models.qwen3_vl_sizes)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from nemo_automodel_bard.models import qwen3_vl_sizes as sizes

ROOT = Path(__file__).resolve().parents[1]

#: the published checkpoints' parameter counts (Qwen3-VL-2B/4B/8B-Instruct)
PUBLISHED_PARAMETERS = {"2b": 2_127_532_032, "4b": 4_437_815_808, "8b": 8_767_123_696}


@pytest.mark.parametrize("size", sizes.SIZES)
def test_published_configurations_build_the_published_models(size):
    from transformers import Qwen3VLForConditionalGeneration

    with torch.device("meta"):
        model = Qwen3VLForConditionalGeneration(sizes.qwen3_vl_config(size))
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED_PARAMETERS[size]
    assert sizes.parameter_count(size)["total"] == PUBLISHED_PARAMETERS[size]
    assert len(model.model.visual.deepstack_merger_list) == 3
    text = model.config.text_config
    assert text.vocab_size == 151_936 and text.head_dim == 128
    assert text.rope_parameters["mrope_section"] == [24, 20, 20]


def test_depth_cut_keeps_deepstack_mergers():
    assert sizes.deepstack_indexes("4b", 24) == [5, 11, 17]
    assert sizes.deepstack_indexes("4b", 12) == [9, 10, 11]  # three mergers kept, on the last layers
    assert sizes.deepstack_indexes("8b", 2) == [0, 1]
    assert sizes.vision_config("8b", 1)["deepstack_visual_indexes"] == [0]


def test_gpu_check_takes_its_widths_from_the_one_owner():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu_check

    config = gpu_check.stand_in_config(1, 1)
    assert config.text_config.hidden_size == sizes.TEXT["4b"]["hidden_size"] == 2560
    assert config.vision_config.out_hidden_size == 2560 and config.mask_token_id == sizes.MASK_TOKEN_ID


def test_a_held_out_set_gets_a_validation_loader_on_the_real_size_recipes():
    from nemo_automodel_bard.pipeline.stages import _validation_loader_overrides

    given = {"validation_dataset._target_": "nemo_automodel_bard.data.factory.make_dataset"}
    real = _validation_loader_overrides(ROOT / "recipes" / "qwen3_vl_4b" / "pbm.yaml", given)
    assert real == {"validation_dataloader._target_": "torchdata.stateful_dataloader.StatefulDataLoader",
                    "validation_dataloader.collate_fn._target_": "nemo_automodel_bard.recipes.collate.bard_collate_fn"}
    assert _validation_loader_overrides(ROOT / "recipes" / "tiny" / "pbm.yaml", given) == {}  # has its own
    assert _validation_loader_overrides(ROOT / "recipes" / "qwen3_vl_4b" / "pbm.yaml", {}) == {}


@pytest.mark.slow
def test_ci_sized_rehearsal_runs_every_stage_infer_and_serve(tmp_path):
    """Narrow towers, one layer each, rows of 256 tokens, one process: AR init -> PBM B=8 -> SWD (B=8 student,
    8B-shaped teacher with its own width) -> evaluation -> infer -> one served request, through the real-size
    recipe YAMLs, with the real vocabulary layout."""
    from nemo_automodel_bard.pipeline.rehearsal import main

    out = tmp_path / "rehearsal"
    code = main(["--ci", "--launcher", "local", "--size", "2b", "--text-layers", "1", "--vision-layers", "1",
                 "--length", "256", "--image-side", "128", "--block-sizes", "8", "--no-control",
                 "--max-new-tokens", "8", "--out", str(out)])
    result = json.loads((out / "rehearsal.json").read_text())
    assert code == 0 and result["passed"], (out / "rehearsal.log").read_text()[-3000:]
    assert [row["stage"] for row in result["stages"]] == ["pbm_b8", "swd_kd_b8"]
    for row in result["stages"]:
        assert row["steps"] == 2 and all(t > 0 for t in row["step_time_s"]) and row["peak_rss_rank0_gib"] > 0
        assert all(n <= 2 * 256 for n in row["tokens_per_step"])  # the 2B recipe's 2 rows of at most 256 tokens
    assert result["phases"]["serve"]["completion_tokens"] > 0 and result["phases"]["infer"]["returncode"] == 0
    assert set(result["evaluation"]) == {"pbm_b8@0.9", "swd_kd_b8@0.9"}
    # the stand-ins carry the published vocabulary layout and special ids
    student = Path(result["build"]["student_ar"])
    config = json.loads((student / "config.json").read_text())
    assert config["model_type"] == "qwen3_vl" and config["text_config"]["vocab_size"] == 151_936
    assert config["image_token_id"] == 151_655 and config["text_config"]["head_dim"] == 128
    tokenizer = json.loads((student / "tokenizer.json").read_text())
    added = {t["content"]: t["id"] for t in tokenizer["added_tokens"]}
    assert added["<|endoftext|>"] == 151_643 and added["<|im_end|>"] == 151_645 and added["</think>"] == 151_668
    anchor = json.loads((Path(result["build"]["anchor"]) / "config.json").read_text())
    assert anchor["block_size"] == 4 and anchor["mask_token_id"] == 151_671 and not anchor["tie_word_embeddings"]
