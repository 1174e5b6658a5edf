"""NeMo calling-convention adapters for the Bard-VL collators, plus the "dummy media" fix for FSDP.

NeMo's VLM recipe calls a configured collator as ``collate_fn(examples, processor=processor,
**yaml_kwargs)`` once per batch. :func:`bard_collate_fn` (block diffusion) and :func:`ar_collate_fn`
(autoregressive) have that signature; each builds its collator object once per
``(processor, kwargs)`` and reuses it. The recipes replace the bound function by that object after
``setup()`` so that NeMo's ``StepScheduler.set_epoch`` reaches the collator (the diffusion noise is
seeded by ``(seed, epoch, sample index)``).

**Dummy media.** Under FSDP the vision tower's parameters are all-gathered inside its forward, so
every rank must run it in every micro-batch, the same number of times. A micro-batch without any
image (text-only chat data) would skip it on one rank only and the collectives stop matching (gloo:
"Received data size doesn't match expected size"; NCCL: a hang). With ``ensure_image=True``
(default) an image-free batch gets one blank 32x32 image (a single LLM token) appended at the tail
of row 0 as a separate document: no real token attends to it, it carries no loss, so loss and
gradients are unchanged (the vision tower simply gets a zero gradient). Qwen3-VL runs the vision
tower once for images and once more for videos; for data that mixes videos and images, set
``ensure_video=True`` so that every batch also carries a (dummy) video.

YAML::

    dataloader:
      _target_: torchdata.stateful_dataloader.StatefulDataLoader
      collate_fn:
        _target_: nemo_automodel_bard.recipes.collate.bard_collate_fn
        block_size: 4            # any BardVLCollator argument
        max_length: 1024
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Mapping, Optional, Sequence

import torch

from nemo_automodel_bard.data.ar_collator import ARChatCollator, append_tail_tokens
from nemo_automodel_bard.data.collator import BardVLCollator
from nemo_automodel_bard.data.rope import qwen3_vl_rope_index
from nemo_automodel_bard.diffusion.masks import PAD_DOC_ID, TokenType

logger = logging.getLogger(__name__)

__all__ = [
    "NemoARCollate",
    "NemoDiffusionCollate",
    "DummyMedia",
    "ar_collate_fn",
    "bard_collate_fn",
    "resolve_collate",
]

_DUMMY_DOC_OFFSET = 1


class DummyMedia:
    """A blank image / two-frame video in the processor's own format, and its placeholder tokens.

    ``image()`` / ``video()`` return ``(input_ids [D], mm_token_type_ids [D], position_ids [3, D],
    pixel inputs)`` for ``<|vision_start|> <pad> x n <|vision_end|>``.
    """

    def __init__(self, processor: Any, size: int = 32) -> None:
        self.processor = processor
        self.size = int(size)
        tok = processor.tokenizer
        self.vision_start = tok.convert_tokens_to_ids("<|vision_start|>")
        self.vision_end = tok.convert_tokens_to_ids("<|vision_end|>")
        self.image_token = getattr(processor, "image_token_id", None) or tok.convert_tokens_to_ids("<|image_pad|>")
        self.video_token = getattr(processor, "video_token_id", None) or tok.convert_tokens_to_ids("<|video_pad|>")
        self.merge = int(getattr(processor.image_processor, "merge_size", 2) or 2)

    def _sequence(self, pad_id: int, grid: torch.Tensor, kind: int, key: str) -> tuple:
        n = int(grid.prod()) // (self.merge**2)
        ids = torch.tensor([self.vision_start] + [pad_id] * n + [self.vision_end], dtype=torch.int64)
        mm = torch.tensor([0] + [kind] * n + [0], dtype=torch.int64)
        kwargs = {"image_grid_thw": grid[None]} if key == "image" else {"video_grid_thw": grid[None]}
        pos = qwen3_vl_rope_index(ids[None], mm[None], spatial_merge_size=self.merge, **kwargs)[:, 0]
        return ids, mm, pos

    @functools.cached_property
    def _image(self) -> tuple:
        from PIL import Image

        out = self.processor.image_processor(images=[Image.new("RGB", (self.size, self.size))], return_tensors="pt")
        grid = out["image_grid_thw"][0].to(torch.int64)
        ids, mm, pos = self._sequence(self.image_token, grid, 1, "image")
        return ids, mm, pos, {"pixel_values": out["pixel_values"], "image_grid_thw": grid[None]}

    @functools.cached_property
    def _video(self) -> tuple:
        import numpy as np

        video_processor = getattr(self.processor, "video_processor", None)
        if video_processor is None:
            raise ValueError("ensure_video=True needs a processor with a video processor")
        frames = np.zeros((2, self.size, self.size, 3), dtype=np.uint8)
        out = video_processor(videos=[frames], return_tensors="pt", do_sample_frames=False)
        grid = out["video_grid_thw"][0].to(torch.int64)
        ids, mm, pos = self._sequence(self.video_token, grid, 2, "video")
        return ids, mm, pos, {"pixel_values_videos": out["pixel_values_videos"], "video_grid_thw": grid[None]}

    def image(self) -> tuple:
        return self._image

    def video(self) -> tuple:
        return self._video


def _needed(batch: Mapping[str, Any], ensure_image: bool, ensure_video: bool, dummy: DummyMedia) -> list[tuple]:
    parts = []
    if ensure_image and batch.get("pixel_values") is None:
        parts.append(dummy.image())
    if ensure_video and batch.get("pixel_values_videos") is None:
        parts.append(dummy.video())
    return parts


def _widen(t: torch.Tensor, extra: int, fill: int) -> torch.Tensor:
    """Append ``extra`` columns filled with ``fill`` along the last dimension."""
    pad = t.new_full((*t.shape[:-1], extra), fill)
    return torch.cat([t, pad], dim=-1)


def _add_pixels(batch: dict, parts: list[tuple]) -> None:
    for *_, pixels in parts:
        for key, value in pixels.items():
            batch[key] = value.to(torch.float32) if value.is_floating_point() else value


def add_dummy_media_diffusion(batch: dict, parts: list[tuple], pad_token_id: int) -> dict:
    """Append dummy media (from :class:`DummyMedia`) to row 0 of a :class:`BardVLCollator` batch.

    The dummy tokens form their own document (PROMPT tokens, block 0), so no real token sees them and
    they see nothing else; loss positions are re-indexed to the wider rows.
    """
    if not parts:
        return batch
    ids = torch.cat([p[0] for p in parts])
    mm = torch.cat([p[1] for p in parts])
    pos = torch.cat([p[2] for p in parts], dim=1)
    D = int(ids.numel())
    out = dict(batch)
    b, L = batch["input_ids"].shape if batch["input_ids"].dim() == 2 else (0, 0)
    if b == 0:  # every sample was skipped: one row holding only the dummy media (no loss positions)
        b, L = 1, 0
        out["input_ids"] = torch.zeros((1, 0), dtype=torch.int64)
        out["position_ids"] = torch.zeros((3, 1, 0), dtype=torch.int64)
        out["token_type"] = torch.zeros((1, 0), dtype=torch.int64)
        out["block_ids"] = torch.zeros((1, 0), dtype=torch.int64)
        out["doc_ids"] = torch.zeros((1, 0), dtype=torch.int64)
        out["mm_token_type_ids"] = torch.zeros((1, 0), dtype=torch.int64)
    doc = int(out["doc_ids"].max()) + _DUMMY_DOC_OFFSET if out["doc_ids"].numel() else 0
    out["input_ids"] = _widen(out["input_ids"], D, pad_token_id)
    out["position_ids"] = _widen(out["position_ids"], D, 0)
    out["token_type"] = _widen(out["token_type"], D, int(TokenType.PAD))
    out["block_ids"] = _widen(out["block_ids"], D, 0)
    out["doc_ids"] = _widen(out["doc_ids"], D, PAD_DOC_ID)
    out["mm_token_type_ids"] = _widen(out["mm_token_type_ids"], D, 0)
    out["input_ids"][0, L:] = ids
    out["position_ids"][:, 0, L:] = pos
    out["token_type"][0, L:] = int(TokenType.PROMPT)
    out["doc_ids"][0, L:] = doc
    out["mm_token_type_ids"][0, L:] = mm
    if L:
        positions = batch["loss_positions"]
        out["loss_positions"] = (positions // L) * (L + D) + positions % L
    _add_pixels(out, parts)
    out["num_dummy_media"] = len(parts)
    return out


class _EpochAwareCollate:
    """A chat collator (``collator_class``) plus dummy media, with NeMo's ``set_epoch`` hook.

    Args:
        processor: the Qwen3-VL processor (NeMo passes it).
        ensure_image: give every image-free batch a dummy image (see the module docstring).
        ensure_video: give every video-free batch a dummy video (data with videos, several ranks).
        dummy_size: side of the dummy image / frames in pixels (32 = one LLM token).
        **collator_kwargs: arguments of the wrapped collator.
    """

    collator_class: type

    def __init__(
        self,
        processor: Any = None,
        *,
        ensure_image: bool = True,
        ensure_video: bool = False,
        dummy_size: int = 32,
        **collator_kwargs: Any,
    ) -> None:
        self.collator = self.collator_class(processor=processor, **collator_kwargs)
        self.processor = self.collator.processor
        self.ensure_image = bool(ensure_image)
        self.ensure_video = bool(ensure_video)
        self.dummy = DummyMedia(self.processor, dummy_size)
        self.kwargs = dict(collator_kwargs)

    def set_epoch(self, epoch: int) -> None:
        """Forward the epoch to the collator (called by NeMo's step scheduler)."""
        self.collator.set_epoch(epoch)

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict:
        batch = self.collator(examples)
        parts = _needed(batch, self.ensure_image, self.ensure_video, self.dummy)
        return self._add_dummy_media(batch, parts) if parts else batch

    def _add_dummy_media(self, batch: dict, parts: list) -> dict:
        raise NotImplementedError

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.collator!r}, ensure_image={self.ensure_image}, "
                f"ensure_video={self.ensure_video})")


