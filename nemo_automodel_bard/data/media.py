"""Media of chat records: images and videos loaded under their size limits, as the Qwen3-VL processor wants them.

Content items follow Qwen-VL's format: ``{"type": "image", "image": path | PIL | bytes | {"bytes"|"path"} |
data: URI}`` and ``{"type": "video", "video": path | [frames], "fps": ..., ...}``, with an item's own size keys
(:data:`ITEM_SIZE_KEYS`). Paths are resolved against ``image_root``. Anything that cannot be loaded raises
:class:`~nemo_automodel_bard.data.records.SampleSkipped` naming the file and the reason.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from nemo_automodel_bard.decoding.inputs import MEDIA_KEYS

from .records import SampleSkipped

__all__ = [
    "ITEM_SIZE_KEYS",
    "MAX_SOURCE_PIXELS",
    "MEDIA_ITEM_KEYS",
    "PIXEL_KEYS",
    "VIDEO_OPTION_KEYS",
    "item_kind",
    "load_image",
    "load_image_item",
    "load_video_item",
    "media_path",
    "processor_video_kwargs",
    "resize_to_item_limits",
]

#: the processor outputs that carry the media (pixels and their grids; ``mm_token_type_ids`` is per token)
PIXEL_KEYS = tuple(key for key in MEDIA_KEYS if key != "mm_token_type_ids")
#: the keys of a content item that hold a media reference (path, URL, bytes or frames)
MEDIA_ITEM_KEYS = ("image", "image_url", "video")
#: a content item's own size keys (Qwen-VL's): an exact size, or bounds on the area
ITEM_SIZE_KEYS = ("resized_height", "resized_width", "min_pixels", "max_pixels")
#: a video item's sampling keys passed to qwen-vl-utils (besides the size keys)
VIDEO_OPTION_KEYS = (*ITEM_SIZE_KEYS, "fps", "nframes", "min_frames", "max_frames", "video_start", "video_end",
                     "total_pixels")
#: images larger than this are skipped before decoding (an 81-megapixel PNG costs seconds and gigabytes)
MAX_SOURCE_PIXELS = 50_000_000


def _present(item: Mapping[str, Any], key: str) -> bool:
    """A key counts only when its value is not None (Arrow fills absent struct fields with None)."""
    return item.get(key) is not None


def item_kind(item: Any) -> str:
    """``"image"``, ``"video"`` or ``"text"`` for one content item (raises SampleSkipped otherwise)."""
    if not isinstance(item, Mapping):
        raise SampleSkipped(f"content item must be a dict, got {type(item).__name__}")
    kind = item.get("type")
    if kind in ("image", "image_url") or (kind is None and (_present(item, "image") or _present(item, "image_url"))):
        return "image"
    if kind == "video" or (kind is None and _present(item, "video")):
        return "video"
    if kind == "text" or (kind is None and _present(item, "text")):
        return "text"
    raise SampleSkipped(f"unknown content item type {kind!r} (expected image, video or text)")


def media_path(ref: str, root: Optional[str]) -> Path:
    """The local file a media path reference names: ``file://`` stripped, ``~`` expanded, relative to ``root``."""
    if ref.startswith("file://"):
        ref = ref[len("file://") :]
    path = Path(ref).expanduser()
    if not path.is_absolute() and root is not None:
        path = Path(root) / path
    return path


def _resolve_path(ref: str, image_root: Optional[str]) -> Path:
    if ref.startswith(("http://", "https://")):
        raise SampleSkipped(f"remote media are not supported (no network access in the collator): {ref!r}")
    return media_path(ref, image_root)


def load_image(ref: Any, image_root: Optional[str] = None):
    """Load one image reference into an RGB ``PIL.Image``.

    ``ref`` may be a PIL image, raw ``bytes``, a ``data:image/...;base64,`` URI, a path (absolute,
    ``file://``, or relative to ``image_root``), a numpy array, or a Hugging Face ``Image`` dict with
    ``bytes`` / ``path``. Raises :class:`SampleSkipped` with a readable reason when it cannot.
    """
    from PIL import Image

    if isinstance(ref, Image.Image):
        return ref.convert("RGB") if ref.mode != "RGB" else ref
    if isinstance(ref, Mapping):
        if ref.get("bytes") is not None:
            return load_image(ref["bytes"], image_root)
        if ref.get("path") is not None:
            return load_image(ref["path"], image_root)
        raise SampleSkipped(f"image dict has neither 'bytes' nor 'path': keys {sorted(ref)}")
    if isinstance(ref, (bytes, bytearray, memoryview)):
        try:
            img = Image.open(io.BytesIO(bytes(ref)))
            _check_source_pixels(img, "inline image")
            img.load()
        except SampleSkipped:
            raise
        except Exception as exc:  # PIL raises many types
            raise SampleSkipped(f"unreadable inline image bytes ({type(exc).__name__}: {exc})") from None
        return img.convert("RGB")
    if isinstance(ref, str):
        if ref.startswith("data:"):
            try:
                payload = ref.split(",", 1)[1]
                return load_image(base64.b64decode(payload), image_root)
            except (IndexError, ValueError):
                raise SampleSkipped("malformed data: URI image") from None
        path = _resolve_path(ref, image_root)
        if not path.is_file():
            raise SampleSkipped(f"image file not found: {str(path)!r}")
        try:
            with Image.open(path) as img:
                _check_source_pixels(img, f"image file {str(path)!r}")
                img.load()
                return img.convert("RGB")
        except SampleSkipped:
            raise
        except Exception as exc:
            raise SampleSkipped(f"unreadable image file {str(path)!r} ({type(exc).__name__}: {exc})") from None
    if hasattr(ref, "__array__"):
        try:
            import numpy as np

            return Image.fromarray(np.asarray(ref)).convert("RGB")
        except Exception as exc:
            raise SampleSkipped(f"image array could not be converted ({exc})") from None
    raise SampleSkipped(f"unsupported image reference of type {type(ref).__name__}")


