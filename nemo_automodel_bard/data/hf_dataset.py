"""Chat records from a Hugging Face ``datasets`` dataset: a local directory of data files, a dataset saved with
``save_to_disk``, or a hub dataset already in the local cache (no download: ``datasets`` runs in offline mode while
loading unless ``allow_download=True``).

Rows must hold the chat schema (a ``messages`` column; images / videos inside the content items as paths,
``datasets.Image`` values or bytes). Each row is validated on access like a JSONL line: a broken row becomes
``{"messages": None, "index": i, "error": "row i: ..."}``, which the collators skip and count (``strict=True``
raises instead). JSONL files stay with :class:`~nemo_automodel_bard.data.chat_dataset.ChatDataset`: its line
reader reports a bad line by number and mixes string and list ``content`` freely, where Arrow needs one type
per column and a single bad line fails the whole load.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Optional

from .chat_dataset import ChatDataset

__all__ = ["HFChatDataset", "hf_chat_dataset"]


@contextlib.contextmanager
def _offline(enabled: bool):
    """Offline mode of ``datasets`` and ``huggingface_hub`` while loading (both read their environment variables
    once, at import, so the module settings are switched, then restored)."""
    if not enabled:
        yield
        return
    import datasets.config
    import huggingface_hub.constants

    saved = [(datasets.config, "HF_HUB_OFFLINE"), (datasets.config, "HF_DATASETS_OFFLINE"),
             (huggingface_hub.constants, "HF_HUB_OFFLINE")]
    old = [(module, name, getattr(module, name)) for module, name in saved if hasattr(module, name)]
    for module, name, _ in old:
        setattr(module, name, True)
    try:
        yield
    finally:
        for module, name, value in old:
            setattr(module, name, value)


def _require_datasets():
    try:
        import datasets
    except ImportError as exc:  # pragma: no cover - exercised only without the extra
        raise ImportError("Hugging Face data needs the datasets library: pip install -e '.[data]'") from exc
    return datasets


class HFChatDataset(ChatDataset):
    """Map-style chat records of one split of a Hugging Face dataset (see the module docstring).

    Args:
        name: a local directory (data files, or a ``save_to_disk`` directory) or a cached hub dataset name.
        split: the split to read (``train``, ``test``, ... or a slice such as ``train[:1000]``).
        config: the dataset configuration name, if it has several.
        image_root: directory relative media paths are resolved against (default: ``name`` when it is a
            directory, else the working directory).
        strict / max_samples: as for :class:`ChatDataset`.
        allow_download: let ``datasets`` reach the hub (default: cache and local files only).
    """

    def __init__(self, name: str, split: str = "train", config: Optional[str] = None, image_root: Optional[str] = None,
                 strict: bool = False, max_samples: Optional[int] = None, allow_download: bool = False) -> None:
        datasets = _require_datasets()
        path = Path(str(name)).expanduser()
        saved = path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file())
        try:
            with _offline(not allow_download):
                if saved:
                    loaded = datasets.load_from_disk(str(path))
                    if isinstance(loaded, datasets.DatasetDict):
                        if split not in loaded:
                            raise ValueError(f"split {split!r} not found; available: {list(loaded)}")
                        loaded = loaded[split]
                else:
                    loaded = datasets.load_dataset(str(name), config, split=split)
        except (FileNotFoundError, ValueError, ConnectionError) as exc:
            raise ValueError(f"HFChatDataset: cannot load {str(name)!r} (config {config!r}, split {split!r}): "
                             f"{type(exc).__name__}: {exc}") from None
        if "messages" not in loaded.column_names:
            raise ValueError(f"HFChatDataset {str(name)!r} split {split!r}: no 'messages' column (columns: "
                             f"{loaded.column_names}); the chat schema is required")
        self.path = path
        self.name, self.split, self.config = str(name), split, config
        self.strict = bool(strict)
        self.num_invalid = 0
        self._invalid_seen: set[int] = set()
        self._offsets = []
        self._hf = loaded
        default_root = path if path.is_dir() else Path.cwd()
        self.image_root = str(image_root) if image_root is not None else str(default_root)
        if len(loaded) == 0:
            raise ValueError(f"HFChatDataset: {str(name)!r} split {split!r} holds no records")
        self._size = len(loaded) if max_samples is None else min(int(max_samples), len(loaded))

    def __repr__(self) -> str:
        return f"HFChatDataset(name={self.name!r}, split={self.split!r}, size={self._size})"


def hf_chat_dataset(name: str, split: str = "train", config: Optional[str] = None, **kwargs: Any) -> HFChatDataset:
    """``_target_``-friendly factory of :class:`HFChatDataset`."""
    return HFChatDataset(name, split=split, config=config, **kwargs)
