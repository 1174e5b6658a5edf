"""One ``_target_`` for every data source, so a recipe YAML can switch data with overrides only.

``make_dataset(kind="shapes", split=..., size=..., seed=...)`` is the embedded task;
``make_dataset(kind="jsonl", path=..., image_root=...)`` reads chat-format records (JSONL or a
``datasets.save_to_disk`` directory); ``make_dataset(kind="hf", name=..., split=...)`` a local or cached
Hugging Face dataset in the chat schema (:mod:`nemo_automodel_bard.data.hf_dataset`). Keys that do not
apply to the chosen kind are ignored. Energon shards have their own ``_target_``
(:func:`nemo_automodel_bard.data.energon.energon_dataset`): they are a stream, not a map-style dataset.
"""

from __future__ import annotations

from typing import Any


def make_dataset(
    kind: str = "shapes",
    *,
    split: str = "train",
    size: int = 1000,
    seed: int = 0,
    path: str | None = None,
    image_root: str | None = None,
    strict: bool = False,
    max_samples: int | None = None,
    name: str | None = None,
    config: str | None = None,
    **_ignored: Any,
):
    """Build the dataset of ``kind`` (``"shapes"``, ``"jsonl"`` or ``"hf"``)."""
    if kind == "shapes":
        from .chat_dataset import shapes_dataset

        return shapes_dataset(split=split, size=size, seed=seed)
    if kind == "hf" and name:
        from .hf_dataset import HFChatDataset

        return HFChatDataset(name, split=split, config=config, image_root=image_root, strict=strict,
                             max_samples=max_samples)
    if kind in ("jsonl", "chat", "hf"):
        if not path:
            raise ValueError("make_dataset(kind='jsonl') needs path= (a .jsonl file or a saved dataset directory)")
        from .chat_dataset import ChatDataset

        return ChatDataset(path, image_root=image_root, strict=strict, max_samples=max_samples)
    raise ValueError(f"unknown dataset kind {kind!r}; use 'shapes', 'jsonl' or 'hf'")


__all__ = ["make_dataset"]
