"""The self-distillation stage's data: a model's own answers to training prompts, as chat JSONL.

:func:`write_trajectories` decodes every training record's prompt with the model (the same decoder and
settings as the evaluation), scores each answer against the record's reference, and writes the kept
records -- the prompt followed by the model's answer -- to ``trajectories.jsonl`` in our chat format,
with in-memory images (the shapes task) saved as PNG files beside it. ``summary.json`` holds what was
decoded, kept and skipped.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from nemo_automodel_bard.decoding.defaults import DEFAULT_THRESHOLD

from .evaluate import evaluate_model, records_from_chat

#: which decoded answers become training records
KEEP_MODES = ("matching", "all")


def _portable(messages: Sequence[dict[str, Any]], image_dir: Path, name: str) -> list[dict[str, Any]]:
    """``messages`` with every in-memory (PIL) image saved under ``image_dir`` and referenced by a path
    relative to the JSONL file; paths and URLs are kept."""
    out, count = [], 0
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            items = []
            for item in content:
                image = item.get("image") if isinstance(item, dict) else None
                if image is not None and hasattr(image, "save"):
                    path = image_dir / f"{name}-{count}.png"
                    image.save(path)
                    count += 1
                    item = {**item, "image": f"{image_dir.name}/{path.name}"}
                items.append(item)
            content = items
        out.append({**message, "content": content})
    return out


def write_trajectories(
    model_dir: str | Path,
    records: Sequence[dict[str, Any]],
    out_dir: str | Path,
    *,
    data_kind: str = "shapes",
    order: str = "reading",
    block_size: int | None = None,
    threshold: float = DEFAULT_THRESHOLD,
    batch_size: int = 25,
    max_new_tokens: int = 64,
    keep: str = "matching",
    device: str = "auto",
) -> dict[str, Any]:
    """Decode the prompts of ``records`` (chat records with an answer) with ``model_dir`` and write the
    kept ones with the model's answer; return the summary (also ``summary.json``).

    ``keep``: ``"matching"`` -- only answers equal to the reference (the shapes task's exact match, or the
    same text up to whitespace); ``"all"`` -- every answer. Unusable records (no answer, unreadable image)
    are counted in ``num_unusable`` and listed, never trained on.
    """
    if keep not in KEEP_MODES:
        raise ValueError(f"keep must be one of {KEEP_MODES}, got {keep!r}")
    out_dir = Path(out_dir)
    image_dir = out_dir / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    usable = records_from_chat(records, source="self-distillation prompts", skip_unusable=True)
    result = evaluate_model(model_dir, usable, data_kind=data_kind, mode="diffusion", order=order,
                            block_size=block_size, threshold=threshold, batch_size=batch_size,
                            max_new_tokens=max_new_tokens, device=device)
    kept = 0
    path = out_dir / "trajectories.jsonl"
    with path.open("w") as f:
        for i, (record, answer, right) in enumerate(zip(usable, result["predictions"], result["correct"])):
            if keep == "matching" and not right:
                continue
            messages = _portable(record.messages, image_dir, f"{i:06d}")
            messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
            f.write(json.dumps({"messages": messages}) + "\n")
            kept += 1
    if kept == 0:
        raise ValueError(f"self-distillation: none of the {len(usable)} decoded answers was kept (keep={keep!r}, "
                         f"accuracy {result['accuracy']:.3f}); nothing to train on")
    summary = {
        "path": str(path), "num_decoded": len(usable), "num_kept": kept, "keep": keep,
        "accuracy": result["accuracy"], "tokens_per_forward": result["tokens_per_forward"],
        "block_size": result["block_size"], "threshold": threshold,
        "num_unusable": len(usable.unusable),
        "unusable_records": [{"index": int(i), "reason": str(r)} for i, r in usable.unusable],
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


__all__ = ["KEEP_MODES", "write_trajectories"]
