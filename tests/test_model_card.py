"""The released model card's usage code runs unchanged (apart from model_id and media paths)."""

from __future__ import annotations

import pytest

from nemo_automodel_bard.demo import write_demo_image, write_demo_video


def _model_card(model_id: str, media: dict) -> tuple[list[str], object]:
    # --- the model card snippet, verbatim except model_id and the media item ---
    import torch
    from qwen_vl_utils import process_vision_info
    from transformers import AutoProcessor

    from nemo_automodel.components.models.bard_vl import BardVLForConditionalGeneration

    model = BardVLForConditionalGeneration.from_pretrained(model_id, dtype=torch.bfloat16, _attn_implementation="sdpa")
    processor = AutoProcessor.from_pretrained(model_id)
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": [media, {"type": "text", "text": "Describe this."}]},
    ]
    texts = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    image_inputs, video_inputs, video_kwargs = process_vision_info(
        messages, return_video_kwargs=True, return_video_metadata=True,
        image_patch_size=processor.image_processor.patch_size,
    )
    video_metadata = None
    if video_inputs is not None:
        video_metadata = [v[1] for v in video_inputs]
        video_inputs = [v[0] for v in video_inputs]
    batch = processor(text=[texts], images=image_inputs, videos=video_inputs, padding=False, return_tensors="pt",
                      video_metadata=video_metadata, **video_kwargs)
    ids = model.generate(batch, max_new_tokens=1024, block_size=16, denoising_steps=16, temperature=0.0,
                         top_k=0, top_p=1.0, remasking_strategy="low_confidence_dynamic",
                         confidence_threshold=0.5, return_step_stats=False)
    return processor.tokenizer.batch_decode(ids, skip_special_tokens=True), ids


@pytest.fixture(scope="module")
def answering_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny checkpoint nudged (a few optimiser steps) to answer with EOS, so 1024-token decoding stays short."""
    import torch

    from nemo_automodel_bard import BardVLForConditionalGeneration

    model = BardVLForConditionalGeneration.from_pretrained(tiny_model_dir, dtype=torch.float32)
    eos = model.config.eos_token_id
    optimizer = torch.optim.Adam(model.model.language_model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(25):
        ids = torch.randint(0, model.config.text_config.vocab_size, (4, 24), generator=g)
        loss = model(input_ids=ids, labels=torch.full_like(ids, eos)).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    out = tmp_path_factory.mktemp("answering") / "model"
    model.save_pretrained(out)
    from transformers import AutoProcessor

    AutoProcessor.from_pretrained(tiny_model_dir).save_pretrained(out)
    return out


@pytest.mark.parametrize("kind", ["image", "video"])
def test_model_card_snippet_runs(kind, answering_model_dir, tmp_path):
    import torch

    if kind == "image":
        media = {"type": "image", "image": str(write_demo_image(tmp_path / "x.png")), "min_pixels": 32 * 32,
                 "max_pixels": 128 * 128}
    else:
        media = {"type": "video", "video": str(write_demo_video(tmp_path / "x.mp4"))}
    texts, ids = _model_card(str(answering_model_dir), media)
    assert isinstance(ids, torch.Tensor) and ids.dtype == torch.long and ids.ndim == 2 and ids.shape[0] == 1
    assert 1 <= ids.shape[1] <= 16  # EOS in the first block of 16 stops decoding
    assert isinstance(texts, list) and len(texts) == 1 and isinstance(texts[0], str)
