"""The model inputs that carry media: the processor outputs a forward passes on besides ids, mask and positions.

:data:`MEDIA_KEYS` is the one list of them; the collators, the training objectives and the decoders read it.
"""

from __future__ import annotations

from typing import Any

#: pixel inputs and their token-type / grid metadata (Qwen3-VL's processor keys)
MEDIA_KEYS = ("pixel_values", "pixel_values_videos", "image_grid_thw", "video_grid_thw", "mm_token_type_ids")


def media_inputs(data: dict[str, Any]) -> dict[str, Any]:
    """``{key: data.get(key)}`` for every :data:`MEDIA_KEYS` entry (``None`` where absent)."""
    return {key: data.get(key) for key in MEDIA_KEYS}
