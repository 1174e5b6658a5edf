"""Block-diffusion collator: chat records -> ``[prompt | clean response | noisy response]`` rows.

:class:`BardVLCollator` turns chat-format samples (the published record format)::

    {"messages": [{"role": "system" | "user" | "assistant",
                   "content": str | [{"type": "image", "image": path | PIL | bytes},
                                     {"type": "video", "video": path | [frames]},
                                     {"type": "text", "text": "..."}]}],
     "index": 17}                                       # optional, seeds the noise

into the tensors that :func:`nemo_automodel_bard.models.bard_vl.training.diffusion_training_loss`
consumes (docs/training_layout.md):

* prompt = the chat template applied to every message before the target assistant turn with
  ``add_generation_prompt=True`` (it ends with ``<|im_start|>assistant\\n``); images and videos
  are processed once, with the prompt only;
* response = the target turn's text + ``<|im_end|>``, right-padded with the block-padding token to a
  multiple of ``block_size``;
* noisy copy = the clean response corrupted block by block with stratified per-block levels, seeded
  by :func:`~nemo_automodel_bard.diffusion.noise.sample_generator` ``(seed, epoch, index)``;
* mRoPE positions from Qwen3-VL's own ``get_rope_index`` on ``prompt + clean``; the noisy copy reuses
  the clean copy's positions.

Example:
    >>> collator = BardVLCollator(processor=processor, block_size=4)              # doctest: +SKIP
    >>> batch = collator([{"messages": [...], "index": 0}])                       # doctest: +SKIP
    >>> loss, metrics = model.diffusion_loss(batch)                               # doctest: +SKIP

YAML (NeMo's loader resolves ``_target_``)::

    collate_fn:
      _target_: nemo_automodel_bard.data.collator.BardVLCollator
      processor_path: /models/bard-vl-4b
      block_size: 32
      max_length: 4096
"""

from __future__ import annotations

import base64
import io
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Mapping, Optional, Sequence, Union

import torch

from nemo_automodel_bard.diffusion.masks import PAD_DOC_ID, TokenType, sample_layout
from nemo_automodel_bard.diffusion.noise import (
    NoiseMode,
    corrupt_response,
    get_schedule,
    ordinary_token_ids,
    sample_block_levels,
    sample_generator,
)
from nemo_automodel_bard.diffusion.losses import REDUCTIONS

logger = logging.getLogger(__name__)

__all__ = ["BardVLCollator", "SampleSkipped", "load_image", "qwen3_vl_rope_index"]

_ROLES = ("system", "user", "assistant")
_PIXEL_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")
#: a content item's own size keys (Qwen-VL's): an exact size, or bounds on the area
ITEM_SIZE_KEYS = ("resized_height", "resized_width", "min_pixels", "max_pixels")
#: a video item's sampling keys passed to qwen-vl-utils (besides the size keys)
VIDEO_OPTION_KEYS = (*ITEM_SIZE_KEYS, "fps", "nframes", "min_frames", "max_frames", "video_start", "video_end",
                     "total_pixels")
#: images larger than this are skipped before decoding (an 81-megapixel PNG costs seconds and gigabytes)
MAX_SOURCE_PIXELS = 50_000_000
#: Qwen3-VL mask row, used when neither the tokenizer nor a config names a mask token.
_QWEN3_VL_MASK_TOKEN_ID = 151671


