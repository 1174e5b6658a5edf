"""The released model card's Inference Example runs verbatim (only ``model_id`` and the media item changed).

``CARD_EXAMPLE`` is the card's code block copied character for character. The test substitutes the model
id (a tiny local checkpoint) and the image path -- or, for video, the image message item by a video item in
the published inference script's format, as the card itself says to do -- and executes the result.
"""

from __future__ import annotations

import contextlib
import io

import pytest

from nemo_automodel_bard.demo import write_demo_image, write_demo_video

CARD_EXAMPLE = '''import torch
from transformers import AutoProcessor

from qwen_vl_utils import process_vision_info
from nemo_automodel.components.models.bard_vl import BardVLForConditionalGeneration

model_id = "fudan-generative-ai/Bard-VL-B16-Mask-4B-Distil-Instruct"
device = "cuda" if torch.cuda.is_available() else "cpu"

model = BardVLForConditionalGeneration.from_pretrained(
model_id,
dtype=torch.bfloat16,
_attn_implementation="sdpa",
).to(device).eval()
processor = AutoProcessor.from_pretrained(model_id)

messages = [
{
"role": "system",
"content": "You are a helpful assistant.",
},
{
"role": "user",
"content": [
{"type": "image", "image": "assets/puzzle.jpg", "min_pixels": 256 * 256, "max_pixels": 2048 * 2048},
{"type": "text", "text": "Please describe this image."},
],
},
]

text = processor.apply_chat_template(
messages,
tokenize=False,
add_generation_prompt=True,
)

image_inputs, video_inputs, video_kwargs = process_vision_info(
messages,
return_video_kwargs=True,
return_video_metadata=False,
image_patch_size=processor.image_processor.patch_size,
)

batch = processor(
text=[text],
images=image_inputs,
videos=video_inputs,
padding=False,
return_tensors="pt",
**video_kwargs,
).to(device)

response_ids = model.generate(
batch,
max_new_tokens=1024,
block_size=16,
denoising_steps=16,
temperature=0.0,
top_k=0,
top_p=1.0,
remasking_strategy="low_confidence_dynamic",
confidence_threshold=0.5,
return_step_stats=False,
)

print(processor.tokenizer.batch_decode(response_ids, skip_special_tokens=True)[0].strip())
'''

CARD_MODEL_ID = '"fudan-generative-ai/Bard-VL-B16-Mask-4B-Distil-Instruct"'
CARD_IMAGE_PATH = '"assets/puzzle.jpg"'
CARD_IMAGE_ITEM = (
    '{"type": "image", "image": "assets/puzzle.jpg", "min_pixels": 256 * 256, "max_pixels": 2048 * 2048},'
)


def _substitute(text: str, old: str, new: str) -> str:
    assert text.count(old) == 1, f"the card example should contain {old!r} exactly once"
    return text.replace(old, new)


def run_card_example(model_id: str, *, image: str | None = None, video_item: str | None = None) -> dict:
    """Execute the card's example with only the model id and the media changed; return its namespace."""
    code = _substitute(CARD_EXAMPLE, CARD_MODEL_ID, repr(str(model_id)))
    if image is not None:
        code = _substitute(code, CARD_IMAGE_PATH, repr(str(image)))
    else:
        code = _substitute(code, CARD_IMAGE_ITEM, video_item)
    namespace: dict = {"__name__": "model_card_example"}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "model_card_example.py", "exec"), namespace)  # noqa: S102 - the card's own code
    namespace["printed"] = out.getvalue()
    return namespace


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


def _check(namespace: dict, video: bool) -> None:
    import torch

    ids = namespace["response_ids"]
    assert isinstance(ids, torch.Tensor) and ids.dtype == torch.long and ids.ndim == 2 and ids.shape[0] == 1
    assert 1 <= ids.shape[1] <= 16  # EOS in the first block of 16 stops decoding
    processor = namespace["processor"]
    expected = processor.tokenizer.batch_decode(ids, skip_special_tokens=True)[0].strip()
    assert namespace["printed"] == expected + "\n"
    batch = namespace["batch"]
    assert ("pixel_values_videos" in batch) is video and ("pixel_values" in batch) is (not video)
    prompt = processor.tokenizer.decode(batch["input_ids"][0])
    if video:  # frame timestamps come from the sample fps qwen_vl_utils reported (2 fps), not a 24 fps guess
        assert "<0.2 seconds>" in prompt and "<1.2 seconds>" in prompt


def test_card_example_is_the_published_text():
    assert CARD_EXAMPLE.startswith("import torch\nfrom transformers import AutoProcessor\n")
    assert "return_video_metadata=False," in CARD_EXAMPLE and "**video_kwargs," in CARD_EXAMPLE
    assert CARD_EXAMPLE.count("model.generate(") == 1 and CARD_EXAMPLE.endswith(".strip())\n")


def test_model_card_example_image(answering_model_dir, tmp_path):
    namespace = run_card_example(answering_model_dir, image=write_demo_image(tmp_path / "puzzle.png"))
    _check(namespace, video=False)


def test_model_card_example_video_file(answering_model_dir, tmp_path):
    path = write_demo_video(tmp_path / "clip.mp4")
    namespace = run_card_example(answering_model_dir, video_item=f'{{"type": "video", "video": {str(path)!r}}},')
    _check(namespace, video=True)


def test_model_card_example_video_frames(answering_model_dir, tmp_path):
    frames = [write_demo_image(tmp_path / f"frame{i}.png", size=64) for i in range(4)]
    item = '{"type": "video", "video": %r},' % [str(p) for p in frames]
    namespace = run_card_example(answering_model_dir, video_item=item)
    _check(namespace, video=True)
