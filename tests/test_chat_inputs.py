"""One path from a chat to model inputs (``data/chat_inputs.py``): ``bard-vl infer``, the server's request path,
the lmms-eval plugin's batched encoding and the pipeline's evaluation give identical inputs for the same chat, and
the prompt part of both collators' training rows equals them."""

from __future__ import annotations

import base64

import pytest
import torch
from helpers import toy_picture

from nemo_automodel_bard.data.ar_collator import IGNORE_INDEX, ARChatCollator
from nemo_automodel_bard.data.chat_inputs import ChatInputError, encode_chats, encode_messages, prompt_inputs
from nemo_automodel_bard.data.collator import BardVLCollator
from nemo_automodel_bard.diffusion.masks import TokenType

PIXEL_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")
QUESTION = "What differs?"
ANSWER = "the colour"


@pytest.fixture(scope="module")
def processor(tiny_model_dir):
    """A processor of our own: the lmms-eval plugin sets its tokenizer's padding side."""
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """Two image files (aligned to the 32-pixel resize factor, so no caller resizes them) and an MP4."""
    from nemo_automodel_bard.demo import write_demo_video

    root = tmp_path_factory.mktemp("chat_media")
    images = []
    for name, pic in (("red.png", (64, 64, (200, 30, 30))), ("green.png", (128, 96, (30, 200, 30)))):
        toy_picture(*pic).save(root / name)
        images.append(root / name)
    return root, images, write_demo_video(root / "clip.mp4")


class _Stop(Exception):
    """Raised by the spy once ``infer`` has encoded its chat (nothing needs decoding)."""


def _infer_inputs(model_dir, images, videos, monkeypatch) -> dict:
    """What ``bard-vl infer --image ... --video ... --prompt ...`` hands the decoder."""
    from nemo_automodel_bard.serving import infer

    seen = {}

    def spy(processor, messages):
        seen.update(encode_messages(processor, messages))
        raise _Stop

    monkeypatch.setattr(infer, "encode_messages", spy)
    argv = [str(model_dir), *(a for p in images for a in ("--image", str(p))),
            *(a for v in videos for a in ("--video", str(v))), "--prompt", QUESTION]
    with pytest.raises(_Stop):
        infer.main(argv)
    return seen


def _served_inputs(model, processor, root, images, videos) -> dict:
    """What ``bard-vl serve`` builds for an OpenAI body: inline images, a video below ``--media-root``."""
    from nemo_automodel_bard.serving.server import BardServer, ServeConfig

    parts = [{"type": "image_url", "image_url": {"url": "data:image/png;base64,"
                                                        + base64.b64encode(p.read_bytes()).decode()}} for p in images]
    parts += [{"type": "video_url", "video_url": {"url": v.name}} for v in videos]
    body = {"model": "m", "messages": [{"role": "user", "content": [*parts, {"type": "text", "text": QUESTION}]}]}
    server = BardServer(model, processor, ServeConfig(model_name="m", media_root=root))
    try:
        return server.prepare(body).inputs
    finally:
        server.close()


def _lmms_inputs(model_dir, model, processor, images, videos) -> dict:
    """What the lmms-eval plugin encodes for a document with these visuals (PIL images, video paths)."""
    from PIL import Image

    from nemo_automodel_bard.evaluation.batched import BatchedBardVL, EvalItem

    bard = BatchedBardVL(str(model_dir), model=model, processor=processor, system_prompt="", max_num_frames=768)
    visuals = [Image.open(p).convert("RGB") for p in images] + [str(v) for v in videos]
    return bard.encode([bard.messages_for(EvalItem(context=QUESTION, visuals=visuals))])


def _record(images, videos) -> dict:
    """The chat as a training / held-out record (paths as a dataset resolves them)."""
    content = [{"type": "image", "image": str(p)} for p in images] + [{"type": "video", "video": str(v)} for v in videos]
    return {"messages": [{"role": "user", "content": [*content, {"type": "text", "text": QUESTION}]},
                         {"role": "assistant", "content": ANSWER}], "index": 0}


def _assert_same(inputs: dict, reference: dict, who: str) -> None:
    assert sorted(inputs) == sorted(reference), who
    for key, value in reference.items():
        assert torch.equal(torch.as_tensor(inputs[key]), value), f"{who}: {key}"


