"""AR init: a Qwen3-VL directory becomes a Bard-VL directory with unchanged weights (or one changed row)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from nemo_automodel_bard import BardVLConfig, BardVLForConditionalGeneration
from nemo_automodel_bard.data.chat_dataset import shapes_dataset
from nemo_automodel_bard.data.collator import BardVLCollator
from nemo_automodel_bard.objectives.block_diffusion import build_training_mask
from nemo_automodel_bard.recipes.ar_init import ARInitError, convert_ar_to_bard, main, ordinary_token_limit
from nemo_automodel_bard.fixtures.tiny import write_tiny_qwen3_vl

EMBED = "model.language_model.embed_tokens.weight"


@pytest.fixture(scope="module")
def ar_dir(tmp_path_factory):
    return write_tiny_qwen3_vl(tmp_path_factory.mktemp("ar") / "qwen3vl", seed=3)


@pytest.fixture(scope="module")
def bard_dir(ar_dir, tmp_path_factory):
    return convert_ar_to_bard(ar_dir, tmp_path_factory.mktemp("bard") / "init", block_size=4)


def _weights(path):
    out = {}
    for file in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(file)))
    return out


def _model_inputs(batch, mask):
    keys = ("input_ids", "position_ids", "pixel_values", "image_grid_thw", "mm_token_type_ids")
    return {**{k: batch[k] for k in keys if batch.get(k) is not None}, "attention_mask": mask, "use_cache": False}


def test_output_is_a_complete_bard_directory(ar_dir, bard_dir):
    config = json.loads((bard_dir / "config.json").read_text())
    assert config["model_type"] == "bard_vl"
    assert config["architectures"] == ["BardVLForConditionalGeneration"]
    assert config["text_config"]["model_type"] == "bard_vl_text"
    assert config["block_size"] == 4
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(bard_dir)
    assert config["mask_token_id"] == processor.tokenizer.convert_tokens_to_ids("<|mask|>")  # not the Qwen vocab
    assert processor.chat_template
    gen = json.loads((bard_dir / "generation_config.json").read_text())
    assert gen["block_size"] == 4 and gen["mask_token_id"] == config["mask_token_id"]
    assert gen["eos_token_id"] == processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    # the weights are copied byte for byte
    for file in ar_dir.glob("*.safetensors"):
        assert (bard_dir / file.name).read_bytes() == file.read_bytes()


def test_same_logits_as_the_ar_weights_under_the_same_mask(ar_dir, bard_dir):
    model = BardVLForConditionalGeneration.from_pretrained(bard_dir, dtype=torch.float32).eval()
    # the AR directory's own weights, run through BardVLForConditionalGeneration
    ar_config = json.loads((ar_dir / "config.json").read_text())
    reference = BardVLForConditionalGeneration(
        BardVLConfig.from_qwen3_vl(ar_config, block_size=4, mask_token_id=model.config.mask_token_id)
    ).eval()
    missing, unexpected = reference.load_state_dict(_weights(ar_dir), strict=False)
    assert set(missing) <= {"lm_head.weight"} and not unexpected
    reference.tie_weights()

    from transformers import AutoProcessor

    records = [shapes_dataset("train", size=2)[i] for i in range(2)]
    batch = BardVLCollator(processor=AutoProcessor.from_pretrained(bard_dir), block_size=4)(records)
    mask = build_training_mask(model, batch)
    with torch.no_grad():
        got = model(**_model_inputs(batch, mask)).logits
        want = reference(**_model_inputs(batch, mask)).logits
    assert torch.equal(got, want)


def test_bard_with_a_causal_mask_reproduces_the_ar_model(ar_dir, bard_dir):
    """The conversion changes no function: Bard-VL + causal additive mask == the AR Qwen3-VL."""
    from transformers import AutoProcessor, Qwen3VLForConditionalGeneration

    processor = AutoProcessor.from_pretrained(bard_dir)
    record = shapes_dataset("train", size=1)[0]
    prompt = processor.apply_chat_template(record["messages"], tokenize=False)
    inputs = processor(text=[prompt], images=[record["messages"][0]["content"][0]["image"]], return_tensors="pt")
    bard = BardVLForConditionalGeneration.from_pretrained(bard_dir, dtype=torch.float32).eval()
    ar = Qwen3VLForConditionalGeneration.from_pretrained(ar_dir, dtype=torch.float32, attn_implementation="sdpa").eval()
    ids = inputs["input_ids"]
    positions = bard.position_ids_for(ids, mm_token_type_ids=inputs["mm_token_type_ids"], image_grid_thw=inputs["image_grid_thw"])
    L = ids.shape[1]
    causal = torch.full((L, L), torch.finfo(torch.float32).min).triu(1)[None, None]
    media = {k: inputs[k] for k in ("pixel_values", "image_grid_thw", "mm_token_type_ids")}
    with torch.no_grad():
        got = bard(input_ids=ids, attention_mask=causal, position_ids=positions, **media).logits
        want = ar(input_ids=ids, attention_mask=torch.ones_like(ids), position_ids=positions, **media).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_mask_embedding_mean_changes_only_the_mask_row(ar_dir, tmp_path):
    out = convert_ar_to_bard(ar_dir, tmp_path / "mean", block_size=2, mask_embedding="mean")
    config = BardVLConfig.from_pretrained(out)
    before, after = _weights(ar_dir), _weights(out)
    assert before.keys() == after.keys()
    for key in before:
        if key != EMBED:
            assert torch.equal(before[key], after[key]), key
    mask = config.mask_token_id
    rows = torch.ones(before[EMBED].shape[0], dtype=torch.bool)
    rows[mask] = False
    assert torch.equal(before[EMBED][rows], after[EMBED][rows])
    from transformers import AutoTokenizer

    limit = ordinary_token_limit(config, AutoTokenizer.from_pretrained(out))
    assert limit == AutoTokenizer.from_pretrained(out).convert_tokens_to_ids("<|endoftext|>")
    torch.testing.assert_close(after[EMBED][mask], before[EMBED][:limit].mean(0))
    info = json.loads((out / "bard_vl_ar_init.json").read_text())
    assert info["mask_embedding"] == "mean" and info["changed_tensors"] == [EMBED]
    # the Bard model ties lm_head to the changed embedding
    model = BardVLForConditionalGeneration.from_pretrained(out)
    assert torch.equal(model.lm_head.weight[mask], after[EMBED][mask])


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _edit_config(path, edit):
    config = json.loads((path / "config.json").read_text())
    edit(config)
    (path / "config.json").write_text(json.dumps(config))


def test_refuses_a_non_qwen3_vl_config(ar_dir, tmp_path):
    src = _copy(ar_dir, tmp_path / "llama")
    _edit_config(src, lambda c: c.update(model_type="llama"))
    with pytest.raises(ARInitError, match=r"config\.json: model_type is 'llama'"):
        convert_ar_to_bard(src, tmp_path / "out")


def test_refuses_a_config_without_vision_config(ar_dir, tmp_path):
    src = _copy(ar_dir, tmp_path / "novision")
    _edit_config(src, lambda c: c.pop("vision_config"))
    with pytest.raises(ARInitError, match=r"config\.json: key 'vision_config' is missing"):
        convert_ar_to_bard(src, tmp_path / "out")


def test_refuses_weights_that_do_not_match_the_config(ar_dir, tmp_path):
    src = _copy(ar_dir, tmp_path / "shape")
    _edit_config(src, lambda c: c["text_config"].update(intermediate_size=c["text_config"]["intermediate_size"] * 2))
    with pytest.raises(ARInitError, match=r"model\.safetensors: tensor 'model\.language_model\.layers\.0\.mlp\.\w+\.weight' has shape"):
        convert_ar_to_bard(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_refuses_pickled_weights_without_loading_them(ar_dir, tmp_path):
    src = tmp_path / "pickled"
    src.mkdir()
    shutil.copy(ar_dir / "config.json", src / "config.json")
    (src / "pytorch_model.bin").write_bytes(b"not a pickle; must never be loaded")
    with pytest.raises(ARInitError, match="only pickled weights"):
        convert_ar_to_bard(src, tmp_path / "out")


def test_asks_for_a_mask_id_when_it_cannot_find_one(ar_dir, tmp_path):
    src = tmp_path / "notok"
    src.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(ar_dir / name, src / name)
    with pytest.raises(ARInitError, match="--mask-token-id"):
        convert_ar_to_bard(src, tmp_path / "out")
    out = convert_ar_to_bard(src, tmp_path / "out", mask_token_id=7)
    assert BardVLConfig.from_pretrained(out).mask_token_id == 7


def test_command_line(ar_dir, tmp_path, capsys):
    assert main([str(ar_dir), str(tmp_path / "cli"), "--block-size", "8"]) == 0
    assert BardVLConfig.from_pretrained(tmp_path / "cli").block_size == 8
    assert main([str(ar_dir), str(tmp_path / "cli")]) == 2  # not empty
    assert "exists and is not empty" in capsys.readouterr().err
    assert main([str(tmp_path / "missing"), str(tmp_path / "x")]) == 2
