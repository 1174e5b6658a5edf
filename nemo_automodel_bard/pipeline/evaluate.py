"""Held-out evaluation: accuracy, tokens per forward (every forward counted) and tokens/s.

Diffusion models decode with :func:`nemo_automodel_bard.decoding.block_diffusion_generate`; the AR
baseline decodes the same network causally with a KV cache
(:func:`nemo_automodel_bard.decoding.autoregressive.ar_generate`).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from nemo_automodel_bard.decoding.defaults import DEFAULT_THRESHOLD


@dataclass
class EvalRecord:
    """One held-out item: the prompt messages (without the answer) and the reference answer (for the
    shapes task's ``order="subset"``: the image's whole layout, which a right answer draws from)."""

    messages: list[dict[str, Any]]
    reference: str


class EvalDataError(ValueError):
    """A held-out record cannot be evaluated; the message names the record and the reason."""


class EvalRecords(list):
    """Usable :class:`EvalRecord` s, plus ``unusable``: ``(index, reason)`` of every record left out."""

    def __init__(self, records: Iterable[EvalRecord] = (), unusable: Sequence[tuple[int, str]] = ()) -> None:
        super().__init__(records)
        self.unusable = list(unusable)


def _answer_text(message: dict[str, Any]) -> str:
    content = message["content"]
    if isinstance(content, str):
        return content
    return "".join(item.get("text", "") for item in content if isinstance(item, dict))


#: patch size the record check reads videos with (readability does not depend on it; encoding uses the processor's)
_CHECK_PATCH = 16


def _check_eval_record(record: Any) -> str | None:
    """Why a held-out record cannot be evaluated (structure, texts, an answer, readable images and videos), or
    ``None``."""
    from nemo_automodel_bard.data.chat_dataset import validate_record
    from nemo_automodel_bard.data.media import load_image, load_video_item
    from nemo_automodel_bard.data.records import SampleSkipped

    if isinstance(record, dict) and record.get("error"):
        return str(record["error"])
    reason = validate_record(record)
    if reason is not None:
        return reason
    messages = record["messages"]
    if not any(m.get("role") == "assistant" for m in messages):
        return "no assistant turn: a held-out record needs its reference answer"
    for i, message in enumerate(messages):
        content = message["content"]
        for item in [] if isinstance(content, str) else content:
            kind = item.get("type") or ("image" if "image" in item else "video" if "video" in item else "text")
            if kind == "text" and not isinstance(item.get("text"), str):
                return f"message {i}: text must be a string, got {type(item.get('text')).__name__}"
            if kind in ("image", "image_url"):
                ref = item.get("image") if item.get("image") is not None else item.get("image_url")
                if isinstance(ref, dict):
                    ref = ref.get("url")
                try:
                    load_image(ref)
                except SampleSkipped as exc:
                    return f"message {i}: {exc.reason}"
            elif kind == "video":  # decoded once here so that an unreadable video stops nothing later
                try:
                    load_video_item(item, None, _CHECK_PATCH, 2 * _CHECK_PATCH)
                except SampleSkipped as exc:
                    return f"message {i}: {exc.reason}"
    last = max(i for i, m in enumerate(messages) if m.get("role") == "assistant")
    if not _answer_text(messages[last]).strip():
        return "the reference answer is empty"
    return None


def records_from_chat(records: Iterable[dict[str, Any]], source: str = "held-out data",
                      skip_unusable: bool = False) -> EvalRecords:
    """Split chat records into (prompt messages, last assistant answer).

    ``skip_unusable``: leave unusable records out and list them in the result's ``unusable`` (index,
    reason) instead of stopping at the first one.

    Raises:
        EvalDataError: naming the first unusable record of ``source`` (broken JSON, no answer, a non-string
            text, a missing or unreadable image) -- before any model runs; with ``skip_unusable``, only when
            no record is usable (naming the first reasons).
    """
    out = EvalRecords()
    for n, record in enumerate(records):
        reason = _check_eval_record(record)
        if reason is not None:
            index = record.get("index", n) if isinstance(record, dict) else n
            if not skip_unusable:
                raise EvalDataError(f"{source}: record {index}: {reason}")
            out.unusable.append((int(index), reason))
            continue
        messages = record["messages"]
        last = max(i for i, m in enumerate(messages) if m.get("role") == "assistant")
        out.append(EvalRecord(messages=list(messages[:last]), reference=_answer_text(messages[last])))
    if skip_unusable and not out and out.unusable:
        listed = "; ".join(f"record {i}: {r}" for i, r in out.unusable[:5])
        more = f" (and {len(out.unusable) - 5} more)" if len(out.unusable) > 5 else ""
        raise EvalDataError(f"{source}: no usable record: {listed}{more}")
    return out


def heldout_records(data_cfg: Any, num_samples: int, split: str | None = None) -> EvalRecords:
    """Held-out evaluation items for the configured data set (shapes: the held-out split; census: ``split``,
    ``"test"`` by default, or ``"validation"``).

    Chat-format data (``data.eval_path``): unusable records are left out and listed in ``unusable``; an
    :class:`EvalDataError` only when none is usable."""
    kind = data_cfg.get("kind", "shapes")
    if kind == "census":  # the split is named (validation: for choosing; test: only reported)
        from nemo_automodel_bard.data.census import census_dataset

        dataset = census_dataset(split=str(split or "test"), size=num_samples, seed=int(data_cfg.get("seed", 0)))
        return records_from_chat(dataset[i] for i in range(len(dataset)))
    if kind == "shapes":
        from nemo_automodel_bard.data.chat_dataset import shapes_dataset

        order = str(data_cfg.get("order", "reading"))
        dataset = shapes_dataset(split="heldout", size=num_samples, seed=int(data_cfg.get("seed", 0)), order=order)
        records = records_from_chat(dataset[i] for i in range(len(dataset)))
        if order == "subset":  # many subsets are right: score against the image's whole layout
            from nemo_automodel_bard.data.shapes import ShapesTask, format_answer

            task = ShapesTask(seed=int(data_cfg.get("seed", 0)))
            for i, record in enumerate(records):
                record.reference = format_answer(task.layout("heldout", i))
        return records
    path = data_cfg.get("eval_path")
    if kind == "hf" and not path and data_cfg.get("eval_split"):  # a held-out split of the training dataset
        from nemo_automodel_bard.data.hf_dataset import HFChatDataset

        name, split = str(data_cfg.get("name")), str(data_cfg["eval_split"])
        dataset = HFChatDataset(name, split=split, config=data_cfg.get("config"), image_root=data_cfg.get("root"),
                                max_samples=num_samples)
        path = f"{name} split {split}"
    elif not path:
        raise ValueError("data.eval_path is required to evaluate on chat-format data (held-out JSONL records)")
    else:
        from nemo_automodel_bard.data.chat_dataset import ChatDataset

        dataset = ChatDataset(path, image_root=data_cfg.get("root"), max_samples=num_samples)
    records = records_from_chat((dataset[i] for i in range(len(dataset))), source=f"data.eval_path {path}",
                                skip_unusable=True)
    if not records:
        raise EvalDataError(f"data.eval_path {path}: no records")
    return records


def _tokens(text: str) -> list[str]:
    """Lower-cased words without punctuation (for the token-level F1 of free text)."""
    import re
    import unicodedata

    text = "".join(" " if unicodedata.category(c).startswith("P") else c for c in text.lower())
    return re.findall(r"\w+", text)


def token_f1(prediction: str, reference: str) -> float:
    """Token-level F1 of two texts (bag of lower-cased words, punctuation ignored); 1.0 when both are empty."""
    import collections

    pred, ref = _tokens(prediction), _tokens(reference)
    if not pred or not ref:
        return float(pred == ref)
    common = sum((collections.Counter(pred) & collections.Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def _score(data_kind: str, predictions: Sequence[str], references: Sequence[str], order: str = "reading") -> dict[str, Any]:
    """``accuracy`` (exact match), ``field_accuracy`` (shapes only), ``token_f1`` (free text only) and
    ``correct``: per record, exact match or not (for paired comparisons of two models on the same records)."""
    if data_kind == "census":
        from nemo_automodel_bard.data import census

        result = census.score(list(predictions), list(references))
        correct = [bool(census.exact_match(p, r)) for p, r in zip(predictions, references)]
        return {"accuracy": float(result["exact_match"]), "field_accuracy": float(result["field_accuracy"]),
                "correct": correct}
    if data_kind == "shapes":
        from nemo_automodel_bard.data.shapes import exact_match, score

        result = score(list(predictions), list(references), order=order)
        correct = [bool(exact_match(p, r, order=order)) for p, r in zip(predictions, references)]
        return {"accuracy": float(result["exact_match"]), "field_accuracy": float(result["field_accuracy"]),
                "correct": correct}
    matches = [" ".join(p.split()) == " ".join(r.split()) for p, r in zip(predictions, references)]
    f1 = [token_f1(p, r) for p, r in zip(predictions, references)]
    return {"accuracy": sum(matches) / max(len(matches), 1), "token_f1": sum(f1) / max(len(f1), 1),
            "correct": matches}


def resolve_device(device: str = "auto") -> torch.device:
    """``"auto"`` -> the first CUDA device if there is one, else the CPU; anything else as ``torch.device``."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"evaluate.device: {device!r} is not a device (auto, cpu, cuda, cuda:N)") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"evaluate.device: {device!r} asks for CUDA, which this machine does not have")
    if resolved.type == "cuda" and resolved.index is not None and resolved.index >= torch.cuda.device_count():
        raise ValueError(f"evaluate.device: {device!r}, but this machine has {torch.cuda.device_count()} CUDA devices")
    return resolved


