"""The model-card snippet, run against a tiny local checkpoint (image and video messages).

``run_demo(out_dir)`` writes a tiny random Bard-VL, a test image and a short MP4 video, then runs
the published usage code unchanged apart from ``model_id`` and the media paths. The weights are
random, so the text is noise: the point is that every step of the public API works.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image


def write_demo_image(path: str | Path, size: int = 96) -> Path:
    """A small deterministic test picture (coloured quadrants)."""
    path = Path(path)
    array = np.zeros((size, size, 3), dtype=np.uint8)
    half = size // 2
    array[:half, :half] = (220, 40, 40)
    array[:half, half:] = (40, 200, 40)
    array[half:, :half] = (40, 40, 220)
    array[half:, half:] = (230, 220, 40)
    Image.fromarray(array).save(path)
    return path


def write_demo_video(path: str | Path, size: int = 64, frames: int = 8, fps: int = 4) -> Path:
    """A short MP4 (a square moving across the frame), written with PyAV."""
    import av

    path = Path(path)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for i in range(frames):
            array = np.full((size, size, 3), 30, dtype=np.uint8)
            x = (i * (size - 16)) // max(frames - 1, 1)
            array[24:40, x : x + 16] = (230, 60, 60)
            frame = av.VideoFrame.from_ndarray(array, format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def model_card_generate(model_id: str | Path, messages: list[dict[str, Any]], **generate_kwargs: Any):
    """The model card's inference code path: processor, qwen-vl-utils, ``model.generate``, decode.

    As on the card, ``process_vision_info(..., return_video_metadata=False)`` and its ``video_kwargs``
    (``fps`` list included) go to the processor unchanged; :class:`BardVLProcessor` accepts them.
    """
    import torch
    from qwen_vl_utils import process_vision_info
    from transformers import AutoProcessor

    from nemo_automodel.components.models.bard_vl import BardVLForConditionalGeneration

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = BardVLForConditionalGeneration.from_pretrained(
        str(model_id), dtype=torch.float32, _attn_implementation="sdpa"
    ).to(device).eval()
    processor = AutoProcessor.from_pretrained(str(model_id))
    texts = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    image_inputs, video_inputs, video_kwargs = process_vision_info(
        messages,
        return_video_kwargs=True,
        return_video_metadata=False,
        image_patch_size=processor.image_processor.patch_size,
    )
    batch = processor(
        text=[texts],
        images=image_inputs,
        videos=video_inputs,
        padding=False,
        return_tensors="pt",
        **video_kwargs,
    ).to(device)
    kwargs = dict(
        max_new_tokens=64,
        block_size=16,
        denoising_steps=16,
        temperature=0.0,
        top_k=0,
        top_p=1.0,
        remasking_strategy="low_confidence_dynamic",
        confidence_threshold=0.5,
        return_step_stats=False,
    )
    kwargs.update(generate_kwargs)
    output = model.generate(batch, **kwargs)
    ids = output[0] if isinstance(output, tuple) else output
    return processor.tokenizer.batch_decode(ids, skip_special_tokens=True)[0].strip(), output


def run_demo(out_dir: str | Path) -> dict[str, Any]:
    """Write a tiny checkpoint and media under ``out_dir`` and run the model-card code on both."""
    from nemo_automodel_bard.fixtures.tiny import write_tiny_checkpoint

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model_dir = write_tiny_checkpoint(out / "tiny-bard-vl")
    image = write_demo_image(out / "demo.png")
    video = write_demo_video(out / "demo.mp4")
    results: dict[str, Any] = {}
    for name, item in (("image", {"type": "image", "image": str(image)}), ("video", {"type": "video", "video": str(video)})):
        messages = [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": [item, {"type": "text", "text": f"Describe this {name}."}]},
        ]
        text, (ids, stats) = model_card_generate(model_dir, messages, return_step_stats=True)
        results[name] = {"text": text, "stats": stats}
        print(f"[{name}] {stats['num_response_tokens']} tokens, {stats['forwards_total']} forwards "
              f"({stats['tokens_per_forward']:.2f} tokens/forward): {text[:60]!r}")
    print(f"model directory: {model_dir} (random weights; run the pipeline to train one)")
    return results


__all__ = ["model_card_generate", "run_demo", "write_demo_image", "write_demo_video"]
