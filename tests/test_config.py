"""BardVLConfig: published config.json files, plain Qwen3-VL configs, Bard fields and their errors."""

from __future__ import annotations

import json

import pytest
import torch

from nemo_automodel_bard import BardVLConfig, BardVLForConditionalGeneration
from nemo_automodel_bard.models.bard_vl import QWEN3_VL_MASK_TOKEN_ID
from nemo_automodel_bard.models.qwen3_vl_sizes import TEXT, VISION

TEXT_4B, VISION_4B = TEXT["4b"], VISION["4b"]  # the published Qwen3-VL-4B-Instruct towers (one owner)


def published_4b_config() -> dict:
    """A config.json shaped like the released Bard-VL-4B one (transformers-4.57 spelling)."""
    return {
        "architectures": ["BardVLForConditionalGeneration"],
        "model_type": "bard_vl",
        "image_token_id": 151655,
        "video_token_id": 151656,
        "vision_start_token_id": 151652,
        "vision_end_token_id": 151653,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.57.3",
        "text_config": {
            "model_type": "bard_vl_text",
            **{k: TEXT_4B[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                       "num_attention_heads", "num_key_value_heads", "head_dim")},
            "hidden_act": "silu",
            "max_position_embeddings": 262144,
            "rms_norm_eps": 1e-6,
            "rope_theta": 5000000,
            "rope_scaling": {"rope_type": "default", "mrope_section": [24, 20, 20], "mrope_interleaved": True},
            "tie_word_embeddings": True,
            "bos_token_id": 151643,
            "eos_token_id": 151645,
        },
        "vision_config": {
            "model_type": "bard_vl",
            **{k: VISION_4B[k] for k in ("depth", "hidden_size", "intermediate_size", "num_heads", "out_hidden_size",
                                         "patch_size", "spatial_merge_size", "temporal_patch_size",
                                         "num_position_embeddings", "deepstack_visual_indexes")},
            "hidden_act": "gelu_pytorch_tanh",
        },
    }


def test_published_4b_config_builds_the_qwen3_vl_module_tree(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(published_4b_config()))
    config = BardVLConfig.from_pretrained(tmp_path)
    assert config.model_type == "bard_vl" and config.text_config.model_type == "bard_vl_text"
    assert config.mask_token_id == QWEN3_VL_MASK_TOKEN_ID == 151671
    assert config.text_config.rope_parameters["mrope_section"] == [24, 20, 20]
    assert config.text_config.rope_parameters["rope_theta"] == 5000000
    with torch.device("meta"):
        model = BardVLForConditionalGeneration(config)
    text = model.model.language_model
    assert len(text.layers) == 36
    attn = text.layers[0].self_attn
    assert attn.q_proj.weight.shape == (32 * 128, 2560)
    assert attn.k_proj.weight.shape == (8 * 128, 2560)
    assert text.layers[0].mlp.gate_proj.weight.shape == (9728, 2560)
    assert len(model.model.visual.blocks) == 24
    assert model.model.visual.blocks[0].attn.qkv.weight.shape == (3 * 1024, 1024)
    assert len(model.model.visual.deepstack_merger_list) == 3
    assert model.lm_head.weight.shape == (151936, 2560)
    assert model.lm_head.weight is text.embed_tokens.weight  # tied for 2B/4B
    assert all(not layer.self_attn.is_causal for layer in text.layers)
    names = {name for name, _ in model.named_parameters()}
    assert "model.language_model.layers.0.self_attn.q_proj.weight" in names
    assert "model.visual.patch_embed.proj.weight" in names
    assert "model.visual.merger.linear_fc1.weight" in names


def test_plain_qwen3_vl_config_relabels_without_changing_sizes():
    from transformers import Qwen3VLConfig

    qwen = Qwen3VLConfig(
        text_config={"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                     "head_dim": 16, "intermediate_size": 128, "vocab_size": 200},
        vision_config={"depth": 1, "hidden_size": 32, "num_heads": 2, "out_hidden_size": 64, "intermediate_size": 64},
    )
    bard = BardVLConfig.from_qwen3_vl(qwen, mask_token_id=150, block_size=8)
    assert bard.model_type == "bard_vl" and bard.architectures == ["BardVLForConditionalGeneration"]
    assert bard.text_config.hidden_size == 64 and bard.vision_config.depth == 1
    assert bard.text_config.model_type == "bard_vl_text"
    assert (bard.mask_token_id, bard.block_size) == (150, 8)
    # a plain qwen3_vl dict loads too
    as_dict = qwen.to_dict()
    as_dict.pop("model_type")
    assert BardVLConfig(**{**as_dict, "mask_token_id": 10}).text_config.vocab_size == 200


def test_round_trip_keeps_bard_fields(tmp_path):
    config = BardVLConfig(mask_token_id=151671, block_size=16, legacy_clean_sees_noisy=True)
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "bard_vl" and saved["text_config"]["model_type"] == "bard_vl_text"
    again = BardVLConfig.from_pretrained(tmp_path)
    assert (again.mask_token_id, again.block_size, again.legacy_clean_sees_noisy) == (151671, 16, True)


def test_mask_token_outside_vocabulary_is_refused():
    with pytest.raises(ValueError, match="mask_token_id=200000 is outside the vocabulary"):
        BardVLConfig(mask_token_id=200000)


def test_bad_block_size_is_refused():
    with pytest.raises(ValueError, match="block_size must be a positive integer"):
        BardVLConfig(block_size=0)


def test_wrong_model_type_is_refused(tmp_path):
    with pytest.raises(ValueError, match="expected a Qwen3-VL config"):
        BardVLConfig.from_qwen3_vl({"model_type": "llama"})
    bad = published_4b_config()
    bad["text_config"]["model_type"] = "llama"
    with pytest.raises(ValueError, match="text_config.model_type is 'llama'"):
        BardVLConfig(**{k: v for k, v in bad.items() if k != "model_type"})
    with pytest.raises(TypeError, match="needs a BardVLConfig"):
        from transformers import Qwen3VLConfig

        BardVLForConditionalGeneration(Qwen3VLConfig())
