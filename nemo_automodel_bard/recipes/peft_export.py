"""Exports of a LoRA run: a merged Hugging Face Bard-VL directory and an adapter directory in the PEFT format.

A recipe with a ``peft:`` section (NeMo-AutoModel's ``nemo_automodel.components._peft.lora.PeftConfig``) trains
low-rank adapters on the Linear layers its ``target_modules`` patterns name; every other weight stays frozen.
NeMo's checkpointer then saves, per checkpoint, only the adapter: ``model/adapter_model.safetensors`` (keys
``base_model.model.<module>.lora_A.weight`` / ``lora_B.weight``, the layout of the ``peft`` library) and
``model/adapter_config.json``. There is no consolidated model directory, so the next stage of a chain would have
nothing to load. This module writes the two exports from those files and the base model's directory, on one
process, without touching the (possibly sharded) training model:

* :func:`merge_lora_into_base` -- the base weights with every adapter folded in,
  ``W + (alpha / r) * B @ A`` (NeMo's ``LinearLoRA`` scale, the same as ``peft``'s ``lora_alpha / r``), written
  shard by shard in the base directory's own layout; with the run's config and generation config this is a
  complete Bard-VL directory that ``from_pretrained`` loads without ``peft``.
* :func:`write_adapter_dir` -- the adapter weights and an ``adapter_config.json`` that ``peft.PeftModel`` loads
  onto the base model (``task_type`` left unset, so ``peft`` injects the adapters into the Bard-VL module itself
  and decoding goes through its own ``generate``), next to the run's config, generation config and processor
  files (the base model is loaded with that config, since a stage may change the block size).

Everything here reads safetensors (never pickles) and depends on torch, safetensors and the standard library.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "PeftExportError",
    "adapter_scale",
    "lora_pairs",
    "merge_lora_into_base",
    "write_adapter_dir",
]

#: the two files of an adapter directory in the ``peft`` format
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model."
_WEIGHT_FILES = ("model.safetensors.index.json", "model.safetensors")


class PeftExportError(ValueError):
    """An adapter or base directory cannot be exported (missing files, adapters that match no base weight)."""


def adapter_scale(config: dict[str, Any]) -> float:
    """``lora_alpha / r`` of an ``adapter_config.json`` (rank-stabilised LoRA is refused: NeMo does not train it)."""
    if config.get("peft_type", "LORA") != "LORA":
        raise PeftExportError(f"adapter_config.json: peft_type {config.get('peft_type')!r} is not LORA")
    if config.get("use_rslora") or config.get("use_dora"):
        raise PeftExportError("adapter_config.json: rsLoRA / DoRA adapters are not supported by this export")
    r, alpha = config.get("r"), config.get("lora_alpha")
    if not r or alpha is None:
        raise PeftExportError(f"adapter_config.json has no usable r / lora_alpha (r={r!r}, lora_alpha={alpha!r})")
    return float(alpha) / float(r)


def lora_pairs(adapter: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{base weight key: (A [r, in], B [out, r])}`` from an adapter state dict in the ``peft`` layout.

    Raises:
        PeftExportError: a ``lora_A`` without its ``lora_B`` (or the reverse), or a key that is no LoRA matrix.
    """
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in adapter.items():
        name = key[len(_PREFIX):] if key.startswith(_PREFIX) else key
        for part in ("lora_A", "lora_B"):
            marker = f".{part}."
            if marker in name:
                module, _, rest = name.partition(marker)
                if rest != "weight":
                    raise PeftExportError(f"adapter key {key!r}: only LoRA weight matrices are supported")
                pairs.setdefault(f"{module}.weight", {})[part] = value
                break
        else:
            raise PeftExportError(f"adapter key {key!r} is neither a lora_A nor a lora_B weight")
    out = {}
    for weight, parts in sorted(pairs.items()):
        if set(parts) != {"lora_A", "lora_B"}:
            raise PeftExportError(f"adapter of {weight!r} has only {sorted(parts)}")
        out[weight] = (parts["lora_A"], parts["lora_B"])
    return out


