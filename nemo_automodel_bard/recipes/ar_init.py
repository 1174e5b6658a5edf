"""AR init: turn an autoregressive Qwen3-VL directory into a Bard-VL starting directory.

Bard-VL keeps Qwen3-VL's weights, shapes and parameter names, so the conversion is mostly a
relabelling:

* ``config.json`` -- :meth:`BardVLConfig.from_qwen3_vl`: ``model_type: bard_vl`` (text sub-config
  ``bard_vl_text``), ``architectures: [BardVLForConditionalGeneration]``, ``mask_token_id`` and
  ``block_size`` (the first PBM stage's, default 2);
* weights -- the ``*.safetensors`` files (and their index) are copied byte for byte. Only with
  ``--mask-embedding mean`` is one row changed: the MASK token's row of the input embedding
  (``model.language_model.embed_tokens.weight``; with tied embeddings also ``lm_head.weight`` if the
  file stores it) is set to the mean of the *ordinary-token* rows (ids below the first special /
  added token), computed in fp32. The MASK row of a Qwen3-VL vocabulary (151671) is an unused row, so
  by default it is kept as trained (``keep``);
* tokenizer, processor and chat-template files are copied unchanged;
* ``generation_config.json`` gets the Bard decoding defaults (block size = ``--block-size``), keeping
  the source's EOS / pad ids.

MASK id: ``--mask-token-id`` if given; else the source's own ``mask_token_id`` (a ``bard_vl`` input);
else 151671 for the 151,936-row Qwen3-VL vocabulary; else the tokenizer's ``<|mask|>`` token; else an
error asking for ``--mask-token-id``.

Inputs that are not Qwen3-VL-shaped are refused with an error naming the file and key: a
``model_type`` other than ``qwen3_vl`` / ``bard_vl``, a missing ``text_config`` / ``vision_config``,
weights whose names or shapes do not match the config, pickled weights only (never loaded). A hub id
is downloaded with ``huggingface_hub.snapshot_download`` first (needs network access).

Command line::

    python -m nemo_automodel_bard.recipes.ar_init SRC DST [--block-size 2] [--mask-token-id ID]
        [--mask-embedding keep|mean] [--overwrite]

Python::

    >>> from nemo_automodel_bard.recipes.ar_init import convert_ar_to_bard
    >>> convert_ar_to_bard("runs/tiny/ar/final", "runs/tiny/ar_init", block_size=2)  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import shutil
import sys
from pathlib import Path
from typing import Any, Optional, Union

import torch

logger = logging.getLogger(__name__)

__all__ = ["ARInitError", "MASK_EMBEDDING_RULES", "convert_ar_to_bard", "main", "ordinary_token_limit"]

#: ``--mask-embedding`` choices
MASK_EMBEDDING_RULES = ("keep", "mean")
QWEN3_VL_VOCAB_SIZE = 151936
EMBED_KEY = "model.language_model.embed_tokens.weight"
LM_HEAD_KEY = "lm_head.weight"
PROVENANCE_FILE = "bard_vl_ar_init.json"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_NOT_COPIED = {"config.json", "generation_config.json", "model.safetensors.index.json", PROVENANCE_FILE}
_REQUIRED = {
    "text_config": ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads"),
    "vision_config": ("depth", "hidden_size", "out_hidden_size"),
}


class ARInitError(ValueError):
    """The source is not a convertible Qwen3-VL directory (the message names the file and key)."""


def _resolve_source(src: Union[str, Path], revision: Optional[str]) -> Path:
    path = Path(src).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ARInitError(f"source {str(src)!r} is a file; expected a Qwen3-VL model directory")
    text = str(src)
    parts = text.split("/")
    if len(parts) == 2 and all(parts) and not text.startswith((".", "/", "~")) and not path.exists():
        try:
            from huggingface_hub import snapshot_download
        except ImportError as exc:  # pragma: no cover - huggingface_hub ships with transformers
            raise ARInitError(f"{text!r} is not a local directory and huggingface_hub is missing") from exc
        logger.info("downloading %s from the Hugging Face hub", text)
        return Path(snapshot_download(text, revision=revision, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.jinja", "*.model", "*.tiktoken"]))
    raise ARInitError(f"source {text!r} does not exist (expected a Qwen3-VL model directory or a hub id)")


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise ARInitError(f"{path}: file not found (a model directory needs config.json)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ARInitError(f"{path}: invalid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ARInitError(f"{path}: expected a JSON object")
    return data


def _check_config(config: dict, where: Path) -> None:
    model_type = config.get("model_type")
    if model_type not in ("qwen3_vl", "bard_vl"):
        raise ARInitError(
            f"{where}: model_type is {model_type!r}; AR init converts Qwen3-VL models (model_type 'qwen3_vl', "
            "or 'bard_vl' to re-initialise a Bard-VL directory)"
        )
    for section, keys in _REQUIRED.items():
        sub = config.get(section)
        if not isinstance(sub, dict):
            raise ARInitError(f"{where}: key {section!r} is missing or not an object (Qwen3-VL configs have one)")
        for key in keys:
            if key not in sub:
                raise ARInitError(f"{where}: key '{section}.{key}' is missing")
    text, vision = config["text_config"], config["vision_config"]
    if vision["out_hidden_size"] != text["hidden_size"]:
        raise ARInitError(
            f"{where}: vision_config.out_hidden_size={vision['out_hidden_size']} differs from "
            f"text_config.hidden_size={text['hidden_size']} (the merger feeds the language model)"
        )


def _load_tokenizer(src: Path) -> Any:
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(src))
    except Exception as exc:  # no / unreadable tokenizer files
        logger.info("no tokenizer loadable from %s (%s)", src, exc)
        return None


def _tokenizer_mask_id(tokenizer: Any) -> Optional[int]:
    if tokenizer is None:
        return None
    vocab = tokenizer.get_vocab()
    if "<|mask|>" in vocab:
        return int(vocab["<|mask|>"])
    if getattr(tokenizer, "mask_token_id", None) is not None:
        return int(tokenizer.mask_token_id)
    return None


def _resolve_mask_id(config: dict, given: Optional[int], tokenizer_loader, where: Path) -> int:
    vocab = int(config["text_config"]["vocab_size"])
    if given is not None:
        mask = int(given)
    elif config.get("model_type") == "bard_vl" and config.get("mask_token_id") is not None:
        mask = int(config["mask_token_id"])
    elif vocab == QWEN3_VL_VOCAB_SIZE:
        from nemo_automodel_bard.models.bard_vl import QWEN3_VL_MASK_TOKEN_ID

        mask = QWEN3_VL_MASK_TOKEN_ID
    else:
        mask = _tokenizer_mask_id(tokenizer_loader())
        if mask is None:
            raise ARInitError(
                f"{where}: cannot determine the MASK token id: text_config.vocab_size={vocab} is not the Qwen3-VL "
                f"vocabulary ({QWEN3_VL_VOCAB_SIZE} rows, MASK 151671) and the tokenizer has no '<|mask|>' token; "
                "pass --mask-token-id"
            )
    if not 0 <= mask < vocab:
        raise ARInitError(f"mask token id {mask} is outside the vocabulary (text_config.vocab_size={vocab})")
    return mask


def ordinary_token_limit(config: Any, tokenizer: Any = None) -> int:
    """First id that is not an ordinary text token: the smallest special / added token id of the
    tokenizer, else the smallest special id named in the config (Qwen3-VL: 151643)."""
    ids: list[int] = []
    if tokenizer is not None:
        decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
        ids += [int(i) for i, tok in decoder.items() if getattr(tok, "special", True)]
        ids += [int(i) for i in getattr(tokenizer, "all_special_ids", [])]
    if not ids:
        for key in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id",
                    "eos_token_id", "pad_token_id", "mask_token_id"):  # fmt: skip
            value = getattr(config, key, None)
            if isinstance(value, int):
                ids.append(value)
    vocab = int(config.text_config.vocab_size)
    ids = [i for i in ids if 0 <= i < vocab]
    return min(ids) if ids else vocab


def _weight_files(src: Path) -> list[Path]:
    files = sorted(src.glob("*.safetensors"))
    if not files:
        pickled = sorted(p.name for p in src.iterdir() if p.suffix in _PICKLE_SUFFIXES)
        if pickled:
            raise ARInitError(
                f"{src}: only pickled weights ({', '.join(pickled[:3])}); AR init reads safetensors only "
                "(convert them with transformers' save_pretrained(safe_serialization=True) in a trusted environment)"
            )
        raise ARInitError(f"{src}: no *.safetensors weight files")
    index = src / "model.safetensors.index.json"
    if index.is_file():
        listed = set(_read_json(index).get("weight_map", {}).values())
        missing = sorted(name for name in listed if not (src / name).is_file())
        if missing:
            raise ARInitError(f"{index}: lists weight files that are missing: {missing[:3]}")
        files = [src / name for name in sorted(listed)]
    return files


def _check_weights(files: list[Path], config: Any) -> dict[str, Path]:
    """Compare names and shapes in the safetensors headers with the model the config describes."""
    from safetensors import safe_open

    from nemo_automodel_bard.models.bard_vl import BardVLForConditionalGeneration

    with torch.device("meta"):
        expected_model = BardVLForConditionalGeneration(copy.deepcopy(config))
    expected = {k: tuple(v.shape) for k, v in expected_model.state_dict().items()}
    located: dict[str, Path] = {}
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                if key not in expected:
                    raise ARInitError(
                        f"{path}: tensor {key!r} is not a parameter of a Qwen3-VL model with this config.json "
                        "(expected names model.visual.*, model.language_model.*, lm_head.weight)"
                    )
                shape = tuple(f.get_slice(key).get_shape())
                if shape != expected[key]:
                    raise ARInitError(
                        f"{path}: tensor {key!r} has shape {list(shape)} but config.json implies {list(expected[key])}"
                    )
                located[key] = path
    optional = {LM_HEAD_KEY} if getattr(config, "tie_word_embeddings", False) else set()
    missing = sorted(set(expected) - set(located) - optional)
    if missing:
        raise ARInitError(f"{files[0].parent}: weight(s) missing from the safetensors files: {missing[:5]}")
    return located


def _mean_mask_row(located: dict[str, Path], dst: Path, mask: int, limit: int, tied: bool) -> list[str]:
    """Rewrite the file(s) holding the embedding (and a tied lm_head) with the MASK row set to the
    mean of rows ``[0, limit)``. Returns the changed tensor names."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    keys = [EMBED_KEY] + ([LM_HEAD_KEY] if tied and LM_HEAD_KEY in located else [])
    changed = []
    for file in sorted({located[k] for k in keys}):
        with safe_open(str(file), framework="pt") as f:
            metadata = f.metadata()
        tensors = load_file(str(file))
        for key in keys:
            if located[key] != file:
                continue
            weight = tensors[key]
            if limit <= 0 or limit > weight.shape[0]:
                raise ARInitError(f"cannot average ordinary-token rows: limit {limit} for {weight.shape[0]} rows")
            row = weight[:limit].to(torch.float32).mean(dim=0)
            weight = weight.clone()
            weight[mask] = row.to(weight.dtype)
            tensors[key] = weight
            changed.append(key)
        save_file(tensors, str(dst / file.name), metadata=metadata or {"format": "pt"})
    return changed


