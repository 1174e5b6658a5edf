"""Build the offline SWD teacher cache of a recipe YAML (``bard.teacher_cache``).

    python -m nemo_automodel_bard.recipes.swd_cache recipes/tiny/swd.yaml \\
        --bard.teacher_cache=runs/tiny/swd_b16_teacher [--bard.teacher_cache_epochs=N]

It reads the same YAML as the SWD run, so the data set, the collator settings (block size, noise
seed, maximum length, ...), the anchor (``teacher_model``) and the KD settings (``bard.teacher_block_size``,
``kd_top_k``, ``kd_at_block_padding``) are the run's; it writes the anchor's top-k at every KD position
of every training sample for the epochs the run will use (``bard.teacher_cache_epochs``, default: what
``step_scheduler.max_steps`` needs with one data-parallel rank), and of the validation set. The SWD run
with ``--bard.teacher_cache=<dir>`` then needs no teacher model; it refuses a cache built for other
settings and tells how many epochs it needs when the cache has too few.
See :mod:`nemo_automodel_bard.objectives.teacher_cache`.
"""

from __future__ import annotations

import functools
import logging
import sys
from pathlib import Path
from typing import Any, Sequence

import torch

from nemo_automodel_bard.objectives.distillation import check_same_tokenizer
from nemo_automodel_bard.objectives.teacher_cache import TeacherCacheError, build_teacher_cache, epochs_needed

from .collate import bard_collate_fn, resolve_collate
from .common import RecipeConfigError, load_recipe_config
from .model_builder import ModelConfigError, check_model_path
from .pbm import diffusion_collate_defaults, validation_collate_defaults
from .swd import SWD_DEFAULTS, load_teacher

logger = logging.getLogger(__name__)

__all__ = ["build_cache_from_config", "main"]


def _collate_kwargs(node: Any) -> dict:
    kwargs = node.to_dict() if hasattr(node, "to_dict") else dict(node or {})
    kwargs.pop("_target_", None)
    return kwargs


def _collator(node: Any, processor: Any, defaults: dict) -> Any:
    """The collator the recipe builds from the same YAML node (via :func:`resolve_collate`)."""
    return resolve_collate(functools.partial(bard_collate_fn, processor=processor, **_collate_kwargs(node)), **defaults)


def build_cache_from_config(cfg: Any, device: Any = None) -> Path:
    """Build the cache a recipe config asks for; returns its directory."""
    from transformers import AutoConfig, AutoProcessor

    import nemo_automodel_bard.models.bard_vl  # noqa: F401 - registers bard_vl with the Auto classes

    cache_dir = cfg.get("bard.teacher_cache", None)
    if not cache_dir:
        raise RecipeConfigError("set bard.teacher_cache to the directory the teacher cache is written to")
    teacher_path = cfg.get("teacher_model.pretrained_model_name_or_path", None)
    student_path = cfg.get("model.pretrained_model_name_or_path", None)
    try:
        check_model_path(student_path)
        check_model_path(teacher_path, key="teacher_model.pretrained_model_name_or_path (the small-block anchor)")
        check_same_tokenizer(student_path, teacher_path)
    except (ModelConfigError, ValueError) as exc:
        raise RecipeConfigError(str(exc)) from None
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    processor_cfg = cfg.get("processor", None)
    processor_kwargs = _collate_kwargs(processor_cfg) if processor_cfg is not None else {}
    if processor_kwargs:  # the run's input differs otherwise: the cache's per-sample input hash would refuse it
        raise RecipeConfigError(
            f"the YAML's processor section {processor_kwargs!r} is not supported by the cache builder; the SWD "
            "recipes use `processor: {}` (the student's own processor)"
        )
    processor = AutoProcessor.from_pretrained(str(student_path))
    config = AutoConfig.from_pretrained(str(student_path))
    train = _collator(cfg.get("dataloader.collate_fn"), processor, diffusion_collate_defaults(config))
    dataset = cfg.dataset.instantiate()
    swd = {key: cfg.get(f"bard.{key}", default) for key, default in SWD_DEFAULTS.items()}
    local = int(cfg.get("step_scheduler.local_batch_size", 1))
    epochs = cfg.get("bard.teacher_cache_epochs", None)
    if not epochs:
        max_steps, num_epochs = cfg.get("step_scheduler.max_steps", None), cfg.get("step_scheduler.num_epochs", None)
        epochs = num_epochs if max_steps is None else epochs_needed(
            int(max_steps), int(cfg.get("step_scheduler.global_batch_size", local)) // local, -(-len(dataset) // local),
            num_epochs)
    if not isinstance(epochs, int) or epochs < 1:
        raise RecipeConfigError(f"cannot tell how many epochs to cache (got {epochs!r}); set bard.teacher_cache_epochs")
    teacher = load_teacher(cfg, str(teacher_path), device)
    common = dict(
        teacher_block_size=int(swd["teacher_block_size"]),
        top_k=int(swd["kd_top_k"]),
        kd_at_block_padding=bool(swd["kd_at_block_padding"]),
        batch_size=local,
        attention=cfg.get("bard.teacher_attention", "auto"),
        extra_meta={"teacher": str(teacher_path)},
        progress=True,
    )
    out = build_teacher_cache(teacher, dataset, train, cache_dir, split="train", epochs=int(epochs), **common)
    if cfg.get("validation_dataset", None) is not None:
        val = _collator(cfg.get("validation_dataloader.collate_fn", None), processor,
                        validation_collate_defaults(config, train))
        build_teacher_cache(teacher, cfg.validation_dataset.instantiate(), val, cache_dir, split="validation",
                            epochs=[0], **common)
    logger.info("teacher cache written to %s (%d training epochs)", out, int(epochs))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-"):
        print(__doc__, file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s | %(levelname)s | %(name)s | %(message)s")
    try:
        out = build_cache_from_config(load_recipe_config(argv[0], argv[1:]))
    except (RecipeConfigError, TeacherCacheError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
