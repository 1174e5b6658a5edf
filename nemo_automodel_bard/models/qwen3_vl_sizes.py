"""The published configurations of Qwen3-VL-2B/4B/8B-Instruct, in one place.

The values are those of each checkpoint's ``config.json`` (text tower, vision tower, special-token ids). The
rehearsal (``nemo_automodel_bard.pipeline.rehearsal``), the GPU check (``benchmarks/gpu_check.py``), the forward-cost
benchmark (``benchmarks/gpu_forward_cost.py``) and the memory model (``benchmarks/memory_model.py``) build their
random-weight stand-ins from here, at the published widths and a depth of their choice.

Published shapes (text | vision):

=====  ======  =====  ======  =====  ====  ====  ======  =====  =====  ====  =========  ==========
size   hidden  MLP    layers  heads  KV    tied  hidden  MLP    depth  out   DeepStack  parameters
=====  ======  =====  ======  =====  ====  ====  ======  =====  =====  ====  =========  ==========
2B     2048    6144   28      16     8     yes   1024    4096   24     2048  5, 11, 17  2.1 B
4B     2560    9728   36      32     8     yes   1024    4096   24     2560  5, 11, 17  4.4 B
8B     4096    12288  36      32     8     no    1152    4304   27     4096  8, 16, 24  8.8 B
=====  ======  =====  ======  =====  ====  ====  ======  =====  =====  ====  =========  ==========

All three: head_dim 128, vocabulary 151,936 rows (151,643 ordinary tokens, specials from 151,643, the rest unused;
Bard-VL's MASK is the unused row 151,671), interleaved mRoPE sections [24, 20, 20] with theta 5e6, vision patch 16,
spatial merge 2, temporal patch 2, 2304 learned position embeddings, 16 vision heads.
"""

from __future__ import annotations

import copy
from typing import Any

SIZES = ("2b", "4b", "8b")

#: the Qwen3-VL vocabulary (config.json ``vocab_size``; the tokenizer has 151,669 entries, the rest are unused rows)
VOCAB_SIZE = 151_936
#: first special-token id: ids below it are ordinary (byte-level BPE) tokens
FIRST_SPECIAL_ID = 151_643
#: Qwen3-VL's special tokens in id order from :data:`FIRST_SPECIAL_ID` (151643 ... 151668)
SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>",
    "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>",
    "<think>", "</think>",
)
#: Bard-VL's MASK row (unused by the Qwen3-VL tokenizer; AR init picks it for a 151,936-row vocabulary)
MASK_TOKEN_ID = 151_671
#: the special ids a config carries (Instruct models: EOS ``<|im_end|>``, padding ``<|endoftext|>``)
SPECIAL_IDS = dict(image_token_id=151_655, video_token_id=151_656, vision_start_token_id=151_652,
                   vision_end_token_id=151_653, eos_token_id=151_645, pad_token_id=151_643)

_ROPE = {"rope_type": "default", "rope_theta": 5_000_000.0, "mrope_section": [24, 20, 20], "mrope_interleaved": True}
_TEXT_COMMON = dict(vocab_size=VOCAB_SIZE, head_dim=128, num_key_value_heads=8, hidden_act="silu",
                    max_position_embeddings=262_144, rms_norm_eps=1e-6, attention_bias=False, rope_parameters=_ROPE)
_VISION_COMMON = dict(patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=2304,
                      num_heads=16, hidden_act="gelu_pytorch_tanh", in_channels=3)

#: the text towers (``text_config``) of the published checkpoints
TEXT = {
    "2b": dict(_TEXT_COMMON, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16),
    "4b": dict(_TEXT_COMMON, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32),
    "8b": dict(_TEXT_COMMON, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32),
}
#: the vision towers (``vision_config``); ``out_hidden_size`` is the text width the mergers project to
VISION = {
    "2b": dict(_VISION_COMMON, depth=24, hidden_size=1024, intermediate_size=4096, out_hidden_size=2048,
               deepstack_visual_indexes=[5, 11, 17]),
    "4b": dict(_VISION_COMMON, depth=24, hidden_size=1024, intermediate_size=4096, out_hidden_size=2560,
               deepstack_visual_indexes=[5, 11, 17]),
    "8b": dict(_VISION_COMMON, depth=27, hidden_size=1152, intermediate_size=4304, out_hidden_size=4096,
               deepstack_visual_indexes=[8, 16, 24]),
}
#: whether the LM head shares the embedding matrix
TIED = {"2b": True, "4b": True, "8b": False}
#: hub ids of the published checkpoints
HUB_IDS = {size: f"Qwen/Qwen3-VL-{size.upper()}-Instruct" for size in SIZES}


def size_key(size: str) -> str:
    """``"4b"`` from ``"4b"``, ``"4B"``, ``"qwen3_vl_4b"`` or ``"Qwen/Qwen3-VL-4B-Instruct"``."""
    text = str(size).lower()
    for key in SIZES:
        if text in (key, f"qwen3_vl_{key}") or f"-{key}" in text:
            return key
    raise ValueError(f"unknown Qwen3-VL size {size!r}; one of {list(SIZES)}")


