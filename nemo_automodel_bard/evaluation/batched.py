"""Batched evaluation of a Bard-VL checkpoint on (prompt, images/videos) items, with honest speed figures.

This is the part of the lmms-eval plugin that does not need lmms-eval: it turns items into padded
processor batches (left padding and a real attention mask, which the decoding engine honours, so an
answer does not depend on its batch mates), decodes them with ``model.generate`` and accumulates, per
run, tokens, forwards and time. :mod:`.lmms_eval_plugin` wraps it in lmms-eval's model API.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from nemo_automodel_bard.decoding.schema import DECODING_NAMES, parse_options

#: decoding options a user may set as model_args (None = the checkpoint's generation config): the decoding schema's
DECODING_ARGS = DECODING_NAMES
#: the image size cap of lmms-eval's Qwen3-VL model (pixels per image), our default too
DEFAULT_MAX_PIXELS = 1605632
#: stop strings a task may send that would cut answers short; lmms-eval's Qwen3-VL model drops them too
DROPPED_STOPS = ("\n\n",)


@dataclass
class Placement:
    """Where one evaluation process runs: its device and its share of the work (lmms-eval shards requests by
    ``rank`` / ``world_size``)."""

    device: str
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0


def process_placement(device: str | None = None, env: dict[str, str] | None = None,
                      cuda_devices: int | None = None) -> Placement:
    """This process's device and rank under ``accelerate launch`` / ``torchrun`` (``RANK``, ``WORLD_SIZE``,
    ``LOCAL_RANK``): with a GPU, ``cuda`` (lmms-eval's default) or no device means ``cuda:<local rank>``, so
    each process gets its own GPU; several processes given one explicit GPU are moved to their local rank's;
    ``cpu`` stays on the CPU (several CPU processes share it).

    Raises:
        ValueError: the local rank has no GPU, or the environment's ranks are not integers.
    """
    env = dict(os.environ) if env is None else env
    try:
        world = int(env.get("WORLD_SIZE", "1"))
        rank = int(env.get("RANK", "0"))
        local = int(env.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise ValueError(f"RANK / WORLD_SIZE / LOCAL_RANK must be integers, got {env.get('RANK')!r}, "
                         f"{env.get('WORLD_SIZE')!r}, {env.get('LOCAL_RANK')!r}") from None
    if cuda_devices is None:
        import torch

        cuda_devices = torch.cuda.device_count() if torch.cuda.is_available() else 0
    wanted = (device or "cuda").lower()
    if wanted.startswith("cuda"):
        if not cuda_devices:
            wanted = "cpu"
        elif wanted == "cuda" or world > 1:
            if local >= cuda_devices:
                raise ValueError(f"local rank {local} has no GPU: {cuda_devices} visible (one process per GPU)")
            wanted = f"cuda:{local}"
    return Placement(device=wanted, rank=rank, world_size=world, local_rank=local)


def parse_batch_size(value: Any) -> int:
    """``--batch_size N``; ``auto`` (lmms-eval's automatic sizing) is refused with a message saying what to pass."""
    if isinstance(value, str) and value.strip().lower().startswith("auto"):
        raise ValueError("bard_vl does not size batches automatically (its memory depends on the block size and the "
                         "images): pass --batch_size N (8 fits a 4B model with B=32 on one 80 GB GPU)")
    try:
        size = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"batch_size must be a positive integer, got {value!r}") from None
    if size < 1:
        raise ValueError(f"batch_size must be >= 1, got {value!r}")
    return size


@dataclass
class EvalItem:
    """One question: the prompt text, its visuals (PIL images, video paths; or a callable giving them, read
    only when its batch runs) and the task's generation kwargs (``max_new_tokens``, ``until``, ...)."""

    context: str
    visuals: list[Any] | Callable[[], list[Any]] | None = None
    gen_kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunStats:
    """Totals of one evaluation run (one ``generate_until`` call of lmms-eval)."""

    samples: int = 0
    batches: int = 0
    prompt_tokens: int = 0
    response_tokens: int = 0
    sample_forwards: int = 0  # forwards each sample took part in (what it costs decoded alone), summed
    batch_forwards: int = 0  # forwards actually run
    decode_s: float = 0.0
    wall_s: float = 0.0

    def report(self) -> dict[str, Any]:
        return {
            "samples": self.samples,
            "batches": self.batches,
            "prompt_tokens": self.prompt_tokens,
            "response_tokens": self.response_tokens,
            "forwards": self.batch_forwards,
            "tokens_per_forward": self.response_tokens / max(self.sample_forwards, 1),
            "tokens_per_batch_forward": self.response_tokens / max(self.batch_forwards, 1),
            "tokens_per_second": self.response_tokens / max(self.decode_s, 1e-9),
            "decode_s": self.decode_s,
            "wall_s": self.wall_s,
        }


def _video(path: str) -> bool:
    return isinstance(path, str) and path.lower().endswith((".mp4", ".avi", ".mov", ".mkv", ".webm"))


class BatchedBardVL:
    """A loaded checkpoint plus the settings of an evaluation.

    Args:
        pretrained: local model directory.
        batch_size: prompts per ``generate`` call.
        system_prompt: a system message before every question (``""``: none).
        min_pixels, max_pixels: each image item's Qwen-VL size keys (``max_pixels``: 1605632 as lmms-eval's
            Qwen3-VL model; ``min_pixels``: none of ours, one vision token; ``0``: no bound of ours); the processor's
            own limits apply after them (:mod:`nemo_automodel_bard.data.chat_inputs`).
        max_num_frames, fps: video sampling (``qwen_vl_utils.fetch_video``).
        stats_path: append each run's report as one JSON line to this file.
        **decoding: :data:`DECODING_ARGS` (they win over the task's generation kwargs).
    """

    def __init__(
        self,
        pretrained: str,
        device: str | None = None,
        dtype: str | None = None,
        batch_size: int = 1,
        system_prompt: str | None = "You are a helpful assistant.",
        min_pixels: int | None = None,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        max_num_frames: int = 32,
        fps: float | None = None,
        stats_path: str | None = None,
        model: Any = None,
        processor: Any = None,
        **decoding: Any,
    ) -> None:
        unknown = sorted(set(decoding) - set(DECODING_ARGS))
        if unknown:
            raise TypeError(f"unknown Bard-VL model_args {unknown}; decoding options: {list(DECODING_ARGS)}")
        batch_size = parse_batch_size(batch_size)
        if model is None or processor is None:
            from nemo_automodel_bard.serving.prompt import load_for_inference

            model, processor = load_for_inference(pretrained, device, dtype)
        self.model, self.processor = model, processor
        self.processor.tokenizer.padding_side = "left"
        self.batch_size = int(batch_size)
        self.system_prompt = system_prompt or None
        self.image_kwargs = {k: int(v) for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v}
        self.video_kwargs: dict[str, Any] = {"max_frames": int(max_num_frames)}
        if fps is not None:
            self.video_kwargs["fps"] = float(fps)
        self.stats_path = Path(stats_path) if stats_path else None
        self.decoding = parse_options(decoding, strings=True)  # "block_size=16" arrives as text or as a number
        from nemo_automodel_bard.models.bard_vl.generation_bard_vl import resolve_generate_options

        self.defaults = resolve_generate_options(self.model, **self.decoding)  # refuse bad model_args now
        self.runs: list[dict[str, Any]] = []

    # ------------------------------------------------------------------------------ items -> options
    def options_for(self, gen_kwargs: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
        """Decoding options and stop strings of an item: model_args win over the task's kwargs."""
        options: dict[str, Any] = {}
        if gen_kwargs.get("max_new_tokens") is not None:
            options["max_new_tokens"] = int(gen_kwargs["max_new_tokens"])
        temperature = gen_kwargs.get("temperature")
        if temperature is not None and not gen_kwargs.get("do_sample", temperature > 0):
            temperature = 0.0
        if temperature is not None:
            options["temperature"] = float(temperature)
            if temperature > 0 and gen_kwargs.get("top_p") is not None:
                options["top_p"] = float(gen_kwargs["top_p"])
        options.update(self.decoding)
        until = gen_kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        return options, [u for u in until if isinstance(u, str) and u and u not in DROPPED_STOPS]

    def messages_for(self, item: EvalItem) -> list[dict[str, Any]]:
        visuals = item.visuals() if callable(item.visuals) else (item.visuals or [])
        content: list[dict[str, Any]] = []
        for visual in visuals:
            if visual is None:
                continue
            if _video(visual):
                content.append({"type": "video", "video": visual, **self.video_kwargs})
            elif isinstance(visual, (str, Path)):
                content.append({"type": "image", "image": str(visual), **self.image_kwargs})
            else:
                content.append({"type": "image", "image": visual.convert("RGB") if hasattr(visual, "convert") else visual,
                                **self.image_kwargs})
        content.append({"type": "text", "text": item.context.replace("<image>", "").strip()})
        messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return messages + [{"role": "user", "content": content}]

    def encode(self, conversations: list[list[dict[str, Any]]]) -> dict[str, Any]:
        """One left-padded processor batch of several conversations (the one encoding of ``infer``, the server, the
        pipeline's evaluation and the collators' prompts)."""
        from nemo_automodel_bard.data.chat_inputs import encode_chats

        return encode_chats(self.processor, conversations, padding=True)

    # ------------------------------------------------------------------------------ run
    def generate(self, items: list[EvalItem], progress: Callable[[int], None] | None = None) -> list[dict[str, Any]]:
        """Answer ``items``; returns per item ``{"text", "input_tokens", "output_tokens"}`` in order, and records
        the run's report in :attr:`runs` (and ``stats_path``)."""
        started = time.perf_counter()
        run = RunStats()
        results: list[dict[str, Any] | None] = [None] * len(items)
        groups: dict[str, list[int]] = {}
        for index, item in enumerate(items):
            options, stops = self.options_for(item.gen_kwargs)
            groups.setdefault(json.dumps([options, stops], sort_keys=True), []).append(index)
        for key, indices in groups.items():
            options, stops = json.loads(key)
            # longest questions first (as lmms-eval's models do): similar lengths share a batch, so less padding,
            # and a batch that does not fit in memory fails at the start; answers go back to their places
            indices.sort(key=lambda i: -len(items[i].context))
            for begin in range(0, len(indices), self.batch_size):
                chunk = indices[begin : begin + self.batch_size]
                for index, result in zip(chunk, self._batch([items[i] for i in chunk], options, stops, run)):
                    results[index] = result
                if progress is not None:
                    progress(len(chunk))
        run.wall_s = time.perf_counter() - started
        report = run.report()
        report.update({k: getattr(self.defaults, k) for k in ("block_size", "denoising_steps", "remasking_strategy",
                                                              "confidence_threshold")})
        report["batch_size"] = self.batch_size
        self.runs.append(report)
        if self.stats_path is not None:
            self.stats_path.parent.mkdir(parents=True, exist_ok=True)
            with self.stats_path.open("a") as f:
                f.write(json.dumps(report) + "\n")
        return results  # type: ignore[return-value]

    def _batch(self, items: list[EvalItem], options: dict[str, Any], stops: list[str], run: RunStats) -> Iterable[dict]:
        from nemo_automodel_bard.serving.prompt import cut_at_stop

        batch = self.encode([self.messages_for(item) for item in items])
        ids, stats = self.model.generate(batch, return_step_stats=True, **options)
        run.samples += len(items)
        run.batches += 1
        lengths = batch["attention_mask"].sum(-1).tolist()
        run.prompt_tokens += int(sum(lengths))
        run.response_tokens += int(stats["num_response_tokens"])
        run.sample_forwards += int(sum(stats["forwards_per_sample"]))
        run.batch_forwards += int(stats["forwards_total"])
        run.decode_s += float(stats["elapsed_s"])
        out = []
        for row, n_prompt, n_new in zip(ids.tolist(), lengths, stats["response_tokens_per_sample"]):
            text = self.processor.tokenizer.decode(row[:n_new], skip_special_tokens=True)
            text, _ = cut_at_stop(text, stops)
            out.append({"text": text.strip(), "input_tokens": int(n_prompt), "output_tokens": int(n_new)})
        return out


def format_report(report: dict[str, Any]) -> str:
    return (f"Bard-VL: {report['samples']} samples in {report['batches']} batches of <= {report['batch_size']}, "
            f"{report['response_tokens']} tokens, {report['tokens_per_forward']:.2f} tokens/forward "
            f"({report['tokens_per_batch_forward']:.2f} per batched forward), {report['tokens_per_second']:.1f} tokens/s "
            f"(B={report['block_size']}, {report['remasking_strategy']}, threshold {report['confidence_threshold']})")


__all__ = ["BatchedBardVL", "DECODING_ARGS", "DEFAULT_MAX_PIXELS", "DROPPED_STOPS", "EvalItem", "Placement", "RunStats",
           "format_report", "parse_batch_size", "process_placement"]