@pytest.mark.parametrize("kind", ["image", "images_and_video"])
def test_four_callers_and_both_collators_encode_a_chat_alike(kind, tiny_model_dir, tiny_model, processor, media,
                                                             monkeypatch):
    from nemo_automodel_bard.pipeline.evaluate import _encode, records_from_chat

    root, all_images, video = media
    images, videos = (all_images[:1], []) if kind == "image" else (all_images, [video])
    reference = _infer_inputs(tiny_model_dir, images, videos, monkeypatch)
    assert reference["image_grid_thw"].shape[0] == len(images)
    assert ("pixel_values_videos" in reference) is bool(videos)

    _assert_same(_served_inputs(tiny_model, processor, root, images, videos), reference, "server")
    _assert_same(_lmms_inputs(tiny_model_dir, tiny_model, processor, images, videos), reference, "lmms-eval plugin")
    _assert_same(_encode(processor, records_from_chat([_record(images, videos)])), reference, "pipeline evaluation")

    # the collators: their rows start with the same prompt, and carry the same pixels
    P = reference["input_ids"].shape[1]
    prompt_ids, prompt_mm = reference["input_ids"][0], reference["mm_token_type_ids"][0]
    row = BardVLCollator(processor=processor, block_size=4, strict=True)([_record(images, videos)])
    assert torch.equal(row["input_ids"][0, :P], prompt_ids)
    assert torch.equal(row["mm_token_type_ids"][0, :P], prompt_mm)
    assert (row["token_type"][0, :P] == int(TokenType.PROMPT)).all() and row["token_type"][0, P] != int(TokenType.PROMPT)
    ar = ARChatCollator(processor=processor, strict=True)([_record(images, videos)])
    assert torch.equal(ar["input_ids"][0, :P], prompt_ids)
    assert torch.equal(ar["mm_token_type_ids"][0, :P], prompt_mm)
    assert (ar["labels"][0, : P - 1] == IGNORE_INDEX).all() and ar["labels"][0, P - 1] != IGNORE_INDEX
    for batch, who in ((row, "BardVLCollator"), (ar, "ARChatCollator")):
        for key in PIXEL_KEYS:
            assert (key in batch) == (key in reference), f"{who}: {key}"
            if key in reference:
                assert torch.equal(batch[key], reference[key]), f"{who}: {key}"


def test_a_batch_of_chats_equals_each_chat_alone(processor, media):
    """Left-padded batches (the evaluation's and the plugin's) hold each chat's own tokens and pixels."""
    _, images, _ = media
    chats = [[{"role": "user", "content": [{"type": "image", "image": str(p)}, {"type": "text", "text": q}]}]
             for p, q in zip(images, ("Which colour?", "How many shapes are in the picture?"))]
    processor.tokenizer.padding_side = "left"
    batch = encode_chats(processor, chats, padding=True)
    alone = [prompt_inputs(processor, chat) for chat in chats]
    width = batch["input_ids"].shape[1]
    for row, single in enumerate(alone):
        n = single["input_ids"].shape[1]
        assert torch.equal(batch["input_ids"][row, width - n :], single["input_ids"][0])
        assert batch["attention_mask"][row].sum() == n
    assert torch.equal(batch["pixel_values"], torch.cat([s["pixel_values"] for s in alone]))
    assert torch.equal(batch["image_grid_thw"], torch.cat([s["image_grid_thw"] for s in alone]))


def test_errors_name_the_chat_and_the_reason(processor, tmp_path):
    good = [{"role": "user", "content": "hello"}]
    missing = [{"role": "user", "content": [{"type": "image", "image": str(tmp_path / "gone.png")},
                                            {"type": "text", "text": "?"}]}]
    with pytest.raises(ChatInputError, match=r"chat 1: image file not found: .*gone\.png"):
        encode_chats(processor, [good, missing], padding=True)
    typed = [{"role": "user", "content": "a literal <|image_pad|> without an image"}]
    with pytest.raises(ChatInputError, match=r"image placeholder/feature mismatch"):
        encode_messages(processor, typed)
    with pytest.raises(ChatInputError, match=r"message 0 is not a .* known role"):
        encode_messages(processor, [{"role": "robot", "content": "x"}])
    with pytest.raises(ChatInputError, match="no chat"):
        encode_chats(processor, [])