def deepstack_indexes(size: str, vision_layers: int) -> list[int]:
    """The DeepStack layers of a tower cut to ``vision_layers``: the published indexes that remain; when the cut
    drops some, as many of the last layers as fit (at least one), so the stand-in keeps DeepStack mergers."""
    published = VISION[size_key(size)]["deepstack_visual_indexes"]
    if vision_layers >= VISION[size_key(size)]["depth"]:
        return list(published)
    kept = [i for i in published if i < vision_layers]
    if len(kept) == len(published):
        return kept
    count = min(len(published), vision_layers)
    return list(range(vision_layers - count, vision_layers))


def text_config(size: str, layers: int | None = None) -> dict[str, Any]:
    """The published text tower of ``size`` (a fresh dict), at ``layers`` layers (``None``: full depth)."""
    out = copy.deepcopy(TEXT[size_key(size)])
    if layers is not None:
        out["num_hidden_layers"] = int(layers)
    out.update(eos_token_id=SPECIAL_IDS["eos_token_id"], pad_token_id=SPECIAL_IDS["pad_token_id"])
    return out


def vision_config(size: str, layers: int | None = None) -> dict[str, Any]:
    """The published vision tower of ``size`` (a fresh dict), at ``layers`` layers (``None``: full depth)."""
    out = copy.deepcopy(VISION[size_key(size)])
    if layers is not None:
        out["depth"] = int(layers)
        out["deepstack_visual_indexes"] = deepstack_indexes(size, int(layers))
    return out


def qwen3_vl_config(size: str, text_layers: int | None = None, vision_layers: int | None = None):
    """A plain autoregressive ``Qwen3VLConfig`` (``model_type: qwen3_vl``) with the published configuration."""
    from transformers import Qwen3VLConfig

    config = Qwen3VLConfig(text_config=text_config(size, text_layers), vision_config=vision_config(size, vision_layers),
                           tie_word_embeddings=TIED[size_key(size)], **SPECIAL_IDS)
    config.architectures = ["Qwen3VLForConditionalGeneration"]
    return config


def bard_vl_config(size: str, text_layers: int | None = None, vision_layers: int | None = None, *,
                   block_size: int = 32, **kwargs: Any):
    """A :class:`BardVLConfig` with the published configuration of ``size`` and MASK at :data:`MASK_TOKEN_ID`."""
    from nemo_automodel_bard.models.bard_vl.configuration_bard_vl import BardVLConfig

    return BardVLConfig(text_config=text_config(size, text_layers), vision_config=vision_config(size, vision_layers),
                        tie_word_embeddings=TIED[size_key(size)], mask_token_id=MASK_TOKEN_ID, block_size=block_size,
                        architectures=["BardVLForConditionalGeneration"], **SPECIAL_IDS, **kwargs)


def parameter_count(size: str, text_layers: int | None = None, vision_layers: int | None = None) -> dict[str, int]:
    """Parameters of the published model (or a depth-cut stand-in), by part, from the shapes alone (no weights):
    ``embedding``, ``lm_head`` (0 when tied), ``text_layer`` (one), ``vision_layer`` (one), ``vision_fixed``
    (patch and position embeddings, mergers), ``text`` / ``vision`` (all layers) and ``total``."""
    t, v = text_config(size, text_layers), vision_config(size, vision_layers)
    h, m, hd = t["hidden_size"], t["intermediate_size"], t["head_dim"]
    q, kv = t["num_attention_heads"] * hd, t["num_key_value_heads"] * hd
    text_layer = h * q + 2 * h * kv + q * h + 3 * h * m + 2 * h + 2 * hd  # projections, 2 norms, q/k norms
    vh, vm, patch = v["hidden_size"], v["intermediate_size"], v["patch_size"]
    vision_layer = 4 * vh * vh + 4 * vh + 2 * vh * vm + vm + vh + 4 * vh  # qkv+proj (biases), MLP (biases), 2 norms
    merged = vh * v["spatial_merge_size"] ** 2
    merger = merged * merged + merged + merged * v["out_hidden_size"] + v["out_hidden_size"]
    patch_embed = 3 * v["temporal_patch_size"] * patch * patch * vh + vh
    vision_fixed = (patch_embed + v["num_position_embeddings"] * vh + merger + 2 * vh
                    + len(v["deepstack_visual_indexes"]) * (merger + 2 * merged))
    embedding = VOCAB_SIZE * h
    lm_head = 0 if TIED[size_key(size)] else VOCAB_SIZE * h
    text = t["num_hidden_layers"] * text_layer + h
    vision = v["depth"] * vision_layer + vision_fixed
    return dict(embedding=embedding, lm_head=lm_head, text_layer=text_layer, vision_layer=vision_layer,
                vision_fixed=vision_fixed, text=text, vision=vision, total=embedding + lm_head + text + vision)


__all__ = ["FIRST_SPECIAL_ID", "HUB_IDS", "MASK_TOKEN_ID", "SIZES", "SPECIAL_IDS", "SPECIAL_TOKENS", "TEXT", "TIED",
           "VISION", "VOCAB_SIZE", "bard_vl_config", "deepstack_indexes", "parameter_count", "qwen3_vl_config",
           "size_key", "text_config", "vision_config"]
