"""transformers.pipeline("image-text-to-text") runs a Bard-VL directory: a plain prompt with an image, and chat messages."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def pipe(tiny_model_dir):
    from transformers import pipeline

    return pipeline("image-text-to-text", model=str(tiny_model_dir), dtype=torch.float32)


def test_pipeline_uses_our_classes(pipe):
    from nemo_automodel_bard import BardVLForConditionalGeneration, BardVLProcessor

    assert type(pipe.model) is BardVLForConditionalGeneration and type(pipe.processor) is BardVLProcessor


def test_pipeline_image_and_prompt_matches_generate(pipe, tmp_path):
    from PIL import Image

    from nemo_automodel_bard.demo import write_demo_image

    path = write_demo_image(tmp_path / "x.png")
    prompt = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>colour?<|im_end|>\n<|im_start|>assistant\n"
    out = pipe(images=str(path), text=prompt, max_new_tokens=8, return_full_text=False)
    assert isinstance(out, list) and len(out) == 1 and isinstance(out[0]["generated_text"], str)
    batch = pipe.processor(text=[prompt], images=[Image.open(path).convert("RGB")], return_tensors="pt")
    ids = pipe.model.generate(batch, max_new_tokens=8)
    assert out[0]["generated_text"] == pipe.processor.batch_decode(ids, skip_special_tokens=True)[0]


def test_pipeline_chat_messages(pipe, tmp_path):
    from nemo_automodel_bard.demo import write_demo_image

    path = write_demo_image(tmp_path / "x.png")
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": [{"type": "image", "image": str(path)}, {"type": "text", "text": "Describe."}]},
    ]
    out = pipe(text=messages, max_new_tokens=8)
    chat = out[0]["generated_text"]
    assert chat[:2] == messages and chat[-1]["role"] == "assistant" and isinstance(chat[-1]["content"], str)
