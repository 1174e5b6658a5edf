"""Chat records in Megatron-Energon WebDataset shards: the converter, the reader and its savable state.

Three pieces:

* :func:`convert_to_energon` writes chat records (a JSONL file with its image / video files, a saved
  Hugging Face dataset, or any sequence of records) as WebDataset tar shards that carry their media
  inside, and indexes them the way ``energon prepare`` does (``.nv-meta/``: split, sample index, and a
  ``dataset.yaml`` declaring crude samples). Command: ``python -m nemo_automodel_bard.data.energon``.
* :class:`EnergonChatStream` reads such shards (or an Energon metadataset YAML that blends several
  of them with weights) through Energon's savable loader and yields the same records as
  :class:`~nemo_automodel_bard.data.chat_dataset.ChatDataset`: ``{"messages": [...], "index": i}``
  with the media as bytes, or ``{"messages": None, "index": i, "error": reason}`` for a broken sample
  (the collators skip and count those). Each data-parallel rank reads its own part of the shards.
* ``state_dict()`` / ``load_state_dict()``: Energon's loader state of this rank as plain JSON text, so
  that a checkpoint stores it without pickling and a resumed run continues with the next sample.

One shard sample is::

    000000017.json   {"index": 17, "messages": [... {"type": "image", "image": {"energon_part": "m0"}} ...]}
    000000017.m0     the image file's bytes (PNG, JPEG, ...)
    000000017.m1     a video file's bytes, or one frame of a frame-list video

Energon and its dependencies are imported lazily: install the ``data`` extra
(``pip install -e '.[data]'``) to use this module.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import importlib
import io
import json
import logging
import os
import tarfile
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Optional, Sequence, Union

import torch

from .media import MEDIA_ITEM_KEYS, media_path

logger = logging.getLogger(__name__)

__all__ = [
    "EnergonChatStream",
    "EnergonDataError",
    "convert_to_energon",
    "decode_state",
    "encode_state",
    "energon_dataset",
    "require_energon",
]

#: key of a media reference inside a shard sample's JSON (``{"energon_part": "m0"}``)
PART_KEY = "energon_part"
#: the file naming this dataset as Bard-VL chat shards (inside ``.nv-meta``)
MARKER_FILE = "bard_chat.json"


class EnergonDataError(ValueError):
    """Energon shards, a metadataset or a saved loader state cannot be used (the message says why)."""


def require_energon():
    """Import ``megatron.energon`` or raise an ``ImportError`` that names the extra to install."""
    try:
        import megatron.energon as energon
    except ImportError as exc:  # pragma: no cover - exercised only without the extra
        raise ImportError(
            "Energon data needs megatron-energon: pip install -e '.[data]' (or: pip install 'megatron-energon>=7.4')"
        ) from exc
    return energon


# ------------------------------------------------------------------------------------------------ conversion


def _media_bytes(ref: Any, root: Optional[str], what: str) -> tuple[bytes, str]:
    """``(bytes, suffix)`` of one image / frame / video reference; ``ValueError`` naming it otherwise."""
    from PIL import Image

    if isinstance(ref, Image.Image):
        buf = io.BytesIO()
        ref.save(buf, format="PNG")
        return buf.getvalue(), ".png"
    if isinstance(ref, (bytes, bytearray, memoryview)):
        return bytes(ref), ""
    if isinstance(ref, Mapping):
        if ref.get("bytes") is not None:
            return bytes(ref["bytes"]), Path(str(ref.get("path") or "")).suffix
        for key in ("path", "url"):
            if isinstance(ref.get(key), str):
                return _media_bytes(ref[key], root, what)
        raise ValueError(f"{what}: a dict reference needs 'bytes', 'path' or 'url', got keys {sorted(ref)}")
    if isinstance(ref, str):
        if ref.startswith("data:"):
            try:
                return base64.b64decode(ref.split(",", 1)[1]), ""
            except (IndexError, ValueError):
                raise ValueError(f"{what}: malformed data: URI") from None
        if ref.startswith(("http://", "https://")):
            raise ValueError(f"{what}: remote media are not converted (download them first): {ref!r}")
        path = media_path(ref, root)
        if not path.is_file():
            raise ValueError(f"{what}: file not found: {str(path)!r}")
        return path.read_bytes(), path.suffix
    raise ValueError(f"{what}: unsupported media reference of type {type(ref).__name__}")


def _pack_record(record: Mapping[str, Any], root: Optional[str]) -> tuple[dict, list[tuple[str, bytes]]]:
    """The shard JSON of one chat record (media replaced by part references) and its media parts."""
    parts: list[tuple[str, bytes]] = []

    def part(ref: Any, what: str) -> dict:
        data, suffix = _media_bytes(ref, root, what)
        name = f"m{len(parts)}"
        parts.append((name, data))
        return {PART_KEY: name, "suffix": suffix} if suffix else {PART_KEY: name}

    messages = []
    for m, msg in enumerate(record["messages"]):
        content = msg.get("content")
        if isinstance(content, (list, tuple)):
            items = []
            for c, item in enumerate(content):
                item = dict(item)
                for key in MEDIA_ITEM_KEYS:
                    ref = item.get(key)
                    if ref is None:
                        continue
                    what = f"message {m} item {c} ({key})"
                    if key == "image_url" and isinstance(ref, Mapping) and "url" in ref:
                        item[key] = {**ref, "url": part(ref["url"], what)}
                    elif key == "video" and isinstance(ref, (list, tuple)):
                        item[key] = [part(frame, f"{what} frame {f}") for f, frame in enumerate(ref)]
                    else:
                        item[key] = part(ref, what)
                items.append(item)
            msg = {**msg, "content": items}
        messages.append(dict(msg))
    return {"index": int(record["index"]), "messages": messages}, parts


def _add_file(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # shards are reproducible byte for byte
    tar.addfile(info, io.BytesIO(data))


def convert_to_energon(
    source: Union[str, os.PathLike, Sequence[Mapping[str, Any]]],
    out_dir: Union[str, os.PathLike],
    *,
    image_root: Optional[str] = None,
    samples_per_shard: int = 1000,
    split: Optional[Mapping[str, float]] = None,
    strict: bool = False,
    max_samples: Optional[int] = None,
    workers: int = 1,
) -> dict[str, Any]:
    """Write chat records as Energon shards under ``out_dir`` and index them (``energon prepare``).

    Args:
        source: a ``.jsonl`` file or saved dataset directory (read with
            :class:`~nemo_automodel_bard.data.chat_dataset.ChatDataset`; media paths relative to
            ``image_root``, default the file's directory), or a sequence of records with ``index``.
        out_dir: the dataset directory (created; existing shards there are refused).
        samples_per_shard: samples per tar file.
        split: split name -> ratio over the shards (default ``{"train": 1.0}``).
        strict: raise on the first broken record instead of skipping it.
        max_samples: convert only the first ``max_samples`` records.
        workers: processes that index the shards.

    Returns:
        ``{"path", "shards", "samples", "skipped": [(index, reason), ...], "splits"}``; broken records
        (invalid JSON, missing media, ...) are skipped, counted and logged, never written.
    """
    require_energon()
    from megatron.energon.flavors import BaseWebdatasetFactory

    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    out = Path(out_dir)
    if out.exists() and any(out.glob("*.tar")):
        raise FileExistsError(f"{out} already holds shards; convert into a new directory")
    out.mkdir(parents=True, exist_ok=True)
    if isinstance(source, (str, os.PathLike)):
        from .chat_dataset import ChatDataset

        dataset: Any = ChatDataset(source, image_root=image_root, strict=strict, max_samples=max_samples)
        root = None  # ChatDataset already resolved relative media paths against image_root
        records: Iterable[Mapping[str, Any]] = (dataset[i] for i in range(len(dataset)))
    else:
        root = image_root
        records = list(source)[:max_samples] if max_samples is not None else source

    shards: list[str] = []
    skipped: list[tuple[int, str]] = []
    written = 0
    tar: Optional[tarfile.TarFile] = None
    try:
        for position, record in enumerate(records):
            index = int(record.get("index", position))
            error = record.get("error")
            if error is None:
                from .chat_dataset import validate_record

                error = validate_record(record)
            packed = None
            if error is None:
                try:
                    packed, parts = _pack_record(record, root)
                except ValueError as exc:
                    error = str(exc)
            if error is not None:
                if strict:
                    raise ValueError(f"convert_to_energon: record {index}: {error}")
                skipped.append((index, str(error)))
                logger.warning("convert_to_energon: skipping record %d (%s)", index, error)
                continue
            if tar is None or written % samples_per_shard == 0:
                if tar is not None:
                    tar.close()
                name = f"shard-{len(shards):06d}.tar"
                shards.append(name)
                tar = tarfile.open(out / name, "w")
            key = f"{written:09d}"
            _add_file(tar, f"{key}.json", json.dumps(packed, ensure_ascii=False).encode("utf-8"))
            for part_name, data in parts:
                _add_file(tar, f"{key}.{part_name}", data)
            written += 1
    finally:
        if tar is not None:
            tar.close()
    if not written:
        raise ValueError(f"convert_to_energon: no usable record in {source!r} ({len(skipped)} skipped)")
    ratios = list((split or {"train": 1.0}).items())
    BaseWebdatasetFactory.prepare_dataset(out, shards, split_parts_ratio=ratios, shuffle_seed=None,
                                          workers=max(1, int(workers)))
    meta = out / ".nv-meta"
    (meta / "dataset.yaml").write_text("__module__: megatron.energon\n__class__: CrudeWebdataset\n")
    summary = {"path": str(out), "shards": len(shards), "samples": written, "skipped": skipped,
               "splits": dict(ratios)}
    (meta / MARKER_FILE).write_text(json.dumps({"format": "bard-vl chat shards", "version": 1,
                                                "samples": written, "skipped": len(skipped)}) + "\n")
    return summary


# ------------------------------------------------------------------------------------------------ cooking


class _VideoSpool:
    """Video files inside shards, written to a bounded scratch directory (the collator decodes video files
    by path): the most recent ``keep`` files are kept, older ones removed."""

    def __init__(self, keep: int = 64) -> None:
        self.keep = keep
        self.dir: Optional[Path] = None
        self.files: list[Path] = []

    def path_for(self, data: bytes, suffix: str) -> str:
        if self.dir is None:
            self.dir = Path(tempfile.mkdtemp(prefix="bard-energon-video-"))
        path = self.dir / (hashlib.blake2b(data, digest_size=12).hexdigest() + (suffix or ".mp4"))
        if not path.is_file():
            tmp = path.with_suffix(path.suffix + ".tmp")
            tmp.write_bytes(data)
            tmp.replace(path)
            self.files.append(path)
            while len(self.files) > self.keep:
                self.files.pop(0).unlink(missing_ok=True)
        return str(path)


_SPOOL = _VideoSpool()


def _unpack(value: Any, parts: Mapping[str, Any], key: str, where: str) -> Any:
    """A part reference replaced by the part's bytes (video files: a spooled path)."""
    if isinstance(value, Mapping) and PART_KEY in value:
        name = value[PART_KEY]
        data = parts.get(name)
        if not isinstance(data, (bytes, bytearray)):
            raise EnergonDataError(f"{where}: part {name!r} is missing from the shard sample")
        if key == "video":
            return _SPOOL.path_for(bytes(data), str(value.get("suffix") or ""))
        return bytes(data)
    if isinstance(value, list):  # a frame-list video: frames stay image bytes
        return [_unpack(v, parts, "image", where) for v in value]
    if isinstance(value, Mapping) and "url" in value:
        return {**value, "url": _unpack(value["url"], parts, key, where)}
    return value


def _source_name(crude: Mapping[str, Any]) -> str:
    subflavors = crude.get("__subflavors__") or {}
    if isinstance(subflavors, Mapping) and subflavors.get("source") is not None:
        return str(subflavors["source"])
    sources = crude.get("__sources__") or ()
    if sources:
        return Path(str(getattr(sources[0], "dataset_path", ""))).name
    return ""


def chat_record_from_crude(crude: Mapping[str, Any]) -> dict[str, Any]:
    """One crude shard sample (``json`` + media parts) as a chat record; a broken sample becomes an
    error record ``{"messages": None, "index": i, "error": "<shard> <key>: ..."}``."""
    where = f"{crude.get('__shard__', '?')} sample {crude.get('__key__', '?')}"
    source = _source_name(crude)
    raw = crude.get("json")
    index = -1
    try:
        if isinstance(raw, (bytes, bytearray)):
            raw = json.loads(bytes(raw).decode("utf-8"))
        if not isinstance(raw, Mapping):
            raise EnergonDataError(f"{where}: no JSON object in part 'json'")
        index = int(raw.get("index", -1))
        from .chat_dataset import validate_record

        problem = validate_record(raw)
        if problem is not None:
            raise EnergonDataError(f"{where}: {problem}")
        messages = []
        for msg in raw["messages"]:
            content = msg.get("content")
            if isinstance(content, list):
                items = []
                for item in content:
                    item = dict(item)
                    for key in MEDIA_ITEM_KEYS:
                        if item.get(key) is not None:
                            item[key] = _unpack(item[key], crude, key, where)
                    items.append(item)
                msg = {**msg, "content": items}
            messages.append(dict(msg))
    except (EnergonDataError, ValueError, TypeError) as exc:
        return {"messages": None, "index": index, "error": str(exc), "source": source}
    return {"messages": messages, "index": index, "source": source}


def _task_encoder():
    """Energon task encoder whose cooker turns crude shard samples into chat records."""
    require_energon()
    from ._energon_task import ChatTaskEncoder

    return ChatTaskEncoder()


# ------------------------------------------------------------------------------------------------ state codec


def _encode(obj: Any) -> Any:
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, (bytes, bytearray)):
        return {"__bytes__": base64.b64encode(bytes(obj)).decode("ascii")}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v) for v in obj]}
    if isinstance(obj, list):
        return [_encode(v) for v in obj]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        cls = type(obj)
        fields = {f.name: _encode(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
        return {"__class__": f"{cls.__module__}:{cls.__qualname__}", "fields": fields}
    if isinstance(obj, dict):
        if not all(isinstance(k, str) for k in obj):
            return {"__items__": [[_encode(k), _encode(v)] for k, v in obj.items()],
                    **_dict_class(obj)}
        return {"__dict__": {k: _encode(v) for k, v in obj.items()}, **_dict_class(obj)}
    if isinstance(obj, torch.Tensor):  # e.g. torch RNG states
        t = obj.detach().cpu().contiguous()
        return {"__tensor__": base64.b64encode(t.view(torch.uint8).numpy().tobytes()).decode("ascii"),
                "dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)}
    if type(obj).__module__ == "numpy":
        import numpy as np

        if isinstance(obj, np.ndarray):
            return {"__ndarray__": base64.b64encode(np.ascontiguousarray(obj).tobytes()).decode("ascii"),
                    "dtype": obj.dtype.str, "shape": list(obj.shape)}
        return _encode(obj.item())  # numpy scalars
    raise TypeError(f"cannot store a value of type {type(obj).__name__} in a loader state")


def _dict_class(obj: dict) -> dict:
    cls = type(obj)
    return {} if cls is dict else {"__class__": f"{cls.__module__}:{cls.__qualname__}"}


def _energon_class(name: str) -> type:
    module, _, qualname = name.partition(":")
    if not module.startswith("megatron.energon"):
        raise EnergonDataError(f"loader state names class {name!r} outside megatron.energon; refusing to build it")
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    if not isinstance(obj, type):
        raise EnergonDataError(f"loader state: {name!r} is not a class")
    return obj


def _decode(obj: Any) -> Any:
    if isinstance(obj, list):
        return [_decode(v) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__bytes__" in obj:
        return base64.b64decode(obj["__bytes__"])
    if "__tensor__" in obj:
        dtype = getattr(torch, str(obj["dtype"]), None)
        if not isinstance(dtype, torch.dtype):
            raise EnergonDataError(f"loader state: unknown tensor dtype {obj['dtype']!r}")
        raw = bytearray(base64.b64decode(obj["__tensor__"]))
        flat = torch.frombuffer(raw, dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
        return flat.view(dtype).reshape(obj["shape"]).clone()
    if "__ndarray__" in obj:
        import numpy as np

        return np.frombuffer(base64.b64decode(obj["__ndarray__"]), dtype=np.dtype(obj["dtype"])).reshape(
            obj["shape"]).copy()
    if "__tuple__" in obj:
        return tuple(_decode(v) for v in obj["__tuple__"])
    if "fields" in obj and "__class__" in obj:
        cls = _energon_class(obj["__class__"])
        if not dataclasses.is_dataclass(cls):
            raise EnergonDataError(f"loader state: {obj['__class__']!r} is not a dataclass")
        fields = {k: _decode(v) for k, v in obj["fields"].items()}
        init = {f.name for f in dataclasses.fields(cls) if f.init}
        inst = cls(**{k: v for k, v in fields.items() if k in init})
        for k, v in fields.items():
            if k not in init:
                object.__setattr__(inst, k, v)
        return inst
    if "__dict__" in obj or "__items__" in obj:
        items = (obj["__dict__"].items() if "__dict__" in obj
                 else ((_decode(k), v) for k, v in obj["__items__"]))
        cls = _energon_class(obj["__class__"]) if "__class__" in obj else dict
        if not issubclass(cls, dict):
            raise EnergonDataError(f"loader state: {obj['__class__']!r} is not a dict type")
        return cls({k: _decode(v) for k, v in items})
    return obj


def encode_state(state: Any) -> str:
    """Energon loader state (dataclasses, dicts, bytes, tuples) as JSON text (no pickle)."""
    return json.dumps(_encode(state), separators=(",", ":"))


def decode_state(text: str) -> Any:
    """Inverse of :func:`encode_state`; only classes of ``megatron.energon`` are rebuilt."""
    return _decode(json.loads(text))


# ------------------------------------------------------------------------------------------------ reading


def dist_rank_world() -> tuple[int, int]:
    """``(rank, world_size)`` of torch.distributed when initialised, else ``(0, 1)``."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def check_energon_path(path: Union[str, os.PathLike]) -> Path:
    """The dataset directory (prepared: ``.nv-meta/``) or metadataset YAML at ``path``, or a clear error."""
    p = Path(path).expanduser()
    if p.is_file() and p.suffix in (".yaml", ".yml"):
        return p
    if p.is_dir():
        if not (p / ".nv-meta" / "split.yaml").is_file() and not (p / ".nv-meta" / "split.json").is_file():
            raise EnergonDataError(
                f"{p} is not a prepared Energon dataset (no .nv-meta/split.yaml); convert chat data with "
                "`python -m nemo_automodel_bard.data.energon SOURCE OUT_DIR` or run `energon prepare` on shards")
        return p
    raise EnergonDataError(f"Energon data path {str(p)!r} is neither a prepared dataset directory nor a "
                           "metadataset YAML")


class EnergonChatStream(torch.utils.data.IterableDataset):
    """Chat records of this data-parallel rank from Energon shards, in Energon's order, with its loader state.

    Args:
        path: a prepared dataset directory (see :func:`convert_to_energon`) or an Energon metadataset YAML
            (``__module__: megatron.energon``, ``__class__: MetadatasetV2``, ``splits: train: blend: [...]``
            with a ``weight`` and optional ``subflavors: {source: name}`` per dataset).
        rank / world_size: the data-parallel rank and size (default: torch.distributed's, else 0 / 1).
        split: the split part (``train``; ``val`` / ``test`` read once, in order).
        num_workers: Energon loader worker processes of this rank (0: read in this process).
        shuffle_buffer_size: Energon's sample shuffle buffer (``None``: shard-order sampling only).
        max_samples_per_sequence: samples read in a row from one shard slice (``None``: whole slices).
        seed_offset: added to Energon's seeds (a different data order).

    Training splits repeat without end (every rank always has a next sample, so ranks stay in step);
    the recipe's ``step_scheduler.max_steps`` ends the run. Each training record carries ``noise_epoch``,
    the number of passes over this rank's samples before it, which the diffusion collator uses as its
    epoch (a record that comes round again gets another noise draw). :meth:`num_samples` is the number of samples of
    this rank in one pass. ``state_dict()`` holds Energon's state of this rank (JSON text) and the count of
    records yielded; ``load_state_dict()`` continues exactly after the last yielded record.
    """

    def __init__(
        self,
        path: Union[str, os.PathLike],
        *,
        rank: Optional[int] = None,
        world_size: Optional[int] = None,
        split: str = "train",
        num_workers: int = 0,
        shuffle_buffer_size: Optional[int] = None,
        max_samples_per_sequence: Optional[int] = None,
        seed_offset: int = 0,
    ) -> None:
        super().__init__()
        require_energon()
        self.path = check_energon_path(path)
        if rank is None or world_size is None:
            rank, world_size = dist_rank_world()
        if not 0 <= int(rank) < int(world_size):
            raise ValueError(f"EnergonChatStream: rank {rank} out of range for world size {world_size}")
        self.rank, self.world_size = int(rank), int(world_size)
        self.split = str(split)
        self.training = self.split == "train"
        self.num_workers = int(num_workers)
        self.shuffle_buffer_size = shuffle_buffer_size
        self.max_samples_per_sequence = max_samples_per_sequence
        self.seed_offset = int(seed_offset)
        self.yielded = 0
        self._loader = None
        self._iterator: Optional[Iterator[Any]] = None

    def __repr__(self) -> str:
        return (f"EnergonChatStream(path={str(self.path)!r}, split={self.split!r}, rank={self.rank}, "
                f"world_size={self.world_size}, num_workers={self.num_workers})")

    def _build_loader(self):
        energon = require_energon()
        worker_config = energon.WorkerConfig(rank=self.rank, world_size=self.world_size,
                                             num_workers=self.num_workers, seed_offset=self.seed_offset)
        common = dict(split_part=self.split, worker_config=worker_config, task_encoder=_task_encoder())
        try:
            if self.training:
                dataset = energon.get_train_dataset(
                    str(self.path), batch_size=None, shuffle_buffer_size=self.shuffle_buffer_size,
                    max_samples_per_sequence=self.max_samples_per_sequence, **common)
            else:
                dataset = energon.get_val_dataset(str(self.path), batch_size=None, **common)
        except Exception as exc:
            raise EnergonDataError(f"cannot open Energon data {str(self.path)!r} (split {self.split!r}): "
                                   f"{type(exc).__name__}: {exc}") from exc
        return energon.get_savable_loader(dataset, watchdog_timeout_seconds=None)

    @property
    def loader(self):
        if self._loader is None:
            self._loader = self._build_loader()
        return self._loader

    def num_samples(self) -> int:
        """Samples of this rank in one pass over its shards (Energon's ``len`` of the loader; no ``__len__``:
        the training stream does not end after them)."""
        return len(self.loader)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if not self.training:  # validation: one full, ordered pass each time
            for sample in self._build_loader():
                yield dict(sample.record)
            return
        if self._iterator is None:
            self._iterator = iter(self.loader)
        per_pass = max(self.num_samples(), 1)
        for sample in self._iterator:
            # the pass over this rank's data seeds the diffusion noise (the collator's epoch: the stream never
            # ends an epoch); with a shuffle buffer a record near a pass boundary may be counted in the next
            record = {**sample.record, "noise_epoch": self.yielded // per_pass}
            self.yielded += 1
            yield record

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Plain-typed state of this rank (JSON text inside; safe for ``torch.load(weights_only=True)``)."""
        state = self.loader.save_state_rank() if self.training else None
        return {"energon_state": encode_state(state), "yielded": self.yielded, "rank": self.rank,
                "world_size": self.world_size, "path": str(self.path), "split": self.split}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue after the last record yielded when ``state`` was taken (same path, split, world size)."""
        for key, mine in (("path", str(self.path)), ("split", self.split), ("world_size", self.world_size)):
            if key in state and state[key] != mine:
                raise EnergonDataError(f"the saved Energon loader state has {key}={state[key]!r}, this run "
                                       f"{mine!r}; resume with the same data and number of ranks")
        if not self.training:
            return
        try:
            decoded = decode_state(state["energon_state"])
        except (KeyError, TypeError, ValueError) as exc:
            raise EnergonDataError(f"unreadable Energon loader state ({type(exc).__name__}: {exc})") from None
        self._iterator = None
        self._loader = self._build_loader()
        self._loader.restore_state_rank(decoded)
        self.yielded = int(state.get("yielded", 0))


#: keys a recipe's map-style ``dataset:`` section may still carry when the pipeline switches it to Energon
_OTHER_DATASET_KEYS = {"split", "size", "seed", "order", "offset", "kind", "image_root", "strict", "max_samples"}


def energon_dataset(
    path: Union[str, os.PathLike],
    *,
    rank: Optional[int] = None,
    world_size: Optional[int] = None,
    energon_split: str = "train",
    num_workers: int = 0,
    shuffle_buffer_size: Optional[int] = None,
    max_samples_per_sequence: Optional[int] = None,
    seed_offset: int = 0,
    **ignored: Any,
) -> EnergonChatStream:
    """``_target_`` of a recipe ``dataset:`` section reading Energon shards (see :class:`EnergonChatStream`).

    The recipes build its loader themselves (one per data-parallel rank, batches collated by the recipe's
    ``collate_fn``, state saved in each checkpoint). Keys of the map-style datasets a recipe YAML may still
    carry (``split``, ``size``, ``seed``, ``image_root``, ...) are ignored (shards carry their media); any
    other unknown key is an error."""
    unknown = sorted(set(ignored) - _OTHER_DATASET_KEYS)
    if unknown:
        raise TypeError(f"energon_dataset: unknown argument(s) {unknown}")
    return EnergonChatStream(path, rank=rank, world_size=world_size, split=energon_split, num_workers=num_workers,
                             shuffle_buffer_size=shuffle_buffer_size,
                             max_samples_per_sequence=max_samples_per_sequence, seed_offset=seed_offset)


# ------------------------------------------------------------------------------------------------ command


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m nemo_automodel_bard.data.energon SOURCE OUT_DIR``: chat data -> indexed Energon shards."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m nemo_automodel_bard.data.energon",
        description="Convert chat-format data (JSONL with its image/video files, or a saved Hugging Face dataset) "
                    "to self-contained Megatron-Energon WebDataset shards, indexed as `energon prepare` does.")
    parser.add_argument("source", help="a .jsonl file or a datasets.save_to_disk directory")
    parser.add_argument("out_dir", help="new dataset directory (shards + .nv-meta/)")
    parser.add_argument("--image-root", default=None, help="directory relative media paths are resolved against "
                                                           "(default: the JSONL file's directory)")
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    parser.add_argument("--split", default="train:1", help="split ratios over the shards, e.g. train:0.95,val:0.05")
    parser.add_argument("--max-samples", type=int, default=None)
    parser.add_argument("--strict", action="store_true", help="stop at the first broken record")
    parser.add_argument("--workers", type=int, default=4, help="processes that index the shards")
    args = parser.parse_args(argv)
    try:
        ratios = {name: float(value) for name, value in (p.split(":") for p in args.split.split(","))}
    except ValueError:
        parser.error(f"--split {args.split!r}: expected name:ratio[,name:ratio...]")
    summary = convert_to_energon(args.source, args.out_dir, image_root=args.image_root,
                                 samples_per_shard=args.samples_per_shard, split=ratios, strict=args.strict,
                                 max_samples=args.max_samples, workers=args.workers)
    print(f"wrote {summary['samples']} samples in {summary['shards']} shards to {summary['path']} "
          f"(splits {summary['splits']}); skipped {len(summary['skipped'])} broken record(s)")
    for index, reason in summary["skipped"][:20]:
        print(f"  skipped record {index}: {reason}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
