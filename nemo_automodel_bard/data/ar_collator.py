"""Autoregressive collator: chat records -> causal-LM batches for a plain Qwen3-VL.

Used by the AR objective (:mod:`nemo_automodel_bard.recipes.ar_pretrain`), which pre-trains the tiny
model so that it can stand in for a pretrained Qwen3-VL. A record (the chat format of
:mod:`nemo_automodel_bard.data.chat_dataset`) becomes ``prompt + response`` where the prompt is the
chat template applied to every message before the last assistant turn (``add_generation_prompt``)
and the response is that turn's text plus ``<|im_end|>``. Targets follow NeMo's convention: they are
already shifted (``labels[t] = input_ids[t + 1]``) and only response tokens are supervised.

Example:
    >>> collator = ARChatCollator(processor=processor)                  # doctest: +SKIP
    >>> batch = collator([{"messages": [...], "index": 0}])             # doctest: +SKIP
    >>> logits = model(**{k: batch[k] for k in MODEL_INPUTS if k in batch}).logits  # doctest: +SKIP
"""

from __future__ import annotations

import logging
from typing import Any, Mapping, Optional, Sequence

import torch

from nemo_automodel_bard.decoding.inputs import MEDIA_KEYS

from .chat_inputs import prompt_inputs
from .media import PIXEL_KEYS, item_kind
from .records import SampleSkipped, answer_special_ids, check_answer_tokens
from .rope import qwen3_vl_rope_index

logger = logging.getLogger(__name__)

__all__ = ["ARChatCollator", "MODEL_INPUTS", "append_tail_tokens"]

IGNORE_INDEX = -100
#: batch keys that are model inputs
MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids", *MEDIA_KEYS)


class ARChatCollator:
    """Collate chat records into autoregressive (causal, shifted-target) Qwen3-VL batches.

    Args:
        processor: a Qwen3-VL processor (or ``processor_path`` to load one with ``AutoProcessor``).
        max_length: longest row; longer responses are cut (at least one response token is kept),
            samples whose prompt alone is too long are skipped.
        image_root: directory that relative image / video paths are resolved against.
        strict: raise ``ValueError`` (naming the sample index) instead of skipping a bad sample.

    ``__call__(samples)`` returns ``input_ids``, ``attention_mask``, ``labels`` (shifted, ``-100``
    outside the response), ``position_ids`` ``[3, b, L]``, ``mm_token_type_ids``, the pixel inputs when
    present, and ``num_samples``, ``num_skipped``, ``skipped`` (list of ``(index, reason)``).
    """

    def __init__(
        self,
        processor: Any = None,
        max_length: Optional[int] = None,
        image_root: Optional[str] = None,
        strict: bool = False,
        *,
        processor_path: Optional[str] = None,
    ) -> None:
        if processor is None and processor_path is None:
            raise ValueError("ARChatCollator needs `processor` (a Qwen3-VL processor) or `processor_path`")
        if processor is None:
            import nemo_automodel_bard.models.bard_vl  # noqa: F401 - registers bard_vl with AutoProcessor
            from transformers import AutoProcessor

            processor = AutoProcessor.from_pretrained(processor_path)
        self.processor = processor
        self.tokenizer = processor.tokenizer
        if max_length is not None and (not isinstance(max_length, int) or max_length < 2):
            raise ValueError(f"max_length must be an int >= 2, got {max_length!r}")
        self.max_length = max_length
        self.image_root = str(image_root) if image_root is not None else None
        self.strict = bool(strict)
        tok = self.tokenizer
        self.im_end_id = int(tok.convert_tokens_to_ids("<|im_end|>"))
        self.pad_token_id = int(tok.pad_token_id) if tok.pad_token_id is not None else self.im_end_id
        self.image_token_id = int(getattr(processor, "image_token_id", None) or tok.convert_tokens_to_ids("<|image_pad|>"))
        self.video_token_id = int(getattr(processor, "video_token_id", None) or tok.convert_tokens_to_ids("<|video_pad|>"))
        self.merge = int(getattr(processor.image_processor, "merge_size", 2) or 2)
        vision = [tok.convert_tokens_to_ids(t) for t in ("<|vision_start|>", "<|vision_end|>")]
        self._answer_special_ids = answer_special_ids(tok, [self.image_token_id, self.video_token_id, self.im_end_id,
                                                            *vision])
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """No randomness depends on the epoch; kept for NeMo's step scheduler."""
        self.epoch = int(epoch)

    # ------------------------------------------------------------------ one record
    def _response(self, message: Mapping[str, Any]) -> str:
        content = message.get("content")
        if isinstance(content, str):
            text = content
        else:
            parts = []
            for item in content or []:
                if item_kind(item) != "text":
                    raise SampleSkipped("the assistant turn contains media; only text responses are trained")
                parts.append(str(item.get("text") or ""))
            text = "".join(parts)
        if not text.strip():
            raise SampleSkipped("empty response")
        return text

    def _prepare(self, sample: Any) -> dict:
        if not isinstance(sample, Mapping):
            raise SampleSkipped(f"sample must be a dict with 'messages', got {type(sample).__name__}")
        if sample.get("error") is not None:
            raise SampleSkipped(str(sample["error"]))
        messages = sample.get("messages")
        if not isinstance(messages, (list, tuple)) or not messages:
            raise SampleSkipped("missing or empty 'messages' list")
        turns = [i for i, m in enumerate(messages) if isinstance(m, Mapping) and m.get("role") == "assistant"]
        if not turns:
            raise SampleSkipped("no assistant turn")
        turn = turns[-1]
        text = self._response(messages[turn])
        out = prompt_inputs(self.processor, messages[:turn], self.image_root)  # the prompt, as every caller encodes it
        prompt = out["input_ids"][0].to(torch.int64)
        mm = out["mm_token_type_ids"][0].to(torch.int64)
        answer = torch.tensor(self.tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.int64)
        check_answer_tokens(answer, self._answer_special_ids, self.tokenizer, turn)
        response = torch.cat([answer, torch.tensor([self.im_end_id], dtype=torch.int64)])
        P = prompt.numel()
        if self.max_length is not None and P + response.numel() > self.max_length:
            keep = self.max_length - P
            if keep < 1:
                raise SampleSkipped(f"too long: prompt of {P} tokens exceeds max_length={self.max_length}")
            response = response[:keep]
        ids = torch.cat([prompt, response])
        mm_full = torch.cat([mm, torch.zeros(response.numel(), dtype=torch.int64)])
        grids = {k: out.get(k) for k in ("image_grid_thw", "video_grid_thw")}
        positions = qwen3_vl_rope_index(
            ids[None],
            mm_full[None],
            grids["image_grid_thw"],
            grids["video_grid_thw"],
            spatial_merge_size=self.merge,
        )[:, 0]
        labels = torch.full_like(ids, IGNORE_INDEX)
        labels[P - 1 : -1] = ids[P:]
        return {
            "input_ids": ids,
            "mm_token_type_ids": mm_full,
            "position_ids": positions,
            "labels": labels,
            "pixels": {k: out[k] for k in PIXEL_KEYS if out.get(k) is not None},
        }

    # ------------------------------------------------------------------ batch
    def __call__(self, samples: Sequence[Mapping[str, Any]]) -> dict:
        """Collate ``samples``; see the class docstring for the keys."""
        if isinstance(samples, Mapping):
            samples = [samples]
        rows, skipped = [], []
        for n, sample in enumerate(samples):
            index = sample.get("index", n) if isinstance(sample, Mapping) else n
            try:
                rows.append(self._prepare(sample))
            except SampleSkipped as exc:
                if self.strict:
                    raise ValueError(f"sample {index}: {exc}") from None
                logger.warning("ARChatCollator: skipping sample %s: %s", index, exc)
                skipped.append((index, str(exc)))
        b = len(rows)
        L = max((int(r["input_ids"].numel()) for r in rows), default=0)
        batch: dict[str, Any] = {
            "input_ids": torch.full((b, L), self.pad_token_id, dtype=torch.int64),
            "attention_mask": torch.zeros((b, L), dtype=torch.int64),
            "labels": torch.full((b, L), IGNORE_INDEX, dtype=torch.int64),
            "position_ids": torch.zeros((3, b, L), dtype=torch.int64),
            "mm_token_type_ids": torch.zeros((b, L), dtype=torch.int64),
        }
        pixels: dict[str, list] = {k: [] for k in PIXEL_KEYS}
        for i, row in enumerate(rows):
            n = int(row["input_ids"].numel())
            batch["input_ids"][i, :n] = row["input_ids"]
            batch["attention_mask"][i, :n] = 1
            batch["labels"][i, :n] = row["labels"]
            batch["position_ids"][:, i, :n] = row["position_ids"]
            batch["mm_token_type_ids"][i, :n] = row["mm_token_type_ids"]
            for key, value in row["pixels"].items():
                pixels[key].append(value)
        for key, parts in pixels.items():
            if parts:
                batch[key] = torch.cat(parts, dim=0)
        batch["num_samples"] = b
        batch["num_skipped"] = len(skipped)
        batch["skipped"] = skipped
        return batch


