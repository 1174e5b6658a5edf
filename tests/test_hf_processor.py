"""BardVLProcessor: qwen_vl_utils' ``fps`` list is accepted, and AutoProcessor picks our class for our checkpoints."""

from __future__ import annotations

import json

import pytest
import torch


def test_normalize_fps_rules():
    from nemo_automodel_bard.models.bard_vl.processing_bard_vl import normalize_fps

    assert normalize_fps(None, {"fps": [], "do_sample_frames": False}) == {"do_sample_frames": False}
    assert normalize_fps(None, {"fps": 2.0}) == {"fps": 2.0}
    video = torch.zeros(6, 3, 32, 32)
    out = normalize_fps([video], {"fps": [2.0]})
    assert "fps" not in out
    assert out["video_metadata"] == [{"total_num_frames": 6, "fps": 2.0, "frames_indices": [0, 1, 2, 3, 4, 5]}]
    given = [{"total_num_frames": 6, "fps": 30.0, "frames_indices": [0, 5, 10, 15, 20, 25]}]
    assert normalize_fps([video], {"fps": [2.0], "video_metadata": given}) == {"video_metadata": given}
    with pytest.raises(ValueError, match="fps has 2 entries but 1 videos"):
        normalize_fps([video], {"fps": [2.0, 2.0]})


def test_auto_processor_is_ours(tiny_model_dir):
    from transformers import AutoProcessor

    from nemo_automodel_bard.models.bard_vl.processing_bard_vl import BardVLProcessor

    saved = json.loads((tiny_model_dir / "processor_config.json").read_text())
    assert saved["processor_class"] == "BardVLProcessor"
    assert "auto_map" not in saved  # no remote code
    assert type(AutoProcessor.from_pretrained(tiny_model_dir)) is BardVLProcessor


def test_image_with_empty_fps_list(tiny_processor, tmp_path):
    from nemo_automodel_bard.demo import write_demo_image
    from PIL import Image

    image = Image.open(write_demo_image(tmp_path / "x.png")).convert("RGB")
    text = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>hi<|im_end|>\n"
    plain = tiny_processor(text=[text], images=[image], return_tensors="pt")
    with_fps = tiny_processor(text=[text], images=[image], videos=None, return_tensors="pt", fps=[], do_sample_frames=False)
    assert torch.equal(plain["input_ids"], with_fps["input_ids"])
    assert torch.equal(plain["pixel_values"], with_fps["pixel_values"])


def test_checkpoint_naming_qwen_processor(tiny_model_dir, tmp_path):
    """A released checkpoint names Qwen3VLProcessor: AutoProcessor follows that name (Qwen's class, which
    rejects the fps list); BardVLProcessor.from_pretrained loads the same files with the normalisation."""
    import shutil

    from transformers import AutoProcessor
    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor

    from nemo_automodel_bard.models.bard_vl.processing_bard_vl import BardVLProcessor

    released = tmp_path / "released"
    shutil.copytree(tiny_model_dir, released)
    for name in ("processor_config.json", "tokenizer_config.json"):
        data = json.loads((released / name).read_text())
        data["processor_class"] = "Qwen3VLProcessor"
        (released / name).write_text(json.dumps(data))
    auto = AutoProcessor.from_pretrained(released)
    assert type(auto) is Qwen3VLProcessor
    text = "<|im_start|>user\nhi<|im_end|>\n"
    with pytest.raises(Exception, match="fps"):
        auto(text=[text], return_tensors="pt", fps=[], do_sample_frames=False)
    ours = BardVLProcessor.from_pretrained(released)
    assert type(ours) is BardVLProcessor
    assert ours(text=[text], return_tensors="pt", fps=[], do_sample_frames=False)["input_ids"].shape[0] == 1
