"""Vision-tower warm-up for the tiny autoregressive stand-in (embedded shapes task only).

A real Qwen3-VL starts from a *pretrained* vision encoder; the tiny stand-in starts from random
weights. Trained end to end on the shapes task, its vision tower learns cell occupancy and colour but
not shape: the answer's shape word is predicted uniformly over the four shapes (0.26 nats per answer
token, token accuracy 0.86 after 1,500 steps), because shape is not readable from random features,
so the language model never learns to look at the cell for it, so no gradient asks the vision tower
for it. A linear probe on the merged tokens of that model reads colour at 100 % and shape at 44 %.

The warm-up gives the tower what a pretrained encoder would have: a few seconds of supervised
per-cell classification -- every merged vision token (one per grid cell) predicts the colour and the
shape of its cell (or "empty") through a throw-away linear head. 100 steps of batch 32 reach ~100 %
per-cell accuracy on held-out images; the autoregressive run that follows then learns shapes.

Only the vision tower (``model.model.visual``) is updated; the language model is untouched. Data:
training-split layouts of :class:`~nemo_automodel_bard.data.shapes.ShapesTask` (held-out images are
never seen). Everything is seeded, so every rank computes the same weights.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any, Optional

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

__all__ = ["VisionWarmupError", "warm_up_vision_tower"]


class VisionWarmupError(ValueError):
    """The model / task geometry does not allow a per-cell warm-up."""


def _cell_batch(task: Any, processor: Any, split: str, start: int, size: int) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """Pixel inputs of ``size`` samples and their per-cell labels ``[size * grid * grid]`` (colour, shape)."""
    from nemo_automodel_bard.data.shapes import cell_labels

    samples = [task.sample(split, start + i) for i in range(size)]
    pixels = processor.image_processor([s.image for s in samples], return_tensors="pt")
    colors, shapes = zip(*(cell_labels(s.objects, task.grid) for s in samples))
    return (
        {"pixel_values": pixels["pixel_values"], "grid_thw": pixels["image_grid_thw"]},
        torch.tensor(colors, dtype=torch.long).reshape(-1),
        torch.tensor(shapes, dtype=torch.long).reshape(-1),
    )


def warm_up_vision_tower(
    model: torch.nn.Module,
    processor: Any,
    *,
    steps: int = 100,
    lr: float = 3.0e-3,
    batch_size: int = 32,
    warmup_steps: int = 20,
    seed: int = 0,
    data_seed: int = 0,
    data_offset: int = 0,
    image_size: int = 96,
    grid: int = 3,
    eval_samples: int = 64,
) -> dict[str, float]:
    """Train ``model.model.visual`` to classify every cell's colour and shape; return held-out accuracies.

    Args:
        model: a Qwen3-VL-shaped model (``model.model.visual`` with ``pooler_output`` of one merged token
            per ``patch_size * spatial_merge_size`` pixels, in reading order).
        processor: its processor (only the image processor is used).
        steps, lr, batch_size, warmup_steps: AdamW (betas 0.9/0.95) with a linear warm-up, then constant.
        seed: initialisation of the throw-away head. data_seed, image_size, grid: the shapes task.
        data_offset: the first training image's task index (images ``data_offset ..`` are used).
        eval_samples: held-out images scored at the end.

    Returns:
        ``{"loss", "color_accuracy", "shape_accuracy", "seconds"}``: the last training loss and the
        held-out accuracies on occupied cells.
    """
    from nemo_automodel_bard.data.shapes import COLORS, SHAPES, ShapesTask

    if steps <= 0:
        raise VisionWarmupError(f"vision warm-up: steps must be positive, got {steps}")
    visual = model.model.visual
    cell = image_size // grid
    token_side = int(visual.config.patch_size) * int(visual.config.spatial_merge_size)
    if image_size % grid or cell != token_side:
        raise VisionWarmupError(
            f"vision warm-up needs one merged vision token per grid cell: cells of {image_size}/{grid} px but "
            f"patch_size x spatial_merge_size = {token_side} px"
        )
    task = ShapesTask(seed=data_seed, image_size=image_size, grid=grid)
    n_color, n_shape = len(COLORS) + 1, len(SHAPES) + 1
    device = next(visual.parameters()).device
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        head = torch.nn.Linear(int(visual.config.out_hidden_size), n_color + n_shape).to(device)
    params = list(visual.parameters()) + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)

    def logits(inputs: dict) -> torch.Tensor:
        out = visual(inputs["pixel_values"].to(device), grid_thw=inputs["grid_thw"].to(device))
        return head(out.pooler_output)

    was_training = visual.training
    visual.train()
    started = time.perf_counter()
    loss = torch.zeros(())
    for step in range(steps):
        inputs, colors, shapes = _cell_batch(task, processor, "train", data_offset + step * batch_size, batch_size)
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / max(warmup_steps, 1))
        z = logits(inputs)
        loss = F.cross_entropy(z[:, :n_color], colors.to(device)) + F.cross_entropy(z[:, n_color:], shapes.to(device))
        if not math.isfinite(float(loss)):
            raise FloatingPointError(f"vision warm-up: loss is {float(loss)} at step {step}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
    visual.eval()
    with torch.no_grad():
        inputs, colors, shapes = _cell_batch(task, processor, "heldout", 0, eval_samples)
        z = logits(inputs)
        occupied = colors.to(device) > 0
        color_acc = (z[:, :n_color].argmax(-1) == colors.to(device))[occupied].float().mean()
        shape_acc = (z[:, n_color:].argmax(-1) == shapes.to(device))[occupied].float().mean()
    visual.train(was_training)
    optimizer.zero_grad(set_to_none=True)
    stats = {
        "loss": float(loss),
        "color_accuracy": float(color_acc),
        "shape_accuracy": float(shape_acc),
        "seconds": time.perf_counter() - started,
    }
    logger.info("vision warm-up: %d steps, held-out per-cell accuracy colour %.3f shape %.3f (%.1f s)",
                steps, stats["color_accuracy"], stats["shape_accuracy"], stats["seconds"])
    return stats


def warmup_from_config(model: torch.nn.Module, processor: Any, config: Optional[dict]) -> Optional[dict[str, float]]:
    """Run :func:`warm_up_vision_tower` with the keyword arguments of a YAML ``vision_warmup:`` mapping."""
    if not config:
        return None
    allowed = {"steps", "lr", "batch_size", "warmup_steps", "seed", "data_seed", "data_offset", "image_size", "grid",
               "eval_samples"}
    unknown = sorted(set(config) - allowed)
    if unknown:
        raise VisionWarmupError(f"model.vision_warmup: unknown key(s) {unknown}; valid keys are {sorted(allowed)}")
    return warm_up_vision_tower(model, processor, **dict(config))
