"""Stage-Wise Distillation (SWD): distil a large-block student from a small-block diffusion anchor.

The student (block size ``B_s``, initialised from its own PBM export) and a frozen teacher (block
size ``B_t < B_s``; e.g. the B=4 anchor, possibly a larger model sharing the tokenizer) receive the
same corrupted row — tokens, positions, images — and differ only in their attention mask's block
size. Loss at the student's corrupted noisy positions: ``ce_weight * CE + kd_weight * KD`` with KD
from the teacher's top-k (see :mod:`nemo_automodel_bard.objectives.distillation`).

Everything else is the PBM recipe: NeMo's FSDP2 / checkpointing / resume (optimizer state saved;
the teacher, stored as ``self.teacher_model``, is never checkpointed), per-group learning rates,
JSONL / W&B / MLflow logging and a consolidated Hugging Face export of the student.

YAML (``recipes/tiny/swd.yaml``)::

    recipe: nemo_automodel_bard.recipes.swd.BardVLSWDRecipe
    model: {_target_: ...build_bard_vl, pretrained_model_name_or_path: <PBM export at B_s>}
    teacher_model: {pretrained_model_name_or_path: <anchor export>, torch_dtype: bfloat16}
    bard: {teacher_block_size: 4, ce_weight: 1.0, kd_weight: 0.5, kd_top_k: 16,
           kd_direction: forward, kd_temperature: 1.0, kd_at_block_padding: false}

Anchor modes are a matter of which teacher each run gets: ``fixed`` (one anchor for every student,
as published) or ``previous`` (the distilled student of ``B/2`` teaches ``B``); the ``bard-vl``
pipeline wires both (``swd.anchor``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

import torch

from nemo_automodel_bard.diffusion.losses import kd_direction
from nemo_automodel_bard.objectives.distillation import SWD_DEFAULTS as OBJECTIVE_SWD_DEFAULTS
from nemo_automodel_bard.objectives.distillation import check_same_tokenizer, swd_training_loss
from nemo_automodel_bard.objectives.teacher_cache import (
    TeacherCacheError,
    TeacherTopKCache,
    epochs_needed,
    tokenizer_fingerprint,
)

from .common import RecipeConfigError
from .model_builder import ModelConfigError, check_model_path
from .pbm import BardVLPBMRecipe

logger = logging.getLogger(__name__)

__all__ = ["BardVLSWDRecipe", "SWD_DEFAULTS", "load_teacher"]

#: SWD settings: the published ones, except that KD skips block-padding targets by default (published:
#: KD at every loss position, ``kd_at_block_padding: true``; see :mod:`nemo_automodel_bard.objectives.distillation`)
#: ``bard.*`` key of the recipe -> the objective's name for it
_BARD_KEY_OF = {"teacher_block_size": "teacher_block_size", "ce_weight": "ce_weight", "kd_weight": "kd_weight",
                "kd_top_k": "top_k", "kd_direction": "direction", "kd_temperature": "temperature",
                "kd_at_block_padding": "kd_at_block_padding"}
#: the recipe's ``bard.*`` SWD keys and their defaults (the objective's :data:`OBJECTIVE_SWD_DEFAULTS`)
SWD_DEFAULTS = {key: OBJECTIVE_SWD_DEFAULTS[name] for key, name in _BARD_KEY_OF.items()}


def _dataset_len(dataloader: Any) -> Optional[int]:
    try:
        return len(dataloader.dataset)
    except (AttributeError, TypeError, NotImplementedError):
        return None


def load_teacher(cfg: Any, path: str, device: Any) -> torch.nn.Module:
    """The frozen anchor in eval mode: ``teacher_model.torch_dtype`` / ``attn_implementation``, else the student's."""
    from nemo_automodel_bard import BardVLForConditionalGeneration

    dtype = cfg.get("teacher_model.torch_dtype", None) or cfg.get("model.torch_dtype", "float32")
    dtype = getattr(torch, str(dtype).replace("torch.", "")) if isinstance(dtype, str) else dtype
    attn = cfg.get("teacher_model.attn_implementation", None) or cfg.get("model.attn_implementation", "sdpa")
    teacher = BardVLForConditionalGeneration.from_pretrained(path, dtype=dtype, attn_implementation=attn)
    teacher.to(device).eval()
    teacher.requires_grad_(False)
    return teacher