def _weight_shards(base_dir: Path) -> list[str]:
    """The safetensors files of a model directory (from its index when it has one)."""
    index = base_dir / _WEIGHT_FILES[0]
    if index.is_file():
        return sorted(set(json.loads(index.read_text())["weight_map"].values()))
    if (base_dir / _WEIGHT_FILES[1]).is_file():
        return [_WEIGHT_FILES[1]]
    raise PeftExportError(f"{base_dir} has no model.safetensors(.index.json): not a model directory in safetensors")


def _read_adapter(adapter_dir: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    config_path, weights_path = adapter_dir / ADAPTER_CONFIG, adapter_dir / ADAPTER_WEIGHTS
    for path in (config_path, weights_path):
        if not path.is_file():
            raise PeftExportError(f"{path} is missing: not an adapter directory")
    return json.loads(config_path.read_text()), load_file(str(weights_path))


def merge_lora_into_base(base_dir: str | Path, adapter_dir: str | Path, out_dir: str | Path) -> list[str]:
    """Write ``base + (alpha / r) * B @ A`` for every adapted weight into ``out_dir`` (same shards and index as the
    base; the sum is computed in fp32 and stored in the base weight's dtype). Only weights are written: the caller
    adds the config, generation config and processor files of the run.

    Returns:
        the merged weight keys.

    Raises:
        PeftExportError: missing files, or an adapter whose weight the base does not have (or of another shape).
    """
    base_dir, adapter_dir, out_dir = Path(base_dir), Path(adapter_dir), Path(out_dir)
    config, adapter = _read_adapter(adapter_dir)
    scale = adapter_scale(config)
    pairs = lora_pairs(adapter)
    out_dir.mkdir(parents=True, exist_ok=True)
    merged: list[str] = []
    for shard in _weight_shards(base_dir):
        with safe_open(str(base_dir / shard), framework="pt") as handle:
            metadata = handle.metadata()
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        for key in [k for k in tensors if k in pairs]:
            a, b = pairs[key]
            weight = tensors[key]
            if weight.shape != (b.shape[0], a.shape[1]):
                raise PeftExportError(f"adapter of {key!r} is {tuple(b.shape[:1] + a.shape[1:])}, "
                                      f"the base weight {tuple(weight.shape)}")
            tensors[key] = (weight.float() + scale * (b.float() @ a.float())).to(weight.dtype).contiguous()
            merged.append(key)
        save_file(tensors, str(out_dir / shard), metadata=metadata or {"format": "pt"})
    missing = sorted(set(pairs) - set(merged))
    if missing:
        raise PeftExportError(f"adapters of {len(missing)} weight(s) the base {base_dir} does not have, e.g. {missing[:3]}")
    if (base_dir / _WEIGHT_FILES[0]).is_file():
        shutil.copyfile(base_dir / _WEIGHT_FILES[0], out_dir / _WEIGHT_FILES[0])
    return merged


def write_adapter_dir(checkpoint_model_dir: str | Path, out_dir: str | Path, base_model: str,
                      extra_files_from: Optional[str | Path] = None) -> Path:
    """The adapter directory of a run: NeMo's saved adapter (``checkpoint_model_dir``, a checkpoint's ``model/``)
    with an ``adapter_config.json`` that names ``base_model`` and leaves ``task_type`` unset, plus the run's
    config, generation config and processor files copied from ``extra_files_from`` (the merged export).

    Raises:
        PeftExportError: the checkpoint holds no adapter.
    """
    source, out_dir = Path(checkpoint_model_dir), Path(out_dir)
    config, adapter = _read_adapter(source)
    adapter_scale(config)  # a LoRA adapter this module can also merge
    lora_pairs(adapter)
    config = {**config, "base_model_name_or_path": str(base_model), "task_type": None}
    config.setdefault("lora_dropout", 0.0)
    config.setdefault("fan_in_fan_out", False)
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source / ADAPTER_WEIGHTS, out_dir / ADAPTER_WEIGHTS)
    (out_dir / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if extra_files_from is not None:
        for path in sorted(Path(extra_files_from).iterdir()):
            if path.is_file() and not path.name.startswith("model") and path.suffix in (".json", ".jinja", ".txt"):
                shutil.copyfile(path, out_dir / path.name)
    return out_dir