def append_tail_tokens(
    batch: dict, ids: torch.Tensor, mm: torch.Tensor, positions: torch.Tensor, pad_token_id: int = 0
) -> dict:
    """Append ``ids`` (with their ``mm_token_type_ids`` and ``[3, D]`` positions) after the last
    column of row 0 of an AR batch: attended to (so no query row is empty) but unsupervised, and
    invisible to every real token under causal attention. Other rows get padding."""
    out = dict(batch)
    D = int(ids.numel())
    if out["input_ids"].shape[0] == 0:
        out["input_ids"] = torch.zeros((1, 0), dtype=torch.int64)
        out["attention_mask"] = torch.zeros((1, 0), dtype=torch.int64)
        out["labels"] = torch.zeros((1, 0), dtype=torch.int64)
        out["position_ids"] = torch.zeros((3, 1, 0), dtype=torch.int64)
        out["mm_token_type_ids"] = torch.zeros((1, 0), dtype=torch.int64)
    L = out["input_ids"].shape[1]
    pad_id = int(pad_token_id)

    def widen(t: torch.Tensor, fill: int) -> torch.Tensor:
        return torch.cat([t, t.new_full((*t.shape[:-1], D), fill)], dim=-1)

    out["input_ids"] = widen(out["input_ids"], pad_id)
    out["attention_mask"] = widen(out["attention_mask"], 0)
    out["labels"] = widen(out["labels"], IGNORE_INDEX)
    out["position_ids"] = widen(out["position_ids"], 0)
    out["mm_token_type_ids"] = widen(out["mm_token_type_ids"], 0)
    out["input_ids"][0, L:] = ids
    out["attention_mask"][0, L:] = 1
    out["mm_token_type_ids"][0, L:] = mm
    out["position_ids"][:, 0, L:] = positions
    return out
