"""A tiny, real Bard-VL: config, byte-level tokenizer with Qwen special tokens, processor, weights.

Used by the tests and the embedded default pipeline (no model hub access is needed). The
tokenizer is byte-level BPE: any UTF-8 text encodes; merges are learned deterministically from a
corpus (by default the embedded shapes task) so task words become single tokens. Special tokens
come after the ordinary vocabulary, in Qwen's order, so "ordinary ids" are ``[0, first_special)``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import torch

from .configuration_bard_vl import DEFAULT_DECODING, BardVLConfig

SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<|mask|>",
)

# Our own Jinja chat template producing Qwen's chat format: <|im_start|>role\n...<|im_end|>\n with
# images/videos as <|vision_start|><|image_pad|><|vision_end|> (the processor expands the pad).
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "<|im_start|>{{ message['role'] }}{{ '\\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' or 'image' in item or 'image_url' in item -%}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{%- elif item['type'] == 'video' or 'video' in item -%}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{%- elif 'text' in item -%}{{ item['text'] }}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "<|im_end|>{{ '\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|im_start|>assistant{{ '\\n' }}{%- endif -%}"
)

_FALLBACK_CORPUS = (
    "You are a helpful assistant.",
    "Describe the image. The image shows a red circle, a blue square and a green triangle.",
    "List every shape in the image as color shape row column.",
    "How many shapes are there? There are 4 shapes.",
)


def default_corpus() -> list[str]:
    """Text the tiny tokenizer learns its merges from (the embedded shapes task when available)."""
    try:
        from nemo_automodel_bard.data.shapes import task_corpus

        return list(task_corpus()) + list(_FALLBACK_CORPUS)
    except ImportError:  # pragma: no cover - the data package ships with us
        return list(_FALLBACK_CORPUS)


def build_tiny_tokenizer(corpus: Iterable[str] | None = None, vocab_size: int = 512):
    """Byte-level BPE tokenizer with Qwen-style special tokens, a mask token and the chat template.

    Returns a ``PreTrainedTokenizerFast`` whose ordinary vocabulary has ``vocab_size`` entries
    (256 byte symbols plus learned merges) followed by :data:`SPECIAL_TOKENS`.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = list(corpus) if corpus is not None else default_corpus()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        mask_token="<|mask|>",
        padding_side="left",
        chat_template=CHAT_TEMPLATE,
    )
    return fast


def build_tiny_processor(tokenizer=None, image_size: int = 96, with_video: bool = True):
    """Bard-VL (Qwen3-VL) processor for the tiny model: patch 16, merge 2 (one LLM token per 32x32 pixels).

    A :class:`~.processing_bard_vl.BardVLProcessor`, so the saved ``processor_config.json`` names
    ``processor_class: BardVLProcessor`` and ``AutoProcessor`` loads our class.
    """
    from transformers import Qwen2VLImageProcessor

    from .processing_bard_vl import BardVLProcessor

    tokenizer = tokenizer if tokenizer is not None else build_tiny_tokenizer()
    size = {"shortest_edge": 32 * 32, "longest_edge": max(image_size, 256) ** 2}
    image_processor = Qwen2VLImageProcessor(
        patch_size=16,
        temporal_patch_size=2,
        merge_size=2,
        size=size,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    video_processor = None
    if with_video:
        try:
            from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

            video_processor = Qwen3VLVideoProcessor(
                patch_size=16,
                temporal_patch_size=2,
                merge_size=2,
                size={"shortest_edge": 32 * 32, "longest_edge": 16 * 256 * 256},
                image_mean=[0.5, 0.5, 0.5],
                image_std=[0.5, 0.5, 0.5],
            )
        except (ImportError, OSError):  # torchvision missing: image-only processor
            video_processor = None
    return BardVLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=CHAT_TEMPLATE,
    )


def tiny_config(
    tokenizer=None,
    *,
    hidden_size: int = 128,
    num_layers: int = 4,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    vision_hidden_size: int = 128,
    vision_depth: int = 2,
    block_size: int = 4,
) -> BardVLConfig:
    """Config of a tiny Qwen3-VL-shaped Bard-VL (~2M parameters) matching ``tokenizer``'s ids."""
    tokenizer = tokenizer if tokenizer is not None else build_tiny_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    head_dim = hidden_size // num_heads
    half = head_dim // 2
    t_sec = half - 2 * (half * 5 // 16)
    mrope = [t_sec, half * 5 // 16, half * 5 // 16]
    return BardVLConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=hidden_size,
            intermediate_size=2 * hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=num_kv_heads,
            head_dim=head_dim,
            max_position_embeddings=4096,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 5_000_000.0,
                "mrope_section": mrope,
                "mrope_interleaved": True,
            },
            eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"],
        ),
        vision_config=dict(
            depth=vision_depth,
            hidden_size=vision_hidden_size,
            intermediate_size=2 * vision_hidden_size,
            num_heads=4,
            out_hidden_size=hidden_size,
            patch_size=16,
            spatial_merge_size=2,
            temporal_patch_size=2,
            num_position_embeddings=256,
            deepstack_visual_indexes=[0],
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        mask_token_id=ids["<|mask|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
        tie_word_embeddings=True,
        block_size=block_size,
        architectures=["BardVLForConditionalGeneration"],
    )


def bard_generation_config(config: BardVLConfig, **overrides):
    """A ``GenerationConfig`` holding Bard decoding defaults (block size = the trained one)."""
    from transformers import GenerationConfig

    values = dict(DEFAULT_DECODING)
    values["block_size"] = config.block_size
    values["denoising_steps"] = config.block_size
    values.update(overrides)
    gen = GenerationConfig(
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        max_new_tokens=256,
        do_sample=False,
    )
    for key, value in values.items():
        setattr(gen, key, value)
    gen.mask_token_id = config.mask_token_id
    return gen


def write_tiny_checkpoint(out_dir: str | Path, *, seed: int = 0, block_size: int = 4, **config_kwargs) -> Path:
    """Write a complete Hugging Face directory for a tiny random Bard-VL and return its path.

    Contents: ``config.json``, ``model.safetensors``, ``generation_config.json`` (Bard decoding
    defaults), tokenizer files with the chat template, image and video processor configs.
    """
    from .modeling_bard_vl import BardVLForConditionalGeneration

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    processor = build_tiny_processor()
    config = tiny_config(processor.tokenizer, block_size=block_size, **config_kwargs)
    torch.manual_seed(seed)
    model = BardVLForConditionalGeneration(config)
    model.generation_config = bard_generation_config(config)
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    (out / "bard_vl_tiny.json").write_text(json.dumps({"seed": seed, "block_size": block_size}, indent=2))
    return out


__all__ = [
    "CHAT_TEMPLATE",
    "SPECIAL_TOKENS",
    "bard_generation_config",
    "build_tiny_processor",
    "build_tiny_tokenizer",
    "tiny_config",
    "write_tiny_checkpoint",
]
