"""Chat-format datasets for Bard-VL training: JSONL files, saved Hugging Face datasets, the shapes task.

Every dataset here returns records in the published chat format plus an integer ``index`` (which
seeds the collator's noise)::

    {"messages": [{"role": "user", "content": [{"type": "image", "image": "/abs/path.png"},
                                               {"type": "text", "text": "..."}]},
                  {"role": "assistant", "content": "..."}],
     "index": 3}

Records are validated lazily, on access. A broken record (invalid JSON, not an object, no valid
``messages``) is reported with its line number and returned as ``{"index": i, "error": reason}``,
which :class:`~nemo_automodel_bard.data.collator.BardVLCollator` skips and counts; with
``strict=True`` the dataset raises ``ValueError`` instead.

Example (YAML, NeMo's loader resolves ``_target_``)::

    dataset:
      _target_: nemo_automodel_bard.data.chat_dataset.ChatDataset
      path: /data/train.jsonl          # image paths inside are relative to /data unless image_root is set
    validation_dataset:
      _target_: nemo_automodel_bard.data.chat_dataset.shapes_dataset
      split: heldout
      size: 64
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Mapping, Optional, Union

from .media import MEDIA_ITEM_KEYS
from .records import ROLES

logger = logging.getLogger(__name__)

__all__ = ["ChatDataset", "ShapesChatDataset", "shapes_dataset", "validate_record"]



def validate_record(record: Any) -> Optional[str]:
    """Why ``record`` is not a usable chat record, or ``None`` when it is (structure only; media
    files are checked by the collator)."""
    if not isinstance(record, Mapping):
        return f"record must be a JSON object, got {type(record).__name__}"
    messages = record.get("messages")
    if not isinstance(messages, (list, tuple)) or not messages:
        return "missing or empty 'messages' list"
    for i, msg in enumerate(messages):
        if not isinstance(msg, Mapping):
            return f"message {i} is not an object"
        if msg.get("role") not in ROLES:
            return f"message {i} has role {msg.get('role')!r}; expected one of {ROLES}"
        content = msg.get("content")
        if not isinstance(content, (str, list, tuple)):
            return f"message {i} content must be a string or a list, got {type(content).__name__}"
        if not isinstance(content, str) and not all(isinstance(item, Mapping) for item in content):
            return f"message {i} content items must be objects"
    return None


def _resolve_media(ref: Any, root: Optional[str]) -> Any:
    """Relative string paths -> paths under ``root`` (URLs, data URIs, absolute paths unchanged)."""
    if isinstance(ref, str) and root is not None and not ref.startswith(("http://", "https://", "data:", "file://")):
        if not os.path.isabs(os.path.expanduser(ref)):
            return os.path.join(root, ref)
        return ref
    if isinstance(ref, (list, tuple)):
        return [_resolve_media(r, root) for r in ref]
    if isinstance(ref, Mapping) and isinstance(ref.get("url"), str):  # OpenAI-style {"image_url": {"url": ...}}
        return {**ref, "url": _resolve_media(ref["url"], root)}
    return ref


def _with_resolved_paths(messages: list, root: Optional[str]) -> list:
    out = []
    for msg in messages:
        content = msg.get("content")
        if isinstance(content, (list, tuple)):
            items = []
            for item in content:
                item = dict(item)
                for key in MEDIA_ITEM_KEYS:
                    if item.get(key) is not None:
                        item[key] = _resolve_media(item[key], root)
                items.append(item)
            msg = {**msg, "content": items}
        out.append(dict(msg))
    return out


class ChatDataset:
    """Map-style dataset of chat records from a JSONL file or a ``datasets.save_to_disk`` directory.

    Args:
        path: a ``.jsonl`` file (one record per non-empty line) or a directory written by
            ``datasets.Dataset.save_to_disk`` (or a ``DatasetDict``; then pass ``split``).
        image_root: directory relative image / video paths are resolved against (default: the JSONL
            file's directory, or the saved dataset's directory).
        split: split name of a saved ``DatasetDict``.
        strict: raise ``ValueError`` on a broken record instead of returning an error record.
        max_samples: use only the first ``max_samples`` records.

    ``dataset[i]`` returns ``{"messages": [...], "index": i}`` (relative media paths made absolute),
    or ``{"messages": None, "index": i, "error": "line 7: ..."}`` for a broken record;
    ``num_invalid`` counts the broken records seen so far in this process.

    Example:
        >>> ds = ChatDataset("/data/train.jsonl")                                # doctest: +SKIP
        >>> ds[0]["index"], ds[0]["messages"][-1]["role"]                         # doctest: +SKIP
        (0, 'assistant')
    """

    def __init__(
        self,
        path: Union[str, os.PathLike],
        image_root: Optional[str] = None,
        split: Optional[str] = None,
        strict: bool = False,
        max_samples: Optional[int] = None,
    ) -> None:
        self.path = Path(path)
        self.strict = bool(strict)
        self.num_invalid = 0
        self._invalid_seen: set[int] = set()
        self._hf = None
        self._offsets: list[tuple[int, int]] = []  # (line number, byte offset) per record
        if self.path.is_dir():
            import datasets

            loaded = datasets.load_from_disk(str(self.path))
            if isinstance(loaded, datasets.DatasetDict):
                if split is None:
                    raise ValueError(f"{self.path} holds a DatasetDict with splits {list(loaded)}; pass split=")
                if split not in loaded:
                    raise ValueError(f"{self.path}: split {split!r} not found; available: {list(loaded)}")
                loaded = loaded[split]
            self._hf = loaded
            default_root = self.path
        elif self.path.is_file():
            with self.path.open("rb") as f:
                offset = 0
                for number, line in enumerate(f, start=1):
                    if line.strip():
                        self._offsets.append((number, offset))
                    offset += len(line)
            default_root = self.path.parent
        else:
            raise FileNotFoundError(f"ChatDataset: {str(self.path)!r} is neither a JSONL file nor a saved dataset directory")
        self.image_root = str(image_root) if image_root is not None else str(default_root)
        total = len(self._hf) if self._hf is not None else len(self._offsets)
        if total == 0:
            raise ValueError(f"ChatDataset: {str(self.path)!r} holds no records")
        self._size = total if max_samples is None else min(int(max_samples), total)

    def __len__(self) -> int:
        return self._size

    def __repr__(self) -> str:
        return f"ChatDataset(path={str(self.path)!r}, size={self._size}, image_root={self.image_root!r})"

    def _raw(self, index: int) -> tuple[Any, str, Optional[str]]:
        """``(record or None, where, parse error or None)``."""
        if self._hf is not None:
            return self._hf[index], f"row {index}", None
        number, offset = self._offsets[index]
        where = f"{self.path.name} line {number}"
        with self.path.open("rb") as f:
            f.seek(offset)
            line = f.readline()
        try:
            return json.loads(line.decode("utf-8-sig")), where, None  # -sig: a leading byte-order mark
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            return None, where, f"invalid JSON ({exc})"

    def __getitem__(self, index: int) -> dict[str, Any]:
        if index < 0:
            index += self._size
        if not 0 <= index < self._size:
            raise IndexError(f"ChatDataset index {index} out of range for size {self._size}")
        record, where, error = self._raw(index)
        if error is None:
            error = validate_record(record)
        if error is not None:
            reason = f"{where}: {error}"
            if self.strict:
                raise ValueError(f"ChatDataset {str(self.path)!r}, record {index}: {reason}")
            if index not in self._invalid_seen:
                self._invalid_seen.add(index)
                self.num_invalid += 1
                logger.warning("ChatDataset: skipping record %d (%s)", index, reason)
            return {"messages": None, "index": index, "error": reason}
        return {"messages": _with_resolved_paths(list(record["messages"]), self.image_root), "index": index}


class ShapesChatDataset:
    """The embedded shapes task (:mod:`nemo_automodel_bard.data.shapes`) as chat records with
    inline PIL images and an ``index``.

    Example:
        >>> ds = ShapesChatDataset(split="heldout", size=2)
        >>> rec = ds[1]
        >>> rec["index"], rec["messages"][0]["content"][0]["image"].size
        (1, (96, 96))
    """

    def __init__(self, split: str = "train", size: int = 1000, seed: int = 0, image_size: int = 96, grid: int = 3,
                 order: str = "reading", offset: int = 0) -> None:
        from .shapes import ShapesDataset, ShapesTask

        if not isinstance(offset, int) or offset < 0:
            raise ValueError(f"ShapesChatDataset: offset must be a non-negative int, got {offset!r}")
        self.split, self.size, self.seed, self.order, self.offset = split, int(size), int(seed), order, offset
        task = ShapesTask(seed=seed, image_size=image_size, grid=grid, order=order)
        self._inner = ShapesDataset(task, split, self.offset + self.size)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict[str, Any]:
        if index < 0:
            index += len(self)
        if not 0 <= index < self.size:
            raise IndexError(f"ShapesChatDataset({self.split!r}): index {index} out of range for size {self.size}")
        task_index = self.offset + index
        record = self._inner[task_index]
        # the task index (not the position) seeds the noise: another offset is other data and other noise
        return {"messages": record["messages"], "index": int(task_index)}

    def __repr__(self) -> str:
        order = "" if self.order == "reading" else f", order={self.order!r}"
        offset = f", offset={self.offset}" if self.offset else ""
        return f"ShapesChatDataset(split={self.split!r}, size={self.size}, seed={self.seed}{order}{offset})"


def shapes_dataset(
    split: str = "train", size: int = 1000, seed: int = 0, image_size: int = 96, grid: int = 3, order: str = "reading",
    offset: int = 0,
) -> ShapesChatDataset:
    """Factory for :class:`ShapesChatDataset` (``_target_``-friendly); ``order``: see :class:`ShapesTask`.

    ``offset``: the dataset is the task's samples ``offset .. offset + size - 1`` of ``split`` (the task is
    procedural, so disjoint offsets give fresh images; the pipeline gives every stage and run seed its own)."""
    return ShapesChatDataset(split=split, size=size, seed=seed, image_size=image_size, grid=grid, order=order,
                             offset=offset)
