"""Recipe dataloaders over Energon shards: NeMo's VLM recipe builds a ``StatefulDataLoader`` with a
``DistributedSampler`` over a map-style dataset; Energon data is a stream that assigns shards to ranks itself.

:func:`install_stream_dataloaders` (called by the recipes' ``setup()``) replaces NeMo's typed loader config
for a ``dataset:`` / ``validation_dataset:`` section whose ``_target_`` is
:func:`nemo_automodel_bard.data.energon.energon_dataset`. The loader is still a ``StatefulDataLoader`` (NeMo
checkpoints it per data-parallel rank), over :class:`~nemo_automodel_bard.data.energon.EnergonChatStream` for
this rank: it pulls ``local_batch_size`` records per micro-batch (no prefetch in the main process, so the saved
state is exactly after the last trained record) and collates them with the section's ``collate_fn``; the
stream's own ``state_dict`` (Energon's state as JSON text) is what the checkpoint holds. Energon's worker
processes (``dataset.num_workers``) do the reading and decoding. The NeMo internals this relies on are listed
and version-checked in :mod:`.nemo_compat`.

YAML::

    dataset:
      _target_: nemo_automodel_bard.data.energon.energon_dataset
      path: /data/shards            # prepared dataset directory, or a metadataset YAML (weighted blend)
      shuffle_buffer_size: 1000
      max_samples_per_sequence: 100
      num_workers: 2
    dataloader:
      collate_fn: {_target_: nemo_automodel_bard.recipes.collate.bard_collate_fn, block_size: 4}
"""

from __future__ import annotations

from dataclasses import dataclass
import logging
from typing import Any, Optional

logger = logging.getLogger(__name__)

__all__ = ["EnergonLoaderConfig", "install_stream_dataloaders", "is_energon_target"]

ENERGON_TARGET = "nemo_automodel_bard.data.energon.energon_dataset"
_LOADER_KEYS = {"_target_", "collate_fn", "num_workers", "shuffle", "drop_last", "pin_memory",
                "persistent_workers", "prefetch_factor"}


def _name(value: Any) -> str:
    if isinstance(value, str):
        return value
    module, name = getattr(value, "__module__", None), getattr(value, "__qualname__", None)
    return f"{module}.{name}" if module and name else repr(value)


def _as_dict(node: Any) -> dict:
    if node is None:
        return {}
    if hasattr(node, "to_dict"):
        return dict(node.to_dict())
    return dict(node)


def is_energon_target(node: Any) -> bool:
    """Whether a ``dataset:`` config section reads Energon shards."""
    target = node.get("_target_", None) if hasattr(node, "get") else None
    return target is not None and _name(target) == ENERGON_TARGET


@dataclass
class EnergonLoaderConfig:
    """Stands in for NeMo's ``VlmDataloaderConfig`` (same ``build`` keywords and result)."""

    dataset_kwargs: dict
    processor_config: Any
    collator: Any
    packing: Any = None

    def build(self, *, pretrained_model_name_or_path: str, dp_rank: int, dp_world_size: int, batch_size: int,
              dataset_build_context: Any = None, **_unused: Any):
        from contextlib import nullcontext

        from nemo_automodel.components.datasets.vlm.loader import VlmDataloaderBuild
        from torchdata.stateful_dataloader import StatefulDataLoader

        from nemo_automodel_bard.data.energon import energon_dataset

        with dataset_build_context or nullcontext():
            processor = self.processor_config.build(pretrained_model_name_or_path=pretrained_model_name_or_path)
        stream = energon_dataset(**self.dataset_kwargs, rank=dp_rank, world_size=dp_world_size)
        collate_fn = self.collator.build(processor=processor)
        loader = StatefulDataLoader(stream, batch_size=batch_size, collate_fn=collate_fn, num_workers=0)
        return VlmDataloaderBuild(dataloader=loader, processor=processor)


def _loader_config(cfg: Any, dataset_key: str, loader_key: str) -> Optional[EnergonLoaderConfig]:
    from nemo_automodel.components.datasets.vlm.loader import VlmCollatorConfig
    from nemo_automodel.recipes._typed_config import RecipeConfig

    raw = cfg._raw if isinstance(cfg, RecipeConfig) else cfg
    node = raw.get(dataset_key, None)
    if node is None or not is_energon_target(node):
        return None
    kwargs = _as_dict(node)
    kwargs.pop("_target_", None)
    loader = _as_dict(raw.get(loader_key, None))
    unknown = sorted(set(loader) - _LOADER_KEYS)
    if unknown:
        raise ValueError(f"{loader_key}: unknown key(s) {unknown} for Energon data")
    if int(loader.get("num_workers", 0) or 0):
        raise ValueError(f"{loader_key}.num_workers: with Energon data set {dataset_key}.num_workers instead "
                         "(Energon's own worker processes read and decode; the recipe's loader only collates)")
    collate = raw.get(f"{loader_key}.collate_fn", None)
    if collate is None:
        raise ValueError(f"{loader_key}.collate_fn is required with Energon data")
    collate = _as_dict(collate)
    factory = collate.pop("_target_")
    if isinstance(factory, str):
        import importlib

        module, name = factory.rsplit(".", 1)
        factory = getattr(importlib.import_module(module), name)
    return EnergonLoaderConfig(dataset_kwargs=kwargs,
                               processor_config=RecipeConfig._resolve_vlm_processor(raw.get("processor", None)),
                               collator=VlmCollatorConfig(factory=factory, kwargs=collate))


def _epochs_as_steps(raw: Any, train: EnergonLoaderConfig) -> int:
    """``num_epochs`` passes over the training split as optimizer steps: the Energon training stream repeats
    without end (every rank always has a next sample), so the recipe stops by steps."""
    import math

    from nemo_automodel_bard.data.energon import energon_dataset

    epochs = int(raw.get("step_scheduler.num_epochs", None) or 1)
    batch = raw.get("step_scheduler.global_batch_size", None)
    if not batch:
        raise ValueError("step_scheduler.global_batch_size is required with Energon data")
    total = energon_dataset(**train.dataset_kwargs, rank=0, world_size=1).num_samples()
    steps = max(1, math.ceil(epochs * total / int(batch)))
    logger.info("Energon data: %d samples x %d epoch(s) / global batch %d -> step_scheduler.max_steps=%d",
                total, epochs, int(batch), steps)
    return steps


def install_stream_dataloaders(cfg: Any) -> bool:
    """Make NeMo's setup build Energon loaders for Energon ``dataset`` / ``validation_dataset`` sections of the
    recipe config ``cfg`` (a NeMo ``RecipeConfig``). Returns whether the training data is Energon's."""
    train = _loader_config(cfg, "dataset", "dataloader")
    if train is not None:
        cfg.__dict__["vlm_dataloader"] = train  # the typed config NeMo's setup() reads (a cached property)
        if cfg._raw.get("step_scheduler.max_steps", None) is None:
            cfg._raw.set_by_dotted("step_scheduler.max_steps", _epochs_as_steps(cfg._raw, train))
    val = _loader_config(cfg, "validation_dataset", "validation_dataloader")
    if val is not None:
        cfg.__dict__["vlm_validation_dataloader"] = val
    return train is not None