class NemoDiffusionCollate(_EpochAwareCollate):
    """Epoch-aware block-diffusion collator for NeMo: :class:`BardVLCollator` + dummy media.

    ``collator_kwargs`` are :class:`BardVLCollator` arguments (``block_size``, ``max_length``,
    ``noise_mode``, ``mask_token_id``, ...); the epoch seeds the diffusion noise.
    """

    collator_class = BardVLCollator

    @property
    def block_size(self) -> int:
        return self.collator.block_size

    @property
    def mask_token_id(self) -> int:
        return self.collator.mask_token_id

    def _add_dummy_media(self, batch: dict, parts: list) -> dict:
        return add_dummy_media_diffusion(batch, parts, self.collator.pad_token_id)


class NemoARCollate(_EpochAwareCollate):
    """Epoch-aware autoregressive collator for NeMo: :class:`~nemo_automodel_bard.data.ar_collator.ARChatCollator`
    + dummy media (appended after row 0's last token: causal attention keeps it invisible to real tokens)."""

    collator_class = ARChatCollator

    def _add_dummy_media(self, batch: dict, parts: list) -> dict:
        out = append_tail_tokens(
            batch,
            torch.cat([p[0] for p in parts]),
            torch.cat([p[1] for p in parts]),
            torch.cat([p[2] for p in parts], dim=1),
            pad_token_id=self.collator.pad_token_id,
        )
        _add_pixels(out, parts)
        out["num_dummy_media"] = len(parts)
        return out