def _check_source_pixels(img: Any, what: str) -> None:
    """Skip an image whose header announces more than :data:`MAX_SOURCE_PIXELS` pixels, before decoding it."""
    width, height = img.size
    if width * height > MAX_SOURCE_PIXELS:
        raise SampleSkipped(f"{what} is {width}x{height} = {width * height / 1e6:.0f} megapixels, above the "
                            f"{MAX_SOURCE_PIXELS / 1e6:.0f}-megapixel limit of the data loader (downscale it first)")


def _positive_int(item: Mapping[str, Any], key: str) -> Optional[int]:
    value = item.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0 or int(value) != value:
        raise SampleSkipped(f"{key} must be a positive integer, got {value!r}")
    return int(value)


def resize_to_item_limits(image: Any, item: Mapping[str, Any], factor: int) -> Any:
    """Apply a content item's own Qwen-VL size keys to one PIL image: ``resized_height`` + ``resized_width``
    (an exact size, rounded to ``factor``), else ``min_pixels`` / ``max_pixels`` (the area kept within those
    bounds, aspect ratio kept, sides multiples of ``factor`` = patch size x merge size). An item without these
    keys is returned unchanged: the processor then applies its own limits."""
    from qwen_vl_utils.vision_process import smart_resize

    limits = {key: _positive_int(item, key) for key in ITEM_SIZE_KEYS}
    if all(value is None for value in limits.values()):
        return image
    width, height = image.size
    try:
        if limits["resized_height"] is not None and limits["resized_width"] is not None:
            new_h, new_w = smart_resize(limits["resized_height"], limits["resized_width"], factor=factor)
        else:
            low = limits["min_pixels"] or factor * factor
            high = limits["max_pixels"] or max(width * height, low)
            if low > high:
                raise SampleSkipped(f"min_pixels {low} is above max_pixels {high}")
            new_h, new_w = smart_resize(height, width, factor=factor, min_pixels=low, max_pixels=high)
    except SampleSkipped:
        raise
    except ValueError as exc:  # e.g. an aspect ratio above Qwen-VL's 200:1
        raise SampleSkipped(f"cannot resize a {width}x{height} image to the item's limits: {exc}") from None
    return image if (new_w, new_h) == (width, height) else image.resize((new_w, new_h), resample=3)  # bicubic


def load_image_item(item: Mapping[str, Any], image_root: Optional[str], factor: int) -> Any:
    """The PIL image of an ``{"type": "image", "image" | "image_url": ...}`` content item, resized to the item's
    own size keys (see :func:`resize_to_item_limits`)."""
    ref = item.get("image") if _present(item, "image") else item.get("image_url")
    if isinstance(ref, Mapping) and "url" in ref:  # OpenAI-style {"image_url": {"url": ...}}
        ref = ref["url"]
    return resize_to_item_limits(load_image(ref, image_root), item, factor)


def load_video_item(item: Mapping[str, Any], image_root: Optional[str], patch_size: int,
                    factor: int) -> tuple[Any, Optional[dict[str, Any]]]:
    """A video content item as ``(video, metadata)``: a list of frames (each a PIL image, resized to the item's
    size keys; metadata ``None``), or a video file decoded by qwen-vl-utils (decord, or torchcodec when
    installed; frames sampled by the item's ``fps`` / ``nframes`` / ``video_start`` / ``video_end`` and sized by
    its pixel keys) as a ``[frames, 3, H, W]`` float tensor with its metadata (source fps, frame indices)."""
    ref = item.get("video")
    if isinstance(ref, (list, tuple)):
        if not ref:
            raise SampleSkipped("video has no frames")
        return [resize_to_item_limits(load_image(frame, image_root), item, factor) for frame in ref], None
    if not isinstance(ref, str):
        raise SampleSkipped(f"unsupported video reference of type {type(ref).__name__}")
    path = _resolve_path(ref, image_root)
    if not path.is_file():
        raise SampleSkipped(f"video file not found: {str(path)!r}")
    from qwen_vl_utils import fetch_video

    options = {key: item[key] for key in VIDEO_OPTION_KEYS if _present(item, key)}
    try:
        video, metadata = fetch_video({"video": str(path), **options}, image_patch_size=patch_size,
                                      return_video_metadata=True)
    except Exception as exc:  # decoder errors: not a video, truncated file, unsupported codec
        raise SampleSkipped(f"unreadable video file {str(path)!r} ({type(exc).__name__}: {exc})") from None
    return video, metadata


def processor_video_kwargs(metadata: Sequence[Optional[dict[str, Any]]]) -> dict[str, Any]:
    """Processor keyword arguments for videos loaded by :func:`load_video_item`: decoded files carry their
    sampling metadata (timestamps) and must not be sampled again; frame lists pass nothing."""
    if not metadata or all(m is None for m in metadata):
        return {}
    if any(m is None for m in metadata):
        raise SampleSkipped("a sample mixes video files and frame lists; use one kind per sample")
    return {"video_metadata": list(metadata), "do_sample_frames": False}
