"""Qwen3-VL's multimodal rotary positions (mRoPE) for a token row, without a model.

transformers computes them in ``Qwen3VLModel.get_rope_index``, a method of the model that reads only
``config.vision_config.spatial_merge_size`` and calls ``get_vision_position_ids``. The collators need the
positions before any model exists (and in dataloader workers), so :class:`Qwen3VLRopeIndex` is the smallest host
for that method: transformers' own code computes every position, none is re-implemented here.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Optional

import torch

__all__ = ["Qwen3VLRopeIndex", "qwen3_vl_rope_index"]


class Qwen3VLRopeIndex:
    """Stand-in ``self`` for Qwen3-VL's ``get_rope_index``: it only reads
    ``config.vision_config.spatial_merge_size`` and calls ``get_vision_position_ids``."""

    def __init__(self, spatial_merge_size: int) -> None:
        from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLModel

        self.config = SimpleNamespace(vision_config=SimpleNamespace(spatial_merge_size=int(spatial_merge_size)))
        self._model_cls = Qwen3VLModel

    def get_vision_position_ids(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self._model_cls.get_vision_position_ids(self, *args, **kwargs)

    def __call__(self, input_ids, mm_token_type_ids, image_grid_thw=None, video_grid_thw=None) -> torch.Tensor:
        positions, _ = self._model_cls.get_rope_index(
            self,
            input_ids,
            mm_token_type_ids,
            image_grid_thw=image_grid_thw,
            video_grid_thw=video_grid_thw.clone() if video_grid_thw is not None else None,
        )
        return positions


def qwen3_vl_rope_index(
    input_ids: torch.Tensor,
    mm_token_type_ids: torch.Tensor,
    image_grid_thw: Optional[torch.Tensor] = None,
    video_grid_thw: Optional[torch.Tensor] = None,
    *,
    spatial_merge_size: int = 2,
) -> torch.Tensor:
    """Qwen3-VL mRoPE positions ``[3, batch, L]`` without a model (transformers' own code).

    Args:
        input_ids: ``[batch, L]`` (no padding). mm_token_type_ids: ``[batch, L]`` (0 text, 1 image, 2 video).
        image_grid_thw / video_grid_thw: ``[n, 3]`` grids of the images / videos in row-major order.
    """
    return Qwen3VLRopeIndex(spatial_merge_size)(input_ids, mm_token_type_ids, image_grid_thw, video_grid_thw)
