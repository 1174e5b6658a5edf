"""BardVLForConditionalGeneration: round trip, masks reaching attention, unshifted logits, errors."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from nemo_automodel_bard import BardVLForConditionalGeneration
from nemo_automodel_bard.models.bard_vl.modeling_bard_vl import FLEX_ATTENTION_NAME, check_attention_inputs


def _block_causal_mask(length: int, block: int, dtype=torch.float32) -> torch.Tensor:
    ids = torch.arange(length) // block
    visible = ids[None, :] <= ids[:, None]
    mask = torch.zeros(length, length, dtype=dtype).masked_fill(~visible, torch.finfo(dtype).min)
    return mask[None, None]


def _text_ids(model, length: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.image_token_id - 10, (1, length), generator=g)


def test_save_load_round_trip_gives_identical_logits(tiny_model, tmp_path):
    ids = _text_ids(tiny_model, 12)
    before = tiny_model(input_ids=ids).logits
    tiny_model.save_pretrained(tmp_path)
    keys = set(load_file(tmp_path / "model.safetensors"))
    assert "model.language_model.embed_tokens.weight" in keys
    assert any(k.startswith("model.visual.blocks.0.") for k in keys)
    again, info = BardVLForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.float32, output_loading_info=True)
    again.eval()
    assert again.lm_head.weight is again.model.language_model.embed_tokens.weight
    # the tied head is not in the file and must not be reported as missing (it is tied, not re-initialised)
    assert "lm_head.weight" not in keys and not info["missing_keys"] and not info["unexpected_keys"]
    torch.testing.assert_close(again(input_ids=ids).logits, before, rtol=0, atol=0)


def test_text_attention_is_bidirectional_without_a_mask(tiny_model):
    ids = _text_ids(tiny_model, 8)
    full = tiny_model(input_ids=ids).logits
    changed = ids.clone()
    changed[0, -1] = (changed[0, -1] + 1) % 100
    # a change at the last position moves the first position's logits: attention is not causal
    assert not torch.allclose(tiny_model(input_ids=changed).logits[0, 0], full[0, 0])


def test_block_causal_mask_reaches_attention_exactly(tiny_model):
    """A block-causal mask gives the logits of block-by-block decoding with a KV cache."""
    from transformers import DynamicCache

    block, length = 4, 12
    ids = _text_ids(tiny_model, length, seed=1)
    positions = torch.arange(length).view(1, 1, -1).expand(3, 1, -1)
    masked = tiny_model(input_ids=ids, attention_mask=_block_causal_mask(length, block), position_ids=positions).logits
    cache = DynamicCache(config=tiny_model.config.text_config)
    for start in range(0, length, block):
        end = start + block
        step = tiny_model(
            input_ids=ids[:, start:end], position_ids=positions[..., start:end], past_key_values=cache, use_cache=True
        ).logits
        torch.testing.assert_close(masked[:, start:end], step, rtol=1e-5, atol=1e-5)
    first_block_alone = tiny_model(input_ids=ids[:, :block], position_ids=positions[..., :block]).logits
    torch.testing.assert_close(masked[:, :block], first_block_alone, rtol=1e-5, atol=1e-5)
    unmasked = tiny_model(input_ids=ids, position_ids=positions).logits
    assert not torch.allclose(masked[:, :block], unmasked[:, :block], atol=1e-4)


def test_logits_positions_select_flat_rows_and_labels_are_unshifted(tiny_model):
    ids = torch.cat([_text_ids(tiny_model, 6, seed=2), _text_ids(tiny_model, 6, seed=3)])
    full = tiny_model(input_ids=ids).logits
    picked = torch.tensor([1, 7, 11])
    out = tiny_model(input_ids=ids, logits_positions=picked, labels=ids.view(-1)[picked])
    torch.testing.assert_close(out.logits, full.reshape(-1, full.shape[-1])[picked], rtol=1e-5, atol=1e-5)
    reference = torch.nn.functional.cross_entropy(out.logits.float(), ids.view(-1)[picked])
    torch.testing.assert_close(out.loss, reference)
    # labels over the whole row: logit i predicts token i (no shift)
    whole = tiny_model(input_ids=ids, labels=ids)
    torch.testing.assert_close(
        whole.loss, torch.nn.functional.cross_entropy(full.reshape(-1, full.shape[-1]), ids.view(-1)), rtol=1e-5, atol=1e-5
    )


def test_flex_forward_matches_sdpa_on_cpu(tiny_model_dir):
    from torch.nn.attention.flex_attention import create_block_mask

    sdpa = BardVLForConditionalGeneration.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    flex = BardVLForConditionalGeneration.from_pretrained(
        tiny_model_dir, dtype=torch.float32, attn_implementation="flex_attention"
    ).eval()
    assert flex.uses_flex_attention and flex.text_attn_implementation == FLEX_ATTENTION_NAME
    length, block = 12, 4
    ids = _text_ids(sdpa, length, seed=4)
    positions = torch.arange(length).view(1, 1, -1).expand(3, 1, -1)

    def mask_mod(b, h, q, kv):
        return kv // block <= q // block

    block_mask = create_block_mask(mask_mod, 1, None, length, length, device="cpu")
    with torch.no_grad():  # FlexAttention has no backward on CPU
        expected = sdpa(input_ids=ids, attention_mask=_block_causal_mask(length, block), position_ids=positions).logits
        got = flex(input_ids=ids, attention_mask=block_mask, position_ids=positions).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_unsupported_attention_inputs_are_refused(tiny_model_dir, tiny_model):
    from torch.nn.attention.flex_attention import create_block_mask

    dense = _block_causal_mask(8, 4)
    with pytest.raises(ValueError, match="cannot use attn_implementation='flash_attention_2'"):
        check_attention_inputs("flash_attention_2", dense)
    eager = BardVLForConditionalGeneration.from_pretrained(
        tiny_model_dir, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    ids = _text_ids(eager, 8)
    positions = torch.arange(8).view(1, 1, -1).expand(3, 1, -1)
    with pytest.raises(ValueError, match="eager attention adds the mask"):
        eager(input_ids=ids, attention_mask=dense == 0, position_ids=positions)
    # additive masks are fine with eager and agree with sdpa
    torch.testing.assert_close(
        eager(input_ids=ids, attention_mask=dense, position_ids=positions).logits,
        tiny_model(input_ids=ids, attention_mask=dense, position_ids=positions).logits,
        rtol=1e-4,
        atol=1e-4,
    )
    block_mask = create_block_mask(lambda b, h, q, kv: kv <= q, 1, None, 8, 8, device="cpu")
    with pytest.raises(ValueError, match="BlockMask was passed but attn_implementation='sdpa'"):
        tiny_model(input_ids=ids, attention_mask=block_mask, position_ids=positions)
    with pytest.raises(ValueError, match="position_ids are required"):
        tiny_model(inputs_embeds=torch.zeros(1, 8, tiny_model.config.text_config.hidden_size))


def test_image_forward_uses_vision_tower(tiny_model, tiny_processor):
    from PIL import Image

    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown?"}]}]
    text = tiny_processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    red = tiny_processor(text=[text], images=[Image.new("RGB", (96, 96), (220, 20, 20))], return_tensors="pt")
    blue = tiny_processor(text=[text], images=[Image.new("RGB", (96, 96), (20, 20, 220))], return_tensors="pt")
    assert int((red["input_ids"] == tiny_model.config.image_token_id).sum()) == 9  # 96x96 -> 3x3 merged tokens
    a, b = tiny_model(**red).logits, tiny_model(**blue).logits
    assert not torch.allclose(a, b)