def _batches(records: Sequence[EvalRecord], size: int) -> Iterable[Sequence[EvalRecord]]:
    for start in range(0, len(records), size):
        yield records[start : start + size]


def _encode(processor: Any, records: Sequence[EvalRecord]) -> dict[str, Any]:
    """One left-padded batch of the records' prompts, encoded as ``infer``, the server, the lmms-eval plugin and
    the collators encode a chat (:func:`nemo_automodel_bard.data.chat_inputs.encode_chats`: images and videos with
    their per-item keys)."""
    from nemo_automodel_bard.data.chat_inputs import encode_chats

    processor.tokenizer.padding_side = "left"
    return encode_chats(processor, [record.messages for record in records], padding=True)


def evaluate_model(
    model_dir: str | Path,
    records: Sequence[EvalRecord],
    *,
    data_kind: str = "shapes",
    order: str = "reading",
    mode: str = "diffusion",
    block_size: int | None = None,
    threshold: float = DEFAULT_THRESHOLD,
    remasking_strategy: str = "low_confidence_dynamic",
    denoising_steps: int | None = None,
    batch_size: int = 25,
    max_new_tokens: int = 64,
    record_trajectory_of: int | None = None,
    device: str = "auto",
    fused_prefill: bool = True,
    compile: bool = False,
    speed_samples: int = 0,
    speed_repeats: int = 5,
) -> dict[str, Any]:
    """Decode every record and score it.

    ``order``: the shapes task's answer order (:func:`nemo_automodel_bard.data.shapes.exact_match`). ``device``:
    ``"auto"`` (the first CUDA device when there is one, else the CPU) or any ``torch.device`` string.
    ``fused_prefill``: the decoder's (default); ``False`` runs the published separate prefill forward.
    ``compile``: decode (block diffusion and AR alike) with the static KV cache and the compiled step: the same
    tokens; faster per forward once compiled, so it pays off for the batch-1 speed measurement and long runs.

    Returns a dict with ``accuracy`` (exact match), ``field_accuracy`` (shapes), ``token_f1`` (chat data), ``tokens_per_forward``
    (response tokens up to EOS divided by the forwards each sample took part in until its EOS: prefill,
    every denoising and commit forward counted -- the batch-1 cost), ``tokens_per_batch_forward`` (the
    same over the batch's forwards, where early finishers wait for the longest answer),
    ``tokens_per_second`` (at ``batch_size``), ``speed`` (with ``speed_samples`` > 0: batch-1 tokens/s of the first
    ``speed_samples`` records decoded one at a time, ``speed_repeats`` times -- median, min, max and every repeat),
    ``forwards``, ``n``, ``predictions``, ``num_unusable`` / ``unusable_records`` (records
    left out, when ``records`` is an :class:`EvalRecords`) and optionally ``trajectory``.
    """
    from transformers import AutoProcessor

    from nemo_automodel_bard import BardVLForConditionalGeneration
    from nemo_automodel_bard.data.chat_inputs import ChatInputError
    from nemo_automodel_bard.decoding import block_diffusion_generate
    from nemo_automodel_bard.decoding.autoregressive import ar_generate

    model = BardVLForConditionalGeneration.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    model.to(resolve_device(device))
    processor = AutoProcessor.from_pretrained(str(model_dir))
    block_size = int(block_size or model.config.block_size)

    def decode(inputs: Any, trajectory: bool = False) -> tuple[Any, dict]:
        if mode == "ar":
            return ar_generate(model, inputs, max_new_tokens, eos_token_id=model.config.eos_token_id, compile=compile)
        return block_diffusion_generate(
            model, inputs, max_new_tokens=max_new_tokens, block_size=block_size,
            denoising_steps=denoising_steps or block_size, temperature=0.0, top_k=0, top_p=1.0,
            remasking_strategy=remasking_strategy, confidence_threshold=threshold, return_step_stats=True,
            record_trajectory=trajectory, fused_prefill=fused_prefill, compile=compile,
        )

    predictions: list[str] = []
    tokens = sample_forwards = batch_forwards = 0
    elapsed = 0.0
    trajectory = None
    for batch_index, chunk in enumerate(_batches(records, batch_size)):
        try:
            inputs = _encode(processor, chunk)
        except ChatInputError as exc:  # the records passed their check; name the batch's records all the same
            first = batch_index * batch_size
            raise EvalDataError(f"records {first}-{first + len(chunk) - 1} (in evaluation order): {exc}") from None
        want_trajectory = (mode != "ar" and record_trajectory_of is not None
                           and batch_index == record_trajectory_of // batch_size)
        start = time.perf_counter()
        ids, stats = decode(inputs, want_trajectory)
        if want_trajectory:
            trajectory = {"stats": stats, "sample": record_trajectory_of % batch_size}
        elapsed += time.perf_counter() - start
        predictions += processor.tokenizer.batch_decode(ids, skip_special_tokens=True)
        tokens += int(stats["num_response_tokens"])
        sample_forwards += int(sum(stats["forwards_per_sample"]))
        batch_forwards += int(stats["forwards_total"]) * len(chunk)
    result: dict[str, Any] = _score(data_kind, predictions, [r.reference for r in records], order)
    result.update(
        n=len(records),
        mode=mode,
        block_size=block_size if mode != "ar" else 1,
        threshold=threshold if mode != "ar" else None,
        tokens_per_forward=tokens / max(sample_forwards, 1),
        tokens_per_batch_forward=tokens / max(batch_forwards, 1),
        tokens_per_second=tokens / max(elapsed, 1e-9),
        response_tokens=tokens,
        predictions=[p.strip() for p in predictions],
    )
    if speed_samples > 0:
        result["speed"] = _batch1_speed(decode, [_encode(processor, [r]) for r in records[:speed_samples]],
                                        max(int(speed_repeats), 1))
    unusable = getattr(records, "unusable", None)
    if unusable is not None:
        result["num_unusable"] = len(unusable)
        result["unusable_records"] = [{"index": int(i), "reason": str(r)} for i, r in unusable]
    if trajectory is not None:
        result["trajectory"] = trajectory
    return result


def _batch1_speed(decode: Any, inputs: Sequence[Any], repeats: int) -> dict[str, Any]:
    """Batch-1 tokens/s over ``inputs`` (one record each), measured ``repeats`` times after one warm-up pass:
    ``{"median", "min", "max", "repeats": [...], "records", "tokens"}``. Single timings of the tiny models vary by
    10-15 % from run to run, so a ratio of two models is reported from medians."""
    import statistics

    decode(inputs[0])  # warm-up (first-call allocations)
    rates, tokens = [], 0
    for _ in range(repeats):
        tokens, elapsed = 0, 0.0
        for one in inputs:
            start = time.perf_counter()
            _, stats = decode(one)
            elapsed += time.perf_counter() - start
            tokens += int(stats["num_response_tokens"])
        rates.append(tokens / max(elapsed, 1e-9))
    return {"median": statistics.median(rates), "min": min(rates), "max": max(rates), "repeats": rates,
            "records": len(inputs), "tokens": tokens}


def write_result(result: dict[str, Any], path: str | Path) -> Path:
    """Write an evaluation result as JSON (tensors in a trajectory are converted to lists)."""

    def convert(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return value.tolist()
        if isinstance(value, dict):
            return {k: convert(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [convert(v) for v in value]
        return value

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(convert(result), indent=2))
    return path


__all__ = ["EvalDataError", "EvalRecord", "EvalRecords", "token_f1", "evaluate_model", "heldout_records", "records_from_chat", "write_result"]