class BardVLSWDRecipe(BardVLPBMRecipe):
    """SWD on NeMo-AutoModel's VLM recipe machinery (see the module docstring)."""

    objective = "swd"
    extra_bard_keys = frozenset(SWD_DEFAULTS) | {"teacher_attention", "teacher_cache", "teacher_cache_epochs"}

    def _swd(self, key: str) -> Any:
        return self.cfg.get(f"bard.{key}", SWD_DEFAULTS[key])

    @property
    def is_control(self) -> bool:
        """``bard.kd_weight`` is 0: a no-KD control run, which needs, loads and runs no teacher."""
        return self._swd("kd_weight") == 0

    @property
    def teacher_cache_path(self) -> Any:
        """``bard.teacher_cache``: a directory of precomputed teacher top-k (offline teacher), or None."""
        return self.cfg.get("bard.teacher_cache", None)

    def validate_config(self) -> None:
        super().validate_config()
        cache = self.teacher_cache_path
        if cache is not None and (not isinstance(cache, str) or not cache):
            raise RecipeConfigError(f"bard.teacher_cache must be a directory path or null, got {cache!r}")
        if cache is None and not self.is_control:
            try:
                check_model_path(self.cfg.get("teacher_model.pretrained_model_name_or_path", None),
                                 key="teacher_model.pretrained_model_name_or_path (the small-block anchor)")
            except ModelConfigError as exc:
                raise RecipeConfigError(str(exc)) from None
        teacher_block = self._swd("teacher_block_size")
        student_block = self.cfg.get("dataloader.collate_fn.block_size", None)
        if not isinstance(teacher_block, int) or teacher_block < 1:
            raise RecipeConfigError(f"bard.teacher_block_size must be a positive integer, got {teacher_block!r}")
        if isinstance(student_block, int) and teacher_block >= student_block:
            raise RecipeConfigError(
                f"bard.teacher_block_size={teacher_block} must be smaller than the student's block size "
                f"{student_block} (dataloader.collate_fn.block_size)"
            )
        if isinstance(student_block, int) and student_block % teacher_block:
            raise RecipeConfigError(
                f"the student's block size {student_block} must be a multiple of bard.teacher_block_size={teacher_block}"
            )
        try:
            kd_direction(self._swd("kd_direction"))
        except ValueError:
            raise RecipeConfigError(f"bard.kd_direction must be 'forward' or 'reverse', got {self._swd('kd_direction')!r}") from None
        for key in ("ce_weight", "kd_weight", "kd_temperature"):
            value = self._swd(key)
            if not isinstance(value, (int, float)) or value < 0 or (key == "kd_temperature" and value == 0):
                raise RecipeConfigError(f"bard.{key} must be a non-negative number (temperature > 0), got {value!r}")
        if not isinstance(self._swd("kd_at_block_padding"), bool):
            raise RecipeConfigError(
                f"bard.kd_at_block_padding must be true or false, got {self._swd('kd_at_block_padding')!r}"
            )
        if not isinstance(self._swd("kd_top_k"), int) or self._swd("kd_top_k") < 1:
            raise RecipeConfigError(f"bard.kd_top_k must be a positive integer, got {self._swd('kd_top_k')!r}")

    def setup(self) -> None:
        """PBM setup for the student, then the frozen teacher (same tokenizer checked first), or the
        teacher cache (``bard.teacher_cache``), checked against this run's settings. With
        ``bard.kd_weight=0`` (a no-KD control) no teacher is loaded or run."""
        super().setup()
        self.teacher_model = None
        self.teacher_cache = None
        if self.is_control:
            if self.dist_env.is_main:
                logger.info("SWD: kd_weight is 0 (a no-KD control): no teacher is loaded")
            return
        if self.teacher_cache_path is not None:
            self._open_teacher_cache()
            return
        teacher_path = str(self.cfg.get("teacher_model.pretrained_model_name_or_path"))
        student_path = str(self.cfg.get("model.pretrained_model_name_or_path"))
        try:
            check_same_tokenizer(student_path, teacher_path)
        except ValueError as exc:
            raise RecipeConfigError(str(exc)) from None
        self.teacher_model = self._build_teacher(teacher_path)
        configured = getattr(self.teacher_model.config, "block_size", None)
        if configured is not None and configured != self._swd("teacher_block_size") and self.dist_env.is_main:
            logger.warning(
                "teacher checkpoint was trained with block size %s but bard.teacher_block_size=%s",
                configured, self._swd("teacher_block_size"),
            )  # fmt: skip

    def teacher_cache_settings(self) -> dict[str, Any]:
        """What a teacher cache for this run must have been built with."""
        return {
            "teacher_block_size": int(self._swd("teacher_block_size")),
            "top_k": int(self._swd("kd_top_k")),
            "kd_at_block_padding": bool(self._swd("kd_at_block_padding")),
            "tokenizer": tokenizer_fingerprint(self.train_collator.processor.tokenizer),
        }

    def _open_teacher_cache(self) -> None:
        try:
            cache = TeacherTopKCache(self.teacher_cache_path)
            cache.check(self.teacher_cache_settings())
            cache.check_split("train", self.train_collator, _dataset_len(self.dataloader))
            if self.val_dataloader is not None:
                cache.check_split("validation", self.val_dataloader.collate_fn, _dataset_len(self.val_dataloader))
        except TeacherCacheError as exc:
            raise RecipeConfigError(str(exc)) from None
        needed = epochs_needed(int(self.step_scheduler.max_steps), int(self.step_scheduler.grad_acc_steps),
                               len(self.dataloader), getattr(self.step_scheduler, "num_epochs", None) or None)
        missing = sorted(set(range(needed)) - set(cache.epochs("train")))
        if missing:
            raise RecipeConfigError(
                f"teacher cache {cache.path} lacks training epochs {missing} of the {needed} this run needs "
                f"({self.step_scheduler.max_steps} steps); build it with bard.teacher_cache_epochs={needed}"
            )
        if self.val_dataloader is not None and 0 not in cache.epochs("validation"):
            raise RecipeConfigError(f"teacher cache {cache.path} has no validation split; build it with the run's YAML")
        named = self.cfg.get("teacher_model.pretrained_model_name_or_path", None)
        built = cache.meta.get("teacher")
        if named and built and Path(str(named)).resolve() != Path(str(built)).resolve() and self.dist_env.is_main:
            logger.warning("teacher cache %s was built from %s, not teacher_model.pretrained_model_name_or_path=%s; "
                           "the cached anchor is used", cache.path, built, named)
        self.teacher_cache = cache
        self._cache_split = "train"
        if self.dist_env.is_main:
            logger.info("SWD: offline teacher from %s (epochs %s)", cache.path, cache.epochs("train"))

    def _cached_topk(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        split = getattr(self, "_cache_split", "train")
        collate = self.train_collator if split == "train" else self.val_dataloader.collate_fn
        try:
            values, ids = self.teacher_cache.lookup(split, collate.collator.epoch, batch,
                                                    bool(self._swd("kd_at_block_padding")))
        except TeacherCacheError as exc:
            raise RecipeConfigError(str(exc)) from None
        device = self.dist_env.device
        return values.to(device), ids.to(device)

    def _build_teacher(self, path: str) -> torch.nn.Module:
        return load_teacher(self.cfg, path, self.dist_env.device)

    def _compute_loss(self, model: torch.nn.Module, batch: dict, denominator: float) -> tuple[torch.Tensor, dict]:
        cached = self._cached_topk(batch) if self.teacher_cache is not None else (None, None)
        loss, metrics = swd_training_loss(
            model,
            self.teacher_model,
            batch,
            teacher_block_size=int(self._swd("teacher_block_size")),
            ce_weight=float(self._swd("ce_weight")),
            kd_weight=float(self._swd("kd_weight")),
            top_k=int(self._swd("kd_top_k")),
            direction=str(self._swd("kd_direction")),
            temperature=float(self._swd("kd_temperature")),
            attention=self.attention,
            teacher_attention=self.cfg.get("bard.teacher_attention", "auto"),
            kd_at_block_padding=bool(self._swd("kd_at_block_padding")),
            denominator=denominator,
            teacher_topk_values=cached[0],
            teacher_topk_ids=cached[1],
        )
        m = float(metrics["num_kd_tokens"])
        self._kd_sums = getattr(self, "_kd_sums", {"kd": 0.0, "agree": 0.0, "teacher_correct": 0.0, "m": 0.0})
        self._kd_sums["kd"] += float(metrics["kd"]) * m
        self._kd_sums["agree"] += float(metrics["agreement"]) * m
        self._kd_sums["teacher_correct"] += float(metrics["teacher_accuracy"]) * m
        self._kd_sums["m"] += m
        n = float(metrics["num_loss_tokens"])
        return loss, {"ce_sum": float(metrics["ce"]) * n, "correct": float(metrics["accuracy"]) * n}

    def _run_validation_epoch(self, val_dataloader: Any) -> Any:
        saved = getattr(self, "_kd_sums", None)  # validation forwards must not leak into training metrics
        self._cache_split = "validation"
        try:
            return super()._run_validation_epoch(val_dataloader)
        finally:
            self._cache_split = "train"
            self._kd_sums = saved or {"kd": 0.0, "agree": 0.0, "teacher_correct": 0.0, "m": 0.0}

    def _extra_metrics(self, totals: dict[str, float]) -> dict[str, Any]:
        out = super()._extra_metrics(totals)
        sums = getattr(self, "_kd_sums", None)
        if sums and sums["m"]:
            kd, agree, teacher, m = self._allreduce_sum([sums["kd"], sums["agree"], sums["teacher_correct"], sums["m"]])
            out.update(kd=kd / m, teacher_agreement=agree / m, teacher_accuracy=teacher / m,
                       teacher_block_size=int(self._swd("teacher_block_size")))
        self._kd_sums = {"kd": 0.0, "agree": 0.0, "teacher_correct": 0.0, "m": 0.0}
        return out

    def _export_metadata(self) -> dict:
        return {
            **super()._export_metadata(),
            "teacher": (None if self.is_control else
                        str(self.teacher_cache.meta.get("teacher", self.teacher_cache.path) if self.teacher_cache
                            else self.cfg.get("teacher_model.pretrained_model_name_or_path"))),
            **{k: self._swd(k) for k in SWD_DEFAULTS},
        }
