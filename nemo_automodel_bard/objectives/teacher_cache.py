"""Offline SWD teacher: the anchor's top-k at every KD position, computed once and read back.

The collator's corruption of a sample depends only on ``(seed, epoch, index)``
(:class:`~nemo_automodel_bard.data.collator.BardVLCollator`), so the teacher's input for a sample in
a given epoch is known before training starts. :func:`build_teacher_cache` runs the frozen anchor
over a data set for the epochs a run will see and stores, per sample, its top-``k`` logits and ids
at the sample's KD positions (the loss positions, minus block padding unless
``kd_at_block_padding``). A student run with ``bard.teacher_cache: <dir>`` then reads them instead
of running the teacher: no teacher forward and no teacher weights in memory during training, and
the online teacher's KD targets up to float rounding (nothing is frozen: every epoch has its own draw).

Layout of a cache directory::

    meta.json                           settings the cache was built with (checked when it is used)
    <split>_epoch_<e>.safetensors       one file per split ("train", "validation") and epoch:
        index    [S]    int64   dataset index of each cached sample
        offsets  [S+1]  int64   rows of sample s: offsets[s]:offsets[s+1]
        values   [R, k] fp32    teacher top-k logits, sorted by decreasing logit
        ids      [R, k] int32   their token ids
        targets  [R]    int32   gold token at each row (checked against the batch)
        levels   [S, N] fp32    corruption level of each response block (NaN-padded; checked)
        input_hash [S]  int64   hash of the sample's tokens and mRoPE positions in the row (checked)

Files are written to a temporary name and renamed, so an interrupted build leaves no half file.

Example:
    >>> build_teacher_cache(anchor, dataset, collator, "cache", split="train", epochs=3,  # doctest: +SKIP
    ...                     teacher_block_size=4, top_k=16)
    >>> cache = TeacherTopKCache("cache")                                               # doctest: +SKIP
    >>> values, ids = cache.lookup("train", 0, batch, kd_at_block_padding=False)        # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Union

import torch

from nemo_automodel_bard.diffusion.masks import TokenType

from .distillation import SWD_DEFAULTS, anchor_topk, kd_loss_rows

__all__ = [
    "CACHE_FORMAT",
    "TeacherCacheError",
    "TeacherTopKCache",
    "build_teacher_cache",
    "collator_fingerprint",
    "epochs_needed",
    "tokenizer_fingerprint",
]

#: format tag written to ``meta.json``
CACHE_FORMAT = "bard-vl-teacher-topk-v1"
_META = "meta.json"


class TeacherCacheError(ValueError):
    """A teacher cache that is missing, incomplete or does not match the run."""


def collator_fingerprint(collator: Any) -> dict[str, Any]:
    """The collator settings that decide a sample's corruption and loss positions."""
    inner = getattr(collator, "collator", collator)  # NemoDiffusionCollate wraps a BardVLCollator
    if getattr(inner, "train_all_turns", False):
        raise TeacherCacheError("a teacher cache needs one training sample per record; train_all_turns is not supported")
    return {
        "block_size": int(inner.block_size),
        "seed": int(inner.seed),
        "noise_mode": inner.noise_mode.value,
        "schedule": inner.schedule.name,
        "max_length": inner.max_length,
        "mask_token_id": int(inner.mask_token_id),
        "pad_block_token_id": int(inner.pad_block_token_id),
        "pad_weight": float(inner.pad_weight),
        "complementary": bool(getattr(inner, "complementary", False)),
        "substitution_ids": None if getattr(inner, "substitution_ids", None) is None else hashlib.blake2b(
            inner.substitution_ids.numpy().tobytes(), digest_size=8).hexdigest(),
        "image_root": getattr(inner, "image_root", None),
    }


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A short stable hash of a tokenizer's vocabulary (token -> id)."""
    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.blake2b(json.dumps(vocab).encode("utf-8"), digest_size=12).hexdigest()


def _per_sample(batch: Mapping[str, Any], rows: torch.Tensor) -> tuple[list[int], list[torch.Tensor], list[torch.Tensor]]:
    """Per sample of the batch (row-major order): dataset index, its KD rows and its block levels."""
    owner = torch.as_tensor(batch["loss_sample_index"]).cpu()[rows]
    indices = [int(i) for i in torch.as_tensor(batch["sample_indices"]).cpu()]
    level_owner = torch.as_tensor(batch["noise_levels_sample_index"]).cpu()
    levels = torch.as_tensor(batch["noise_levels"]).cpu().float()
    return (
        indices,
        [rows[owner == s] for s in range(len(indices))],
        [levels[level_owner == s] for s in range(len(indices))],
    )