class SampleSkipped(Exception):
    """Internal signal: the current sample is unusable; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def answer_special_ids(tokenizer: Any, extra: Sequence[Optional[int]] = ()) -> torch.Tensor:
    """Ids that must never occur inside an answer's text: every special token of ``tokenizer`` (chat
    markers, vision placeholders, MASK, EOS, ...) plus ``extra``; sorted int64 ``[K]``."""
    ids = {int(i) for i in tokenizer.all_special_ids}
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    ids |= {int(i) for i, tok in decoder.items() if getattr(tok, "special", False)}
    ids |= {int(i) for i in extra if i is not None}
    return torch.tensor(sorted(ids), dtype=torch.int64)


def check_answer_tokens(response_ids: torch.Tensor, special_ids: torch.Tensor, tokenizer: Any, turn: int) -> None:
    """Raise :class:`SampleSkipped` when the tokenised answer text contains special tokens: a literal
    ``<|im_end|>`` or ``<|mask|>`` in an answer would be trained as a target (and a vision placeholder
    would break the row)."""
    found = torch.isin(response_ids, special_ids)
    if bool(found.any()):
        names = sorted({tokenizer.convert_ids_to_tokens(int(i)) for i in response_ids[found].unique()})
        raise SampleSkipped(f"assistant turn {turn} contains special token(s) {names} in its text")


def check_prompt_placeholders(text: str, processor: Any, num_images: int, num_videos: int) -> None:
    """Raise :class:`SampleSkipped` unless the rendered chat prompt holds exactly one image / video
    placeholder per image / video of the messages (a user who typed ``<|image_pad|>`` would otherwise
    make the processor fail or feed features to the wrong tokens)."""
    for token, count, name in ((getattr(processor, "image_token", "<|image_pad|>"), num_images, "image"),
                               (getattr(processor, "video_token", "<|video_pad|>"), num_videos, "video")):
        found = text.count(token) if token else 0
        if found != count:
            raise SampleSkipped(f"{name} placeholder/feature mismatch: the prompt text holds {found} {token!r} "
                                f"for {count} {name}(s) in the messages")


def check_media_placeholders(out: Mapping[str, Any], image_token_id: Optional[int], video_token_id: Optional[int],
                             num_images: int, num_videos: int, merge_size: int) -> None:
    """Raise :class:`SampleSkipped` unless the processor output has as many image / video placeholder
    tokens as features and one grid per image / video of the messages (a literal ``<|image_pad|>`` typed
    into a prompt, for example, breaks that)."""
    ids = out["input_ids"]
    merge = merge_size**2
    for token_id, grid_key, name, count in (
        (image_token_id, "image_grid_thw", "image", num_images),
        (video_token_id, "video_grid_thw", "video", num_videos),
    ):
        grid = out.get(grid_key)
        n_tokens = int((ids == token_id).sum()) if token_id is not None else 0
        n_feats = int((grid.prod(-1) // merge).sum()) if grid is not None else 0
        n_grids = int(grid.shape[0]) if grid is not None else 0
        if n_tokens != n_feats or n_grids != count:
            raise SampleSkipped(
                f"{name} placeholder/feature mismatch: {n_tokens} placeholder tokens, {n_feats} features, "
                f"{count} {name}s in the messages"
            )


# ------------------------------------------------------------------------------------------------ media


def _present(item: Mapping[str, Any], key: str) -> bool:
    """A key counts only when its value is not None (Arrow fills absent struct fields with None)."""
    return item.get(key) is not None


def _item_kind(item: Any) -> str:
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


def _resolve_path(ref: str, image_root: Optional[str]) -> Path:
    if ref.startswith(("http://", "https://")):
        raise SampleSkipped(f"remote media are not supported (no network access in the collator): {ref!r}")
    if ref.startswith("file://"):
        ref = ref[len("file://") :]
    path = Path(ref).expanduser()
    if not path.is_absolute() and image_root is not None:
        path = Path(image_root) / path
    return path


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


# ------------------------------------------------------------------------------------------------ rope


class _RopeIndexer:
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
    return _RopeIndexer(spatial_merge_size)(input_ids, mm_token_type_ids, image_grid_thw, video_grid_thw)


# ------------------------------------------------------------------------------------------------ samples


@dataclass
class _Prepared:
    """One training sample (one target assistant turn) before it is placed into a row."""

    index: int
    turn: int
    input_ids: torch.Tensor  # [P + 2R]
    position_ids: torch.Tensor  # [3, P + 2R]
    token_type: torch.Tensor  # [P + 2R]
    block_ids: torch.Tensor  # [P + 2R]
    mm_token_type_ids: torch.Tensor  # [P + 2R]
    loss_offsets: torch.Tensor  # [m] offsets into the sample
    loss_targets: torch.Tensor  # [m]
    loss_weights: torch.Tensor  # [m]
    loss_is_block_pad: torch.Tensor  # [m] bool: target is block padding after the response's end
    normalizer: int  # R per noisy copy (R, or 2R with complementary masking)
    levels: torch.Tensor  # [N] (with complementary masking [2N]: t, then 1 - t)
    num_corrupted: int
    truncated: bool
    pixels: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def length(self) -> int:
        return int(self.input_ids.numel())


class BardVLCollator:
    """Collate chat records into block-diffusion training batches.

    Args:
        processor: a Qwen3-VL processor object (tokenizer + image/video processors + chat template).
        processor_path: alternatively a directory / hub id loaded with ``AutoProcessor.from_pretrained``.
        block_size: diffusion block size ``B``.
        noise_mode: ``"mask"``, ``"uniform"`` or ``"mix"`` (:class:`~nemo_automodel_bard.diffusion.NoiseMode`).
        schedule: noise schedule name (``"linear"``, ``"cosine"``, ``"polynomial"``).
        max_length: longest row; longer samples have their response cut to whole blocks (at least one),
            samples whose prompt cannot fit with one block are skipped. ``None``: no limit.
        mask_token_id: MASK id; default the tokenizer's mask token, else ``mask_token_id`` of the
            ``config.json`` next to ``processor_path``, else Qwen3-VL's 151671 (if the vocabulary has it).
        pad_block_token_id: block-padding token; default ``<|im_end|>``.
        legacy_clean_sees_noisy: stored in the batch for the loss (published mask rule; default off).
        seed: noise seed (with the epoch and each sample's ``index``).
        strict: raise ``ValueError`` (naming the sample index and reason) instead of skipping bad samples.
        image_root: directory that relative image / video paths are resolved against.
        train_all_turns: one sample per assistant turn (its prompt = everything before that turn)
            instead of only the last assistant turn.
        pack: place several samples per row (first fit, up to ``max_length``; needs ``max_length``);
            samples never attend to each other (separate doc ids) and keep their own block numbering.
        loss_reduction: stored in the batch as ``loss_reduction`` (see ``diffusion_ce_loss``).
        pad_weight: loss weight factor at block-padding targets (0.5 as published).
        complementary: complementary masking (mask noise, linear schedule): a second noisy copy is appended
            to each row whose masked positions are exactly the ones the first copy kept (its blocks at
            levels ``1 - t``), so every response token is a loss position in every step; the two copies share
            prompt, clean context and positions and never see each other. The per-sample loss is the mean of
            the two copies' ELBO estimates (normaliser ``2R``).
        max_loss_weight: cap of the per-block ELBO weight ``1/t`` (``None``: uncapped, as published). With
            levels down to 1e-3 one token can weigh 1000x another and hold half a batch's loss; a cap such
            as 10 trades the exact ELBO for a lower-variance gradient.
        substitution_vocab_limit: random substitution draws ids below this (default: the smallest
            added/special token id of the tokenizer, e.g. 151643 for Qwen3-VL); special ids are excluded.
        pad_to_multiple_of: round the row length up to a multiple of this (e.g. 128 for FlexAttention).

    ``__call__(samples) -> dict`` -- see :meth:`__call__` for the keys and shapes.

    Noise determinism: a sample's corruption depends only on ``(seed, epoch, index)`` (and, with
    ``train_all_turns``, on the turn order inside the record), never on the other samples of the
    batch. Records without an ``index`` key get a running counter of this collator instance, which
    is *not* stable across dataloader workers or restarts -- datasets should provide ``index``
    (:class:`~nemo_automodel_bard.data.chat_dataset.ChatDataset` does). With dataloader workers,
    call :meth:`set_epoch` before the epoch's iterator is created (non-persistent workers copy the
    collator when they start).
    """

    def __init__(
        self,
        processor: Any = None,
        block_size: int = 32,
        noise_mode: Union[str, NoiseMode] = "mask",
        schedule: str = "linear",
        max_length: Optional[int] = None,
        mask_token_id: Optional[int] = None,
        pad_block_token_id: Optional[int] = None,
        legacy_clean_sees_noisy: bool = False,
        seed: int = 0,
        strict: bool = False,
        image_root: Optional[str] = None,
        train_all_turns: bool = False,
        pack: bool = False,
        loss_reduction: str = "sample_mean",
        *,
        processor_path: Optional[str] = None,
        pad_weight: float = 0.5,
        max_loss_weight: Optional[float] = None,
        complementary: bool = False,
        substitution_vocab_limit: Optional[int] = None,
        pad_to_multiple_of: int = 1,
    ) -> None:
        if processor is None and processor_path is None:
            raise ValueError("BardVLCollator needs `processor` (a Qwen3-VL processor) or `processor_path`")
        if isinstance(processor, (str, os.PathLike)):
            processor_path, processor = str(processor), None
        if processor is None:
            import nemo_automodel_bard.models.bard_vl  # noqa: F401 - registers bard_vl with AutoProcessor
            from transformers import AutoProcessor

            processor = AutoProcessor.from_pretrained(processor_path)
        tokenizer = getattr(processor, "tokenizer", None)
        if tokenizer is None:
            raise ValueError(f"processor {type(processor).__name__} has no tokenizer")
        if not isinstance(block_size, int) or block_size <= 0:
            raise ValueError(f"block_size must be a positive int, got {block_size!r}")
        if max_length is not None and (not isinstance(max_length, int) or max_length < 2 * block_size + 1):
            raise ValueError(f"max_length must be an int >= 2 * block_size + 1 = {2 * block_size + 1}, got {max_length!r}")
        if pack and max_length is None:
            raise ValueError("pack=True needs max_length (the packed row length)")
        if loss_reduction not in REDUCTIONS:
            raise ValueError(f"unknown loss_reduction {loss_reduction!r}; valid: {', '.join(REDUCTIONS)}")
        if max_loss_weight is not None and not (isinstance(max_loss_weight, (int, float)) and max_loss_weight > 0):
            raise ValueError(f"max_loss_weight must be a positive number or None, got {max_loss_weight!r}")
        if pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be >= 1, got {pad_to_multiple_of}")

        self.processor = processor
        self.tokenizer = tokenizer
        self.processor_path = processor_path
        self.block_size = block_size
        self.noise_mode = NoiseMode(noise_mode)
        self.schedule = get_schedule(schedule)
        self.max_length = max_length
        self.legacy_clean_sees_noisy = bool(legacy_clean_sees_noisy)
        self.seed = int(seed)
        self.strict = bool(strict)
        self.image_root = str(image_root) if image_root is not None else None
        self.train_all_turns = bool(train_all_turns)
        self.pack = bool(pack)
        self.loss_reduction = loss_reduction
        self.pad_weight = float(pad_weight)
        self.max_loss_weight = None if max_loss_weight is None else float(max_loss_weight)
        self.complementary = bool(complementary)
        if self.complementary and (self.noise_mode is not NoiseMode.MASK or schedule != "linear"):
            raise ValueError("complementary=True needs noise_mode='mask' and schedule='linear' (the complement of a "
                             f"masked copy is defined for mask noise only); got {self.noise_mode.value!r}, {schedule!r}")
        if self.complementary and self.legacy_clean_sees_noisy:
            raise ValueError("complementary=True cannot be combined with legacy_clean_sees_noisy=True")
        self.pad_to_multiple_of = int(pad_to_multiple_of)
        self.epoch = 0
        self._counter = 0

        self.im_end_id = self._token_id("<|im_end|>", fallback=tokenizer.eos_token_id)
        self.pad_block_token_id = int(pad_block_token_id) if pad_block_token_id is not None else self.im_end_id
        pad_id = tokenizer.pad_token_id
        self.pad_token_id = int(pad_id) if pad_id is not None else self.im_end_id
        self.mask_token_id = self._resolve_mask_token_id(mask_token_id)
        self.image_token_id = self._token_id("<|image_pad|>", getattr(processor, "image_token_id", None))
        self.video_token_id = self._token_id("<|video_pad|>", getattr(processor, "video_token_id", None))
        vision_ids = {
            self.image_token_id,
            self.video_token_id,
            self._token_id("<|vision_start|>", None),
            self._token_id("<|vision_end|>", None),
        }
        self._vision_ids = torch.tensor(sorted(i for i in vision_ids if i is not None), dtype=torch.int64)
        self._answer_special_ids = answer_special_ids(
            tokenizer, [*vision_ids, self.mask_token_id, self.im_end_id, self.pad_block_token_id])
        image_processor = getattr(processor, "image_processor", None)
        self.spatial_merge_size = int(getattr(image_processor, "merge_size", 2) or 2)
        self._patch_size = int(getattr(image_processor, "patch_size", 16) or 16)
        self._media_factor = self._patch_size * self.spatial_merge_size
        self._rope = _RopeIndexer(self.spatial_merge_size)

        self.substitution_ids: Optional[torch.Tensor] = None
        if self.noise_mode is not NoiseMode.MASK:
            limit = substitution_vocab_limit if substitution_vocab_limit is not None else self._first_special_id()
            exclude = set(tokenizer.all_special_ids) | {self.mask_token_id, self.pad_block_token_id} | set(
                self._vision_ids.tolist()
            )
            self.substitution_ids = ordinary_token_ids(int(limit), exclude=sorted(exclude))
            if self.substitution_ids.numel() == 0:
                raise ValueError(f"no ordinary token ids below {limit} for random substitution")

    # ------------------------------------------------------------------ setup helpers
    def _token_id(self, token: str, fallback: Optional[int]) -> Optional[int]:
        tok = self.tokenizer
        tid = tok.convert_tokens_to_ids(token)
        if tid is None or (tok.unk_token_id is not None and tid == tok.unk_token_id and token != tok.unk_token):
            return int(fallback) if fallback is not None else None
        return int(tid)

    def _first_special_id(self) -> int:
        decoder = getattr(self.tokenizer, "added_tokens_decoder", None) or {}
        ids = [int(i) for i, tok in decoder.items() if getattr(tok, "special", True)]
        ids += [int(i) for i in self.tokenizer.all_special_ids]
        return min(ids) if ids else len(self.tokenizer)

    def _resolve_mask_token_id(self, given: Optional[int]) -> int:
        if given is not None:
            return int(given)
        mask = getattr(self.tokenizer, "mask_token_id", None)
        if mask is not None:
            return int(mask)
        if self.processor_path is not None:
            cfg = Path(self.processor_path) / "config.json"
            if cfg.is_file():
                value = json.loads(cfg.read_text()).get("mask_token_id")
                if value is not None:
                    return int(value)
        if len(self.tokenizer) > _QWEN3_VL_MASK_TOKEN_ID or getattr(self.tokenizer, "vocab_size", 0) > 151600:
            return _QWEN3_VL_MASK_TOKEN_ID
        raise ValueError(
            "could not determine the MASK token id: the tokenizer has no mask token; pass mask_token_id= "
            "(151671 for the Qwen3-VL vocabulary)"
        )

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch that seeds the noise (``sample_generator(seed, epoch, index)``)."""
        self.epoch = int(epoch)

    def __repr__(self) -> str:
        return (
            f"BardVLCollator(block_size={self.block_size}, noise_mode={self.noise_mode.value!r}, "
            f"schedule={self.schedule.name!r}, max_length={self.max_length}, pack={self.pack}, "
            f"train_all_turns={self.train_all_turns}, seed={self.seed})"
        )

    # ------------------------------------------------------------------ per sample
    def _validate_messages(self, sample: Any) -> list[dict]:
        if not isinstance(sample, Mapping):
            raise SampleSkipped(f"sample must be a dict with 'messages', got {type(sample).__name__}")
        if sample.get("error") is not None:  # a record the dataset could not parse
            raise SampleSkipped(str(sample["error"]))
        messages = sample.get("messages")
        if not isinstance(messages, (list, tuple)) or not messages:
            raise SampleSkipped("missing or empty 'messages' list")
        for i, msg in enumerate(messages):
            if not isinstance(msg, Mapping):
                raise SampleSkipped(f"message {i} is not a dict")
            if msg.get("role") not in _ROLES:
                raise SampleSkipped(f"message {i} has role {msg.get('role')!r}; expected one of {_ROLES}")
            content = msg.get("content")
            if not isinstance(content, (str, list, tuple)):
                raise SampleSkipped(f"message {i} content must be a string or a list, got {type(content).__name__}")
            if not isinstance(content, str):
                for item in content:
                    _item_kind(item)
        return list(messages)

    def _response_text(self, message: Mapping[str, Any], turn: int) -> str:
        content = message["content"]
        if isinstance(content, str):
            text = content
        else:
            parts = []
            for item in content:
                kind = _item_kind(item)
                if kind != "text":
                    raise SampleSkipped(f"assistant turn {turn} contains a {kind}; only text responses are trained")
                parts.append(str(item.get("text") or ""))
            text = "".join(parts)
        if not text.strip():
            raise SampleSkipped(f"empty response in assistant turn {turn}")
        return text

    def _prompt_inputs(self, messages: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        """Render and process the prompt (every image/video processed once). Returns the processor
        output: ``input_ids [1, P]``, ``mm_token_type_ids [1, P]`` and the pixel inputs."""
        rendered, images, videos, video_metadata = [], [], [], []
        for msg in messages:
            content = msg["content"]
            if isinstance(content, str):
                rendered.append({"role": msg["role"], "content": content})
                continue
            items = []
            for item in content:
                kind = _item_kind(item)
                if kind == "image":
                    images.append(load_image_item(item, self.image_root, self._media_factor))
                    items.append({"type": "image"})
                elif kind == "video":
                    video, metadata = load_video_item(item, self.image_root, self._patch_size, self._media_factor)
                    videos.append(video)
                    video_metadata.append(metadata)
                    items.append({"type": "video"})
                else:
                    items.append({"type": "text", "text": str(item.get("text") or "")})
            rendered.append({"role": msg["role"], "content": items})
        template_owner = self.processor if getattr(self.processor, "chat_template", None) else self.tokenizer
        text = template_owner.apply_chat_template(rendered, tokenize=False, add_generation_prompt=True)
        if videos and getattr(self.processor, "video_processor", None) is None:
            raise SampleSkipped("sample has a video but the processor has no video processor")
        check_prompt_placeholders(text, self.processor, len(images), len(videos))
        try:
            out = self.processor(
                text=[text],
                images=images or None,
                videos=videos or None,
                return_tensors="pt",
                **processor_video_kwargs(video_metadata),
            )
        except SampleSkipped:
            raise
        except Exception as exc:  # processor errors: placeholder count mismatches, undecodable videos, ...
            raise SampleSkipped(f"processor failed: {type(exc).__name__}: {exc}") from None
        check_media_placeholders(out, self.image_token_id, self.video_token_id, len(images), len(videos),
                                 self.spatial_merge_size)
        ids = out["input_ids"]
        if out.get("mm_token_type_ids") is None:
            mm = torch.zeros_like(ids)
            if self.image_token_id is not None:
                mm[ids == self.image_token_id] = 1
            if self.video_token_id is not None:
                mm[ids == self.video_token_id] = 2
            out["mm_token_type_ids"] = mm
        return out

    def _prepare_turn(
        self, messages: list[dict], turn: int, index: int, generator: torch.Generator
    ) -> _Prepared:
        B = self.block_size
        text = self._response_text(messages[turn], turn)
        response = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        check_answer_tokens(torch.tensor(list(response), dtype=torch.int64), self._answer_special_ids,
                            self.tokenizer, turn)
        response = torch.tensor(list(response) + [self.im_end_id], dtype=torch.int64)
        true_len = response.numel()
        padded_len = math.ceil(true_len / B) * B
        clean = torch.cat([response, response.new_full((padded_len - true_len,), self.pad_block_token_id)])
        is_pad = torch.arange(padded_len) >= true_len

        prompt = self._prompt_inputs(messages[:turn])
        prompt_ids = prompt["input_ids"][0].to(torch.int64)
        prompt_mm = prompt["mm_token_type_ids"][0].to(torch.int64)
        P = prompt_ids.numel()

        truncated = False
        copies = 3 if self.complementary else 2  # clean + noisy (+ complement)
        if self.max_length is not None and P + copies * padded_len > self.max_length:
            blocks = (self.max_length - P) // (copies * B)
            if blocks < 1:
                raise SampleSkipped(
                    f"too long: prompt of {P} tokens (images included) + {copies} x one block of {B} exceeds "
                    f"max_length={self.max_length}"
                )
            padded_len = blocks * B
            clean, is_pad = clean[:padded_len], is_pad[:padded_len]
            truncated = True
        R = padded_len
        N = R // B

        levels, block_weights = sample_block_levels(N, generator, self.schedule)
        if self.max_loss_weight is not None:
            block_weights = block_weights.clamp(max=self.max_loss_weight)
        noisy, corrupted = corrupt_response(
            clean, B, levels, self.noise_mode, self.mask_token_id, self.substitution_ids, generator
        )

        context_ids = torch.cat([prompt_ids, clean])
        context_mm = torch.cat([prompt_mm, torch.zeros(R, dtype=torch.int64)])
        pos = self._rope(
            context_ids[None],
            context_mm[None],
            prompt.get("image_grid_thw"),
            prompt.get("video_grid_thw"),
        )[:, 0]  # [3, P + R]
        token_type, block_ids = sample_layout(P, R, B, complementary=self.complementary)
        # every noisy copy: (tokens [R], corrupted [R], per-block ELBO weights [N]); each reuses the clean positions
        noisy_copies = [(noisy.to(torch.int64), corrupted, block_weights)]
        if self.complementary:
            complement = torch.where(corrupted, clean, torch.full_like(clean, self.mask_token_id))
            complement_weights = 1.0 / (1.0 - levels).clamp_min(1e-3)  # linear schedule at level 1 - t
            if self.max_loss_weight is not None:
                complement_weights = complement_weights.clamp(max=self.max_loss_weight)
            noisy_copies.append((complement, ~corrupted, complement_weights))
            levels = torch.cat([levels, 1.0 - levels])
        position_ids = torch.cat([pos] + [pos[:, P:]] * len(noisy_copies), dim=1)

        offsets, targets, weights, block_pad = [], [], [], []
        for c, (_, copy_corrupted, copy_block_weights) in enumerate(noisy_copies):
            noisy_offsets = torch.nonzero(copy_corrupted).reshape(-1)
            w = copy_block_weights.repeat_interleave(B)[noisy_offsets]
            w = torch.where(is_pad[noisy_offsets], w * self.pad_weight, w)
            offsets.append(P + (c + 1) * R + noisy_offsets)
            targets.append(clean[noisy_offsets])
            weights.append(w)
            block_pad.append(is_pad[noisy_offsets])
        pixels = {k: prompt[k] for k in _PIXEL_KEYS if prompt.get(k) is not None}
        return _Prepared(
            index=index,
            turn=turn,
            input_ids=torch.cat([context_ids] + [tokens for tokens, _, _ in noisy_copies]),
            position_ids=position_ids.to(torch.int64),
            token_type=token_type,
            block_ids=block_ids,
            mm_token_type_ids=torch.cat([context_mm] + [torch.zeros(R, dtype=torch.int64)] * len(noisy_copies)),
            loss_offsets=torch.cat(offsets),
            loss_targets=torch.cat(targets),
            loss_weights=torch.cat(weights).to(torch.float32),
            loss_is_block_pad=torch.cat(block_pad),
            normalizer=R * len(noisy_copies),
            levels=levels,
            num_corrupted=int(sum(int(c.sum()) for _, c, _ in noisy_copies)),
            truncated=truncated,
            pixels=pixels,
        )

    def _prepare(self, sample: Any) -> tuple[int, list[_Prepared], list[tuple[int, str]]]:
        """All training samples of one record, plus the (index, reason) of every part skipped."""
        index = sample.get("index") if isinstance(sample, Mapping) else None
        if index is None:
            index = self._counter
            self._counter += 1
        else:
            index = int(index)
        skipped: list[tuple[int, str]] = []
        try:
            messages = self._validate_messages(sample)
            turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
            if not turns:
                raise SampleSkipped("no assistant turn")
            if not self.train_all_turns:
                turns = turns[-1:]
        except SampleSkipped as exc:
            return index, [], [(index, exc.reason)]
        # a stream without epochs (data/energon.py) numbers its own passes over the data in "noise_epoch"
        pass_number = sample.get("noise_epoch") if isinstance(sample, Mapping) else None
        generator = sample_generator(self.seed, self.epoch if pass_number is None else int(pass_number), index)
        prepared = []
        for turn in turns:
            try:
                prepared.append(self._prepare_turn(messages, turn, index, generator))
            except SampleSkipped as exc:
                reason = exc.reason if len(turns) == 1 else f"assistant turn {turn}: {exc.reason}"
                skipped.append((index, reason))
        return index, prepared, skipped

    # ------------------------------------------------------------------ batch
    def _rows(self, prepared: list[_Prepared]) -> list[list[_Prepared]]:
        if not self.pack:
            return [[p] for p in prepared]
        rows: list[list[_Prepared]] = []
        used: list[int] = []
        for p in prepared:  # first fit in arrival order
            for r, n in enumerate(used):
                if n + p.length <= self.max_length:
                    rows[r].append(p)
                    used[r] += p.length
                    break
            else:
                rows.append([p])
                used.append(p.length)
        return rows

    def __call__(self, samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """Collate chat records into one batch.

        Returns (``b`` rows of length ``L``; ``n`` training samples; ``M`` loss positions; ``K`` blocks):

        * ``input_ids`` ``[b, L]`` int64 (row padding: the tokenizer's pad id);
        * ``position_ids`` ``[3, b, L]`` int64 (noisy copy = clean copy's positions; padding 0);
        * ``token_type`` / ``block_ids`` / ``doc_ids`` ``[b, L]`` int64 -- inputs of
          :mod:`nemo_automodel_bard.diffusion.masks` (padding: ``TokenType.PAD`` / 0 / -1);
        * ``mm_token_type_ids`` ``[b, L]`` int64 (1 image / 2 video placeholder, 0 elsewhere);
        * ``loss_positions`` ``[M]`` flat indices into ``b * L`` of the corrupted noisy tokens,
          ``loss_targets`` ``[M]`` clean tokens there (unshifted), ``loss_weights`` ``[M]`` fp32
          (schedule ELBO weight, x ``pad_weight`` at block-padding targets), ``loss_sample_index`` ``[M]``,
          ``loss_is_block_pad`` ``[M]`` bool (the target is block padding after the response's end);
        * ``loss_normalizer`` ``[n]`` fp32 noisy-region length of each sample;
        * ``noise_levels`` ``[K]`` fp32 corruption level of every response block, with
          ``noise_levels_sample_index`` ``[K]``; ``mask_fraction`` fp32 scalar (corrupted / noisy tokens);
        * ``sample_indices`` ``[n]`` int64 dataset index of each sample (row-major order);
        * ``num_samples``, ``num_skipped``, ``num_truncated`` (ints), ``skipped`` list of ``(index, reason)``;
        * ``loss_reduction`` (str), ``legacy_clean_sees_noisy`` (bool);
        * ``pixel_values`` / ``image_grid_thw`` / ``pixel_values_videos`` / ``video_grid_thw`` concatenated
          over the samples in row-major order (present only when some sample has images / videos).

        Raises:
            ValueError: with ``strict=True``, on the first bad sample (naming its index and reason).
        """
        if isinstance(samples, Mapping):
            samples = [samples]
        prepared: list[_Prepared] = []
        skipped: list[tuple[int, str]] = []
        for sample in samples:
            _, parts, bad = self._prepare(sample)
            if bad and self.strict:
                index, reason = bad[0]
                raise ValueError(f"sample {index}: {reason}")
            for index, reason in bad:
                logger.warning("BardVLCollator: skipping sample %s: %s", index, reason)
            prepared.extend(parts)
            skipped.extend(bad)
        return self._assemble(self._rows(prepared), skipped)

    def _assemble(self, rows: list[list[_Prepared]], skipped: list[tuple[int, str]]) -> dict[str, Any]:
        b = len(rows)
        L = max((sum(p.length for p in row) for row in rows), default=0)
        L = -(-L // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((b, L), self.pad_token_id, dtype=torch.int64)
        position_ids = torch.zeros((3, b, L), dtype=torch.int64)
        token_type = torch.full((b, L), int(TokenType.PAD), dtype=torch.int64)
        block_ids = torch.zeros((b, L), dtype=torch.int64)
        doc_ids = torch.full((b, L), PAD_DOC_ID, dtype=torch.int64)
        mm_token_type_ids = torch.zeros((b, L), dtype=torch.int64)

        positions, targets, weights, owner, block_pad = [], [], [], [], []
        normalizer, levels, level_owner, indices = [], [], [], []
        pixels: dict[str, list[torch.Tensor]] = {k: [] for k in _PIXEL_KEYS}
        corrupted = noisy_total = truncated = 0
        n = 0
        for r, row in enumerate(rows):
            offset = 0
            for doc, p in enumerate(row):
                span = slice(offset, offset + p.length)
                input_ids[r, span] = p.input_ids
                position_ids[:, r, span] = p.position_ids
                token_type[r, span] = p.token_type
                block_ids[r, span] = p.block_ids
                doc_ids[r, span] = doc
                mm_token_type_ids[r, span] = p.mm_token_type_ids
                positions.append(r * L + offset + p.loss_offsets)
                targets.append(p.loss_targets)
                weights.append(p.loss_weights)
                block_pad.append(p.loss_is_block_pad)
                owner.append(torch.full_like(p.loss_offsets, n))
                normalizer.append(p.normalizer)
                levels.append(p.levels)
                level_owner.append(torch.full((p.levels.numel(),), n, dtype=torch.int64))
                indices.append(p.index)
                for key, value in p.pixels.items():
                    pixels[key].append(value)
                corrupted += p.num_corrupted
                noisy_total += p.normalizer
                truncated += int(p.truncated)
                offset += p.length
                n += 1

        def cat(parts: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
            return torch.cat(parts).to(dtype) if parts else torch.zeros(0, dtype=dtype)

        batch: dict[str, Any] = {
            "input_ids": input_ids,
            "position_ids": position_ids,
            "token_type": token_type,
            "block_ids": block_ids,
            "doc_ids": doc_ids,
            "mm_token_type_ids": mm_token_type_ids,
            "loss_positions": cat(positions, torch.int64),
            "loss_targets": cat(targets, torch.int64),
            "loss_weights": cat(weights, torch.float32),
            "loss_sample_index": cat(owner, torch.int64),
            "loss_is_block_pad": cat(block_pad, torch.bool),
            "loss_normalizer": torch.tensor(normalizer, dtype=torch.float32),
            "noise_levels": cat(levels, torch.float32),
            "noise_levels_sample_index": cat(level_owner, torch.int64),
            "mask_fraction": torch.tensor(corrupted / noisy_total if noisy_total else 0.0, dtype=torch.float32),
            "sample_indices": torch.tensor(indices, dtype=torch.int64),
            "num_samples": n,
            "num_skipped": len(skipped),
            "num_truncated": truncated,
            "skipped": skipped,
            "loss_reduction": self.loss_reduction,
            "legacy_clean_sees_noisy": self.legacy_clean_sees_noisy,
        }
        for key, parts in pixels.items():
            if parts:
                batch[key] = torch.cat(parts, dim=0)
        return batch