def _generation_config(config: Any, src: Path) -> Any:
    from nemo_automodel_bard.models.bard_vl.generation_bard_vl import bard_generation_config

    source = {}
    if (src / "generation_config.json").is_file():
        source = _read_json(src / "generation_config.json")
    gen = bard_generation_config(config)
    for key in ("eos_token_id", "pad_token_id", "bos_token_id"):
        if source.get(key) is not None:
            setattr(gen, key, source[key])
    if getattr(gen, "eos_token_id", None) is None:
        gen.eos_token_id = getattr(config.text_config, "eos_token_id", None)
    return gen


def convert_ar_to_bard(
    src: Union[str, Path],
    dst: Union[str, Path],
    *,
    block_size: int = 2,
    mask_token_id: Optional[int] = None,
    mask_embedding: str = "keep",
    overwrite: bool = False,
    revision: Optional[str] = None,
) -> Path:
    """Convert the AR Qwen3-VL directory (or hub id) ``src`` into a Bard-VL directory ``dst``.

    Args:
        block_size: the block size written to the config (the first PBM stage's; 2 by default).
        mask_token_id: MASK row; see the module docstring for the default.
        mask_embedding: ``"keep"`` (weights copied unchanged) or ``"mean"`` (MASK embedding row := mean
            of the ordinary-token rows).
        overwrite: replace an existing, non-empty ``dst``.
        revision: hub revision when ``src`` is a hub id.

    Returns:
        ``dst`` as a ``Path``.

    Raises:
        ARInitError: the source is not a Qwen3-VL-shaped safetensors directory, or ``dst`` is not empty.
    """
    from nemo_automodel_bard.models.bard_vl import BardVLConfig

    if mask_embedding not in MASK_EMBEDDING_RULES:
        raise ARInitError(f"mask_embedding must be one of {MASK_EMBEDDING_RULES}, got {mask_embedding!r}")
    if not isinstance(block_size, int) or block_size < 1:
        raise ARInitError(f"block_size must be a positive integer, got {block_size!r}")
    src_dir = _resolve_source(src, revision)
    dst_dir = Path(dst).expanduser()
    if dst_dir.resolve() == src_dir.resolve():
        raise ARInitError("the destination must differ from the source")
    if dst_dir.exists() and any(dst_dir.iterdir()):
        if not overwrite:
            raise ARInitError(f"destination {str(dst_dir)!r} exists and is not empty (pass overwrite=True / --overwrite)")
        shutil.rmtree(dst_dir)

    config_path = src_dir / "config.json"
    raw = _read_json(config_path)
    _check_config(raw, config_path)
    files = _weight_files(src_dir)
    tokenizer_cache: dict[str, Any] = {}

    def tokenizer():
        if "tok" not in tokenizer_cache:
            tokenizer_cache["tok"] = _load_tokenizer(src_dir)
        return tokenizer_cache["tok"]

    mask = _resolve_mask_id(raw, mask_token_id, tokenizer, config_path)
    try:
        config = BardVLConfig.from_qwen3_vl(raw, block_size=block_size, mask_token_id=mask)
    except (TypeError, ValueError) as exc:
        raise ARInitError(f"{config_path}: not a valid Qwen3-VL config ({exc})") from None

    located = _check_weights(files, config)

    dst_dir.mkdir(parents=True, exist_ok=True)
    changed: list[str] = []
    limit = None
    if mask_embedding == "mean":
        limit = ordinary_token_limit(config, tokenizer())
        changed = _mean_mask_row(located, dst_dir, mask, limit, bool(getattr(config, "tie_word_embeddings", False)))
    rewritten = {located[k].name for k in changed}
    for file in files:
        if file.name not in rewritten:
            shutil.copy2(file, dst_dir / file.name)
    if (src_dir / "model.safetensors.index.json").is_file():
        shutil.copy2(src_dir / "model.safetensors.index.json", dst_dir / "model.safetensors.index.json")
    skipped = []
    for item in sorted(src_dir.iterdir()):
        if not item.is_file() or item.name in _NOT_COPIED or item.suffix == ".safetensors":
            continue
        if item.suffix in _PICKLE_SUFFIXES or item.suffix == ".py":
            skipped.append(item.name)
            continue
        shutil.copy2(item, dst_dir / item.name)
    if skipped:
        logger.warning("not copied (pickles / code are never carried over): %s", ", ".join(skipped))

    config.save_pretrained(str(dst_dir))
    _generation_config(config, src_dir).save_pretrained(str(dst_dir))
    provenance = {
        "source": str(src),
        "block_size": block_size,
        "mask_token_id": mask,
        "mask_embedding": mask_embedding,
        "changed_tensors": changed,
        "ordinary_token_limit": limit,
    }
    (dst_dir / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n")
    logger.info("AR init: %s -> %s (block_size %d, mask id %d, mask embedding %s)", src, dst_dir, block_size, mask, mask_embedding)
    return dst_dir


def main(argv: Optional[list[str]] = None) -> int:
    """``python -m nemo_automodel_bard.recipes.ar_init SRC DST [options]``."""
    parser = argparse.ArgumentParser(
        prog="python -m nemo_automodel_bard.recipes.ar_init",
        description="Turn an autoregressive Qwen3-VL directory into a Bard-VL starting directory.",
    )
    parser.add_argument("src", help="Qwen3-VL model directory (or hub id)")
    parser.add_argument("dst", help="output directory")
    parser.add_argument("--block-size", type=int, default=2, help="block size of the first PBM stage (default 2)")
    parser.add_argument("--mask-token-id", type=int, default=None,
                        help="MASK token id (default: 151671 for the Qwen3-VL vocabulary, else the tokenizer's <|mask|>)")  # fmt: skip
    parser.add_argument("--mask-embedding", choices=MASK_EMBEDDING_RULES, default="keep",
                        help="keep: copy all weights unchanged; mean: MASK embedding row := mean of ordinary-token rows")  # fmt: skip
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty destination")
    parser.add_argument("--revision", default=None, help="hub revision (hub ids only)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        out = convert_ar_to_bard(
            args.src,
            args.dst,
            block_size=args.block_size,
            mask_token_id=args.mask_token_id,
            mask_embedding=args.mask_embedding,
            overwrite=args.overwrite,
            revision=args.revision,
        )
    except ARInitError as exc:
        print(f"ar_init: error: {exc}", file=sys.stderr)
        return 2
    info = json.loads((out / PROVENANCE_FILE).read_text())
    print(f"wrote Bard-VL directory {out} (block_size {info['block_size']}, mask id {info['mask_token_id']}, "
          f"mask embedding {info['mask_embedding']})")  # fmt: skip
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
