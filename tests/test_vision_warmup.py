"""Vision-tower warm-up of the tiny AR stand-in, per-cell labels, and the linear patch embedding."""

from __future__ import annotations

import pytest
import torch
from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionPatchEmbed

from nemo_automodel_bard.data.shapes import COLORS, SHAPES, ShapesTask, cell_labels
from nemo_automodel_bard.models.bard_vl.modeling_bard_vl import LinearPatchEmbed, use_linear_patch_embed
from nemo_automodel_bard.fixtures.tiny import build_tiny_processor
from nemo_automodel_bard.recipes.model_builder import ModelConfigError, build_qwen3_vl_ar
from nemo_automodel_bard.recipes.vision_warmup import VisionWarmupError, warm_up_vision_tower, warmup_from_config


def test_cell_labels_reading_order_and_ids():
    colors, shapes = cell_labels([("red", "circle", 1, 1), ("blue", "cross", 2, 3), ("green", "square", 3, 2)])
    expected_colors = [0] * 9
    expected_shapes = [0] * 9
    expected_colors[0], expected_shapes[0] = 1 + COLORS.index("red"), 1 + SHAPES.index("circle")
    expected_colors[5], expected_shapes[5] = 1 + COLORS.index("blue"), 1 + SHAPES.index("cross")
    expected_colors[7], expected_shapes[7] = 1 + COLORS.index("green"), 1 + SHAPES.index("square")
    assert (colors, shapes) == (expected_colors, expected_shapes)
    with pytest.raises(ValueError, match="outside a 3x3 grid"):
        cell_labels([("red", "circle", 4, 1)])


def test_cell_labels_match_the_rendered_pixels():
    """The labelled cell of every object is the one whose centre pixel has the object's colour."""
    from nemo_automodel_bard.data.shapes import COLOR_RGB

    task = ShapesTask(seed=3)
    sample = task.sample("train", 5)
    colors, _ = cell_labels(sample.objects)
    pixels = sample.image.load()
    for cell, color_id in enumerate(colors):
        row, col = divmod(cell, 3)
        centre = pixels[col * 32 + 16, row * 32 + 16]
        if color_id:
            assert centre == COLOR_RGB[COLORS[color_id - 1]]


def _conv_reference(embed: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    x = pixels.view(-1, embed.in_channels, embed.temporal_patch_size, embed.patch_size, embed.patch_size)
    return embed.proj(x).view(-1, embed.embed_dim)


def test_linear_patch_embed_equals_the_convolution_forward_and_backward():
    model = build_qwen3_vl_ar(tiny={})
    embed = model.model.visual.patch_embed.double()  # float64: the comparison is about the maths, not rounding
    assert type(embed) is LinearPatchEmbed
    pixels = torch.randn(20, 3 * 2 * 16 * 16, dtype=torch.float64)
    out = embed(pixels)
    ref = _conv_reference(embed, pixels)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    (grad_linear,) = torch.autograd.grad(out.square().sum(), embed.proj.weight)
    (grad_conv,) = torch.autograd.grad(ref.square().sum(), embed.proj.weight)
    torch.testing.assert_close(grad_linear, grad_conv, rtol=1e-10, atol=1e-10)
    # the parameter names (checkpoint keys) are Qwen3-VL's
    assert {n for n, _ in embed.named_parameters()} == {"proj.weight", "proj.bias"}


def test_use_linear_patch_embed_is_idempotent_and_leaves_other_classes():
    model = build_qwen3_vl_ar(tiny={})
    use_linear_patch_embed(model)
    assert type(model.model.visual.patch_embed) is LinearPatchEmbed
    assert issubclass(LinearPatchEmbed, Qwen3VLVisionPatchEmbed)


def test_warm_up_teaches_colour_and_shape_and_leaves_the_language_model():
    model = build_qwen3_vl_ar(tiny={})
    lm_before = {n: p.detach().clone() for n, p in model.model.language_model.named_parameters()}
    vis_before = model.model.visual.patch_embed.proj.weight.detach().clone()
    stats = warm_up_vision_tower(model, build_tiny_processor(), steps=60, batch_size=16, eval_samples=32)
    assert stats["color_accuracy"] > 0.95
    assert stats["shape_accuracy"] > 0.8  # random features: ~0.3-0.45
    for n, p in model.model.language_model.named_parameters():
        assert torch.equal(p, lm_before[n]), n
    assert not torch.equal(model.model.visual.patch_embed.proj.weight, vis_before)


def test_warm_up_is_deterministic():
    weights = []
    for _ in range(2):
        model = build_qwen3_vl_ar(tiny={})
        warm_up_vision_tower(model, build_tiny_processor(), steps=3, batch_size=4, eval_samples=4)
        weights.append(model.model.visual.merger.linear_fc2.weight.detach().clone())
    assert torch.equal(weights[0], weights[1])


def test_builder_runs_the_warm_up_and_refuses_it_for_pretrained(tmp_path):
    plain = build_qwen3_vl_ar(tiny={})
    warmed = build_qwen3_vl_ar(tiny={}, vision_warmup={"steps": 2, "batch_size": 4, "eval_samples": 4})
    assert not torch.equal(plain.model.visual.merger.linear_fc2.weight, warmed.model.visual.merger.linear_fc2.weight)
    assert torch.equal(plain.model.language_model.embed_tokens.weight, warmed.model.language_model.embed_tokens.weight)
    with pytest.raises(ModelConfigError, match="only applies to a random tiny model"):
        build_qwen3_vl_ar(str(tmp_path), vision_warmup={"steps": 2})


def test_warm_up_errors_name_the_problem():
    model = build_qwen3_vl_ar(tiny={})
    processor = build_tiny_processor()
    with pytest.raises(VisionWarmupError, match="one merged vision token per grid cell"):
        warm_up_vision_tower(model, processor, steps=1, image_size=120, grid=3)
    with pytest.raises(VisionWarmupError, match="steps must be positive"):
        warm_up_vision_tower(model, processor, steps=0)
    with pytest.raises(VisionWarmupError, match=r"unknown key\(s\) \['step'\]"):
        warmup_from_config(model, processor, {"step": 3})