def _input_hashes(batch: Mapping[str, Any]) -> list[int]:
    """Per sample (row-major order): a hash of its tokens and mRoPE positions in the row.

    A row holds its samples as consecutive documents (``doc_ids`` 0, 1, ...); dummy media appended by
    the recipes' collate wrapper form a document without clean tokens and are skipped.
    """
    ids = torch.as_tensor(batch["input_ids"]).cpu()
    pos = torch.as_tensor(batch["position_ids"]).cpu()
    docs = torch.as_tensor(batch["doc_ids"]).cpu()
    clean = torch.as_tensor(batch["token_type"]).cpu() == int(TokenType.CLEAN)
    out = []
    for r in range(ids.shape[0]):
        for d in torch.unique(docs[r][clean[r]]).tolist():
            span = docs[r] == d
            digest = hashlib.blake2b(ids[r][span].numpy().tobytes(), digest_size=8)
            digest.update(pos[:, r][:, span].contiguous().numpy().tobytes())
            out.append(int.from_bytes(digest.digest(), "little", signed=True))
    return out


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)


def _write_meta(path: Path, meta: dict) -> None:
    tmp = path / (_META + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2, sort_keys=True))
    os.replace(tmp, path / _META)


def build_teacher_cache(
    teacher: Any,
    dataset: Any,
    collator: Any,
    out_dir: Union[str, os.PathLike],
    *,
    split: str = "train",
    epochs: Union[int, Iterable[int]] = 1,
    teacher_block_size: int = SWD_DEFAULTS["teacher_block_size"],
    top_k: int = SWD_DEFAULTS["top_k"],
    kd_at_block_padding: bool = SWD_DEFAULTS["kd_at_block_padding"],
    batch_size: int = 32,
    attention: str = "auto",
    extra_meta: Optional[Mapping[str, Any]] = None,
    progress: bool = False,
) -> Path:
    """Run ``teacher`` over ``dataset`` for ``epochs`` and write ``<split>_epoch_<e>.safetensors`` files.

    ``collator`` is the run's block-diffusion collator (a :class:`BardVLCollator` or the recipes'
    ``NemoDiffusionCollate``); its ``set_epoch`` selects each epoch's noise. ``epochs``: a count (0..n-1) or
    the epoch numbers. ``extra_meta`` is stored in ``meta.json`` (e.g. the teacher's path). Returns
    the cache directory. A directory built for other settings is refused, not overwritten.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    epoch_list = list(range(int(epochs))) if isinstance(epochs, int) else [int(e) for e in epochs]
    if not epoch_list:
        raise ValueError("build_teacher_cache: no epochs to build")
    processor = getattr(collator, "processor", None) or getattr(getattr(collator, "collator", None), "processor", None)
    meta = {
        "format": CACHE_FORMAT,
        "teacher_block_size": int(teacher_block_size),
        "top_k": int(top_k),
        "kd_at_block_padding": bool(kd_at_block_padding),
        "tokenizer": tokenizer_fingerprint(processor.tokenizer) if processor is not None else None,
        **dict(extra_meta or {}),
    }
    split_collator = collator_fingerprint(collator)  # per split: validation collators differ (e.g. their seed)
    existing = _read_meta(out) if (out / _META).exists() else None
    if existing is not None:
        old = {k: v for k, v in existing.items() if k != "splits"}
        if old != meta:
            diff = sorted(k for k in set(old) | set(meta) if old.get(k) != meta.get(k))
            raise TeacherCacheError(f"{out}: the cache was built with other settings ({', '.join(diff)}); use a new directory")
    meta["splits"] = dict(existing.get("splits", {})) if existing else {}
    known = meta["splits"].get(split)
    if known is not None and known.get("collator") != split_collator:
        raise TeacherCacheError(f"{out}: its {split!r} split was built with other collator settings; use a new directory")

    device = next(teacher.parameters()).device
    teacher.eval()
    n = len(dataset)
    for epoch in epoch_list:
        collator.set_epoch(epoch)
        index_rows, offsets, values, ids, targets, levels, hashes = [], [0], [], [], [], [], []
        seen: set[int] = set()
        starts = range(0, n, batch_size)
        if progress:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc=f"teacher cache {split} epoch {epoch}")
        for start in starts:
            batch = collator([dataset[i] for i in range(start, min(n, start + batch_size))])
            if not int(batch.get("num_samples", 0)):
                continue  # every record of this batch was skipped by the collator
            rows = kd_loss_rows(batch, kd_at_block_padding)
            positions = torch.as_tensor(batch["loss_positions"]).long()[rows].to(device)
            top_values, top_ids = anchor_topk(teacher, batch, positions, teacher_block_size=teacher_block_size,
                                              top_k=top_k, attention=attention)
            local = torch.full((int(torch.as_tensor(batch["loss_positions"]).numel()),), -1, dtype=torch.long)
            local[rows] = torch.arange(rows.numel())
            gold = torch.as_tensor(batch["loss_targets"]).cpu()
            for (index, sample_rows, sample_levels), digest in zip(zip(*_per_sample(batch, rows)), _input_hashes(batch)):
                if index in seen:
                    raise TeacherCacheError(f"dataset index {index} occurs twice; a teacher cache needs unique record indices")
                seen.add(index)
                pick = local[sample_rows]
                index_rows.append(index)
                hashes.append(digest)
                values.append(top_values[pick].cpu())
                ids.append(top_ids[pick].cpu().to(torch.int32))
                targets.append(gold[sample_rows].to(torch.int32))
                levels.append(sample_levels)
                offsets.append(offsets[-1] + int(pick.numel()))
        width = max((lv.numel() for lv in levels), default=0)
        level_table = torch.full((len(levels), width), float("nan"))
        for s, lv in enumerate(levels):
            level_table[s, : lv.numel()] = lv
        k = min(int(top_k), int(top_values.shape[-1])) if values else int(top_k)
        _atomic_save(
            {
                "index": torch.tensor(index_rows, dtype=torch.int64),
                "offsets": torch.tensor(offsets, dtype=torch.int64),
                "values": torch.cat(values) if values else torch.zeros(0, k),
                "ids": torch.cat(ids) if ids else torch.zeros(0, k, dtype=torch.int32),
                "targets": torch.cat(targets) if targets else torch.zeros(0, dtype=torch.int32),
                "levels": level_table,
                "input_hash": torch.tensor(hashes, dtype=torch.int64),
            },
            out / f"{split}_epoch_{epoch}.safetensors",
        )
        meta["splits"].setdefault(split, {"num_samples": n, "epochs": [], "collator": split_collator})
        meta["splits"][split]["num_samples"] = n
        meta["splits"][split]["epochs"] = sorted(set(meta["splits"][split]["epochs"]) | {epoch})
        _write_meta(out, meta)
    return out


def _read_meta(path: Path) -> dict:
    try:
        meta = json.loads((path / _META).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise TeacherCacheError(f"{path}: cannot read {_META} ({exc}); build the cache first") from None
    if meta.get("format") != CACHE_FORMAT:
        raise TeacherCacheError(f"{path}: {_META} is not a teacher cache of format {CACHE_FORMAT!r}")
    return meta


class TeacherTopKCache:
    """Read side of a teacher cache directory (see the module docstring)."""

    def __init__(self, path: Union[str, os.PathLike]) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise TeacherCacheError(f"teacher cache {str(self.path)!r} does not exist; build it first")
        self.meta = _read_meta(self.path)
        self._files: dict[tuple[str, int], dict[str, Any]] = {}

    def check(self, expected: Mapping[str, Any]) -> None:
        """Raise :class:`TeacherCacheError` naming every setting in ``expected`` the cache disagrees with."""
        wrong = [
            f"{key}: cache {self.meta.get(key)!r}, run {value!r}"
            for key, value in expected.items()
            if self.meta.get(key) != value
        ]
        if wrong:
            raise TeacherCacheError(f"teacher cache {self.path} does not match this run: " + "; ".join(wrong))

    def check_split(self, split: str, collator: Any, num_samples: Optional[int] = None) -> None:
        """Refuse a split built with other collator settings or for a data set of another size."""
        info = self.meta.get("splits", {}).get(split)
        if info is None:
            raise TeacherCacheError(f"teacher cache {self.path} has no {split!r} split; build it with the run's YAML")
        ours = collator_fingerprint(collator)
        if info.get("collator") != ours:
            diff = sorted(k for k in ours if (info.get("collator") or {}).get(k) != ours[k])
            raise TeacherCacheError(
                f"teacher cache {self.path}: the {split!r} split was built with other collator settings ({', '.join(diff)})"
            )
        if num_samples is not None and int(info.get("num_samples", -1)) != int(num_samples):
            raise TeacherCacheError(
                f"teacher cache {self.path}: the {split!r} split was built for {info.get('num_samples')} records, "
                f"the run's data set has {num_samples}"
            )

    def epochs(self, split: str) -> list[int]:
        return list(self.meta.get("splits", {}).get(split, {}).get("epochs", []))

    def _file(self, split: str, epoch: int) -> dict[str, Any]:
        key = (split, int(epoch))
        if key not in self._files:
            if int(epoch) not in self.epochs(split):
                raise TeacherCacheError(
                    f"teacher cache {self.path} has no {split!r} data for epoch {epoch} (cached epochs: "
                    f"{self.epochs(split) or 'none'}); build it with more epochs"
                )
            from safetensors import safe_open

            for old in [k for k in self._files if k[0] == split]:  # one open epoch per split
                del self._files[old]

            handle = safe_open(str(self.path / f"{split}_epoch_{int(epoch)}.safetensors"), framework="pt")
            index = handle.get_tensor("index")
            self._files[key] = {
                "handle": handle,
                "row_of": {int(i): s for s, i in enumerate(index.tolist())},
                "offsets": handle.get_tensor("offsets"),
                "levels": handle.get_tensor("levels"),
                "input_hash": handle.get_tensor("input_hash"),
            }
        return self._files[key]

    def lookup(
        self, split: str, epoch: int, batch: Mapping[str, Any], kd_at_block_padding: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher's ``(values [R, k] fp32, ids [R, k] int64)`` for the batch's KD rows, in their order.

        Every sample's gold targets and block corruption levels are compared with the cached ones, so
        a cache built from other data or another noise draw is refused rather than silently used.
        """
        entry = self._file(split, epoch)
        handle = entry["handle"]
        rows = kd_loss_rows(batch, kd_at_block_padding)
        gold = torch.as_tensor(batch["loss_targets"]).cpu()
        order = torch.empty(rows.numel(), dtype=torch.long)
        values, ids, cursor = [], [], 0
        local = torch.full((int(gold.numel()),), -1, dtype=torch.long)
        local[rows] = torch.arange(rows.numel())
        for (index, sample_rows, sample_levels), digest in zip(zip(*_per_sample(batch, rows)), _input_hashes(batch)):
            s = entry["row_of"].get(index)
            if s is None:
                raise TeacherCacheError(f"teacher cache {self.path}: sample {index} is not in the {split!r} epoch {epoch} file")
            lo, hi = int(entry["offsets"][s]), int(entry["offsets"][s + 1])
            cached_levels = entry["levels"][s]
            cached_levels = cached_levels[~torch.isnan(cached_levels)]
            if hi - lo != sample_rows.numel() or not torch.equal(cached_levels, sample_levels):
                raise TeacherCacheError(
                    f"teacher cache {self.path}: sample {index} (epoch {epoch}) was cached with {hi - lo} KD positions "
                    f"and another corruption than this batch ({sample_rows.numel()} positions); it was built for "
                    "other data or collator settings"
                )
            if int(entry["input_hash"][s]) != digest:
                raise TeacherCacheError(
                    f"teacher cache {self.path}: the input of sample {index} (epoch {epoch}) -- its tokens or positions "
                    "-- differs from the cached one; the cache was built from other data or another processor"
                )
            if not torch.equal(handle.get_slice("targets")[lo:hi].long(), gold[sample_rows].long()):
                raise TeacherCacheError(
                    f"teacher cache {self.path}: the gold tokens of sample {index} (epoch {epoch}) differ from the "
                    "cached ones; the cache was built from other data"
                )
            values.append(handle.get_slice("values")[lo:hi])
            ids.append(handle.get_slice("ids")[lo:hi].long())
            order[cursor : cursor + sample_rows.numel()] = local[sample_rows]
            cursor += sample_rows.numel()
        k = int(self.meta.get("top_k", 1))
        cat_values = torch.cat(values) if values else torch.zeros(0, k)
        cat_ids = torch.cat(ids) if ids else torch.zeros(0, k, dtype=torch.long)
        out_values, out_ids = torch.empty_like(cat_values), torch.empty_like(cat_ids)
        out_values[order], out_ids[order] = cat_values, cat_ids
        return out_values.float(), out_ids


def epochs_needed(
    max_steps: int, micro_batches_per_step: int, batches_per_epoch: int, num_epochs: Optional[int] = None
) -> int:
    """Epochs (0..n-1) a run of ``max_steps`` optimizer steps touches (NeMo's step scheduler: an epoch
    is ``ceil(batches_per_epoch / micro_batches_per_step)`` steps), at most ``num_epochs`` when given."""
    if batches_per_epoch <= 0:
        return 0
    steps_per_epoch = math.ceil(int(batches_per_epoch) / max(1, int(micro_batches_per_step)))
    needed = max(1, math.ceil(int(max_steps) / steps_per_epoch))
    return needed if num_epochs is None else min(needed, int(num_epochs))
