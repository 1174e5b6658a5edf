"""Decoding with video input (qwen-vl-utils + decord) and the model-card helper for image and video."""

from __future__ import annotations

import pytest
from helpers import one_thread  # noqa: F401 - fixture
import torch

from nemo_automodel_bard.demo import model_card_generate, write_demo_image, write_demo_video


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    yield


@pytest.fixture(scope="module")
def video_path(tmp_path_factory):
    return write_demo_video(tmp_path_factory.mktemp("media") / "clip.mp4")


def _video_batch(processor, video_path):
    from qwen_vl_utils import process_vision_info

    messages = [{"role": "user", "content": [{"type": "video", "video": str(video_path)},
                                             {"type": "text", "text": "What moves?"}]}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    images, videos, video_kwargs = process_vision_info(
        messages, return_video_kwargs=True, return_video_metadata=True,
        image_patch_size=processor.image_processor.patch_size,
    )
    metadata = [v[1] for v in videos]
    videos = [v[0] for v in videos]
    return dict(processor(text=[text], images=images, videos=videos, video_metadata=metadata,
                          return_tensors="pt", **video_kwargs))


def test_video_prompt_decodes(tiny_model, tiny_processor, video_path):
    import decord  # noqa: F401 - qwen-vl-utils' video reader on this platform
    from qwen_vl_utils.vision_process import get_video_reader_backend

    assert get_video_reader_backend() == "decord"
    batch = _video_batch(tiny_processor, video_path)
    assert batch["pixel_values_videos"].ndim == 2 and batch["video_grid_thw"].shape == (1, 3)
    assert (batch["input_ids"] == tiny_model.config.video_token_id).sum() > 0
    kwargs = dict(max_new_tokens=16, block_size=4, denoising_steps=2, return_step_stats=True)
    fused, fs = tiny_model.generate(batch, **kwargs)
    separate, ss = tiny_model.generate(batch, fused_commit=False, fused_prefill=False, **kwargs)
    assert torch.equal(fused, separate)
    assert ss["forwards_total"] - fs["forwards_total"] == fs["num_blocks"]  # a commit per block and the prefill
    assert fused.shape[0] == 1 and 1 <= fused.shape[1] <= 16
    assert not bool((fused == tiny_model.config.mask_token_id).any())


@pytest.mark.parametrize("kind", ["image", "video"])
def test_model_card_helper(tiny_model_dir, tmp_path, video_path, kind):
    if kind == "image":
        item = {"type": "image", "image": str(write_demo_image(tmp_path / "demo.png"))}
    else:
        item = {"type": "video", "video": str(video_path)}
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": [item, {"type": "text", "text": f"Describe this {kind}."}]},
    ]
    text, (ids, stats) = model_card_generate(tiny_model_dir, messages, max_new_tokens=32, return_step_stats=True)
    assert isinstance(text, str)
    assert ids.ndim == 2 and ids.shape[0] == 1 and 1 <= ids.shape[1] <= 32
    assert stats["block_size"] == 16 and stats["remasking_strategy"] == "low_confidence_dynamic"
    assert stats["forwards_total"] == sum(stats["block_step_counts"])  # the prefill is block 0's first step
    assert stats["num_response_tokens"] == ids.shape[1]


def test_flex_attention_path_matches_sdpa(tiny_model_dir, tiny_model, tiny_processor):
    """The engine's BlockMask path (FlexAttention, here on CPU) gives the dense path's tokens."""
    from nemo_automodel_bard import BardVLForConditionalGeneration

    flex = BardVLForConditionalGeneration.from_pretrained(
        tiny_model_dir, dtype=torch.float32, attn_implementation="flex_attention"
    ).eval()
    assert flex.uses_flex_attention
    texts = [
        tiny_processor.apply_chat_template([{"role": "user", "content": c}], tokenize=False, add_generation_prompt=True)
        for c in ("Describe the picture in detail.", "Count.")
    ]
    batch = dict(tiny_processor(text=texts, padding=True, return_tensors="pt"))
    kwargs = dict(max_new_tokens=8, block_size=4, denoising_steps=1, remasking_strategy="low_confidence_static")
    assert torch.equal(flex.generate(batch, **kwargs), tiny_model.generate(batch, **kwargs))
    # the fused prefill's mask as a BlockMask gives the separate prefill's tokens
    assert torch.equal(flex.generate(batch, **kwargs), flex.generate(batch, fused_prefill=False, **kwargs))
