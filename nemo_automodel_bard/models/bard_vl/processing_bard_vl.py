"""Processor of Bard-VL: Qwen3-VL's processor that also takes the ``fps`` list of ``qwen_vl_utils``.

The published inference code calls::

    image_inputs, video_inputs, video_kwargs = process_vision_info(
        messages, return_video_kwargs=True, return_video_metadata=False, image_patch_size=...)
    batch = processor(text=[text], images=image_inputs, videos=video_inputs, padding=False,
                      return_tensors="pt", **video_kwargs)

``video_kwargs`` is ``{"do_sample_frames": False, "fps": [...]}``: one *sample* fps per video (the
rate at which ``qwen_vl_utils`` already took the frames), ``[]`` without videos. transformers 5's
Qwen3-VL processor validates ``fps`` as one number and rejects the list. :class:`BardVLProcessor`
accepts it:

* ``fps=[]`` (no video) is dropped;
* with videos and no ``video_metadata``, the list becomes per-video metadata of the frames given
  (``fps`` = the sample fps, ``frames_indices`` = ``0 .. n-1``), so the prompt's frame timestamps
  (``<t seconds>``) are the frames' real times; the frames are not sampled again;
* with ``video_metadata`` given (``return_video_metadata=True``), the list is dropped — the metadata
  already carries the source fps and the frame indices;
* a single number is passed on unchanged.

Everything else is :class:`~transformers.Qwen3VLProcessor`. The class is registered with
``AutoProcessor`` for ``model_type: bard_vl`` and is what our checkpoints name in
``processor_config.json`` (``processor_class: BardVLProcessor``). A checkpoint whose processor config
names ``Qwen3VLProcessor`` (as the released ones do) loads Qwen's class, because ``AutoProcessor``
follows the saved ``processor_class`` first; load it with ``BardVLProcessor.from_pretrained(...)``
(or re-save it) to get the normalisation.
"""

from __future__ import annotations

from collections.abc import Sequence
from numbers import Real
from typing import Any

from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor


def _num_frames(video: Any) -> int | None:
    """Number of frames of one video given as a tensor/array ``[T, ...]`` or a list of frames."""
    shape = getattr(video, "shape", None)
    if shape is not None and len(shape) >= 4:
        return int(shape[0])
    if isinstance(video, (list, tuple)):
        return len(video)
    return None


def _as_video_list(videos: Any) -> list[Any] | None:
    shape = getattr(videos, "shape", None)
    if shape is not None:
        return [videos] if len(shape) == 4 else list(videos)
    if isinstance(videos, (list, tuple)):
        return list(videos)
    return None


def normalize_fps(videos: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Return ``kwargs`` with a ``qwen_vl_utils``-style ``fps`` list turned into what transformers 5 accepts.

    Raises:
        ValueError: an ``fps`` list whose length does not match the number of videos.
    """
    fps = kwargs.get("fps")
    if fps is None or isinstance(fps, Real):
        return kwargs
    if not isinstance(fps, Sequence) or isinstance(fps, str):
        return kwargs
    kwargs = dict(kwargs)
    values = list(kwargs.pop("fps"))
    if not values or videos is None or kwargs.get("video_metadata") is not None:
        return kwargs
    video_list = _as_video_list(videos)
    if video_list is None or len(video_list) != len(values):
        count = "?" if video_list is None else len(video_list)
        raise ValueError(f"fps has {len(values)} entries but {count} videos were given (one sample fps per video)")
    metadata = []
    for video, rate in zip(video_list, values):
        frames = _num_frames(video)
        if frames is None:  # a path or URL: the video processor reads and samples it itself
            return (kwargs | {"fps": float(values[0])}) if len(set(values)) == 1 else kwargs
        metadata.append(
            {"total_num_frames": frames, "fps": float(rate), "frames_indices": list(range(frames))}
        )
    kwargs["video_metadata"] = metadata
    return kwargs


class BardVLProcessor(Qwen3VLProcessor):
    """Qwen3-VL processor that also accepts ``process_vision_info``'s ``fps`` list (see the module doc)."""

    def __call__(self, images: Any = None, text: Any = None, videos: Any = None, **kwargs: Any) -> Any:
        return super().__call__(images=images, text=text, videos=videos, **normalize_fps(videos, kwargs))


__all__ = ["BardVLProcessor", "normalize_fps"]
