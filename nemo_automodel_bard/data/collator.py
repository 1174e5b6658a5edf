"""Block-diffusion collator: chat records -> ``[prompt | clean response | noisy response]`` rows.

:class:`BardVLCollator` turns chat-format samples (the published record format)::

    {"messages": [{"role": "system" | "user" | "assistant",
                   "content": str | [{"type": "image", "image": path | PIL | bytes},
                                     {"type": "video", "video": path | [frames]},
                                     {"type": "text", "text": "..."}]}],
     "index": 17}                                       # optional, seeds the noise

into the tensors that :func:`nemo_automodel_bard.objectives.block_diffusion.diffusion_training_loss`
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
    >>> loss, metrics = diffusion_training_loss(model, batch)                     # doctest: +SKIP

YAML (NeMo's loader resolves ``_target_``)::

    collate_fn:
      _target_: nemo_automodel_bard.data.collator.BardVLCollator
      processor_path: /models/bard-vl-4b
      block_size: 32
      max_length: 4096
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import torch

from nemo_automodel_bard.diffusion.masks import pack_layouts, sample_layout
from nemo_automodel_bard.diffusion.noise import (
    NoiseMode,
    check_level_range,
    corrupt_response,
    get_schedule,
    ordinary_token_ids,
    sample_block_levels,
    sample_generator,
)
from nemo_automodel_bard.diffusion.losses import REDUCTIONS
from nemo_automodel_bard.models.bard_vl.configuration_bard_vl import QWEN3_VL_MASK_TOKEN_ID

from .chat_inputs import prompt_inputs
from .media import PIXEL_KEYS, item_kind
from .records import (
    ROLES,
    SampleSkipped,
    answer_special_ids,
    check_answer_tokens,
)
from .rope import Qwen3VLRopeIndex

logger = logging.getLogger(__name__)

__all__ = ["BardVLCollator"]


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
        level_range: ``[lo, hi]``: every block's corruption level is drawn in this range instead of ``(0, 1]``
            (the published SWD recipe: 10-50 % of a block masked); ``None``: the full range.
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
        level_range: Optional[Sequence[float]] = None,
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
        self.level_range = None if level_range is None else check_level_range(level_range)
        if self.complementary and self.level_range is not None:
            raise ValueError("complementary=True cannot be combined with level_range (the complement of a block at "
                             "level t is at 1 - t, outside the range)")
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
        self._rope = Qwen3VLRopeIndex(self.spatial_merge_size)

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
        if len(self.tokenizer) > QWEN3_VL_MASK_TOKEN_ID or getattr(self.tokenizer, "vocab_size", 0) > 151600:
            return QWEN3_VL_MASK_TOKEN_ID
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
            if msg.get("role") not in ROLES:
                raise SampleSkipped(f"message {i} has role {msg.get('role')!r}; expected one of {ROLES}")
            content = msg.get("content")
            if not isinstance(content, (str, list, tuple)):
                raise SampleSkipped(f"message {i} content must be a string or a list, got {type(content).__name__}")
            if not isinstance(content, str):
                for item in content:
                    item_kind(item)
        return list(messages)

    def _response_text(self, message: Mapping[str, Any], turn: int) -> str:
        content = message["content"]
        if isinstance(content, str):
            text = content
        else:
            parts = []
            for item in content:
                kind = item_kind(item)
                if kind != "text":
                    raise SampleSkipped(f"assistant turn {turn} contains a {kind}; only text responses are trained")
                parts.append(str(item.get("text") or ""))
            text = "".join(parts)
        if not text.strip():
            raise SampleSkipped(f"empty response in assistant turn {turn}")
        return text

    def _prompt_inputs(self, messages: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        """The prompt's processor inputs, encoded as every caller encodes a chat
        (:func:`~nemo_automodel_bard.data.chat_inputs.prompt_inputs`; every image/video processed once):
        ``input_ids [1, P]``, ``mm_token_type_ids [1, P]`` and the pixel inputs."""
        return prompt_inputs(self.processor, messages, self.image_root)

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

        levels, block_weights = sample_block_levels(N, generator, self.schedule, level_range=self.level_range)
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
        pixels = {k: prompt[k] for k in PIXEL_KEYS if prompt.get(k) is not None}
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
        token_type = torch.empty((b, L), dtype=torch.int64)
        block_ids = torch.empty((b, L), dtype=torch.int64)
        doc_ids = torch.empty((b, L), dtype=torch.int64)
        mm_token_type_ids = torch.zeros((b, L), dtype=torch.int64)

        positions, targets, weights, owner, block_pad = [], [], [], [], []
        normalizer, levels, level_owner, indices = [], [], [], []
        pixels: dict[str, list[torch.Tensor]] = {k: [] for k in PIXEL_KEYS}
        corrupted = noisy_total = truncated = 0
        n = 0
        for r, row in enumerate(rows):
            # the row's layout: its samples one after another (doc ids 0, 1, ...), then row padding
            token_type[r], block_ids[r], doc_ids[r] = pack_layouts([(p.token_type, p.block_ids) for p in row], L)
            offset = 0
            for p in row:
                span = slice(offset, offset + p.length)
                input_ids[r, span] = p.input_ids
                position_ids[:, r, span] = p.position_ids
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