_CACHE: dict[tuple, Any] = {}


def _key(cls: type, processor: Any, kwargs: Mapping[str, Any]) -> tuple:
    return (cls.__name__, id(processor), repr(sorted(kwargs.items())))


def _cached(cls: type, processor: Any, kwargs: Mapping[str, Any]) -> Any:
    key = _key(cls, processor, kwargs)
    obj = _CACHE.get(key)
    if obj is None or (processor is not None and obj.processor is not processor):
        obj = cls(processor=processor, **kwargs)
        _CACHE[key] = obj
    return obj


def bard_collate_fn(examples: Sequence[Mapping[str, Any]], processor: Any = None, **kwargs: Any) -> dict:
    """NeMo-style block-diffusion collate function: ``collate_fn(examples, processor=..., **kwargs)``.

    ``kwargs`` are :class:`NemoDiffusionCollate` / :class:`BardVLCollator` arguments; the collator object is
    built once and reused.
    """
    return _cached(NemoDiffusionCollate, processor, kwargs)(examples)


def ar_collate_fn(examples: Sequence[Mapping[str, Any]], processor: Any = None, **kwargs: Any) -> dict:
    """NeMo-style autoregressive collate function (see :class:`NemoARCollate`)."""
    return _cached(NemoARCollate, processor, kwargs)(examples)


def resolve_collate(collate_fn: Any, **defaults: Any) -> Optional[Any]:
    """The collator object behind a NeMo-bound ``partial(bard_collate_fn | ar_collate_fn, ...)``.

    ``defaults`` fill in collator arguments the YAML did not set (e.g. ``mask_token_id`` from the
    model config). Returns ``None`` for any other collate function.
    """
    if isinstance(collate_fn, (NemoDiffusionCollate, NemoARCollate)):
        return collate_fn
    if not isinstance(collate_fn, functools.partial):
        return None
    cls = {bard_collate_fn: NemoDiffusionCollate, ar_collate_fn: NemoARCollate}.get(collate_fn.func)
    if cls is None:
        return None
    kwargs = dict(collate_fn.keywords)
    processor = kwargs.pop("processor", None)
    for key, value in defaults.items():
        if value is not None and kwargs.get(key) is None:
            kwargs[key] = value
    return _cached(cls, processor, kwargs)
