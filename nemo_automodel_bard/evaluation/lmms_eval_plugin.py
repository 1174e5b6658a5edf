"""Bard-VL as an lmms-eval model: ``lmms-eval --model bard_vl --model_args pretrained=DIR,block_size=16,...``.

Registered through the ``lmms_eval.models`` entry point (``manifest``), so an installed lmms-eval finds it
without any copy of lmms-eval in this package. Requests are answered in batches of ``batch_size`` with
left padding and a real attention mask (:class:`~nemo_automodel_bard.evaluation.batched.BatchedBardVL`);
every Bard decoding option is a model_arg (they win over a task's generation kwargs). After each run the
plugin logs tokens per forward and tokens per second over the whole run (and appends them to
``stats_path`` when given); each answer carries its input and output token counts.
"""

from __future__ import annotations

from typing import Any

from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms

from .batched import BatchedBardVL, EvalItem, format_report, parse_batch_size, process_placement

try:  # lmms-eval >= 0.7 reports per-sample token counts
    from lmms_eval.api.instance import GenerationResult, TokenCounts
except ImportError:  # pragma: no cover - older lmms-eval: plain strings
    GenerationResult = TokenCounts = None


def manifest() -> Any:
    """The entry point's payload: lmms-eval's manifest of the ``bard_vl`` model."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="bard_vl", simple_class_path=f"{__name__}.BardVL")


class BardVL(lmms):
    """lmms-eval model ``bard_vl`` (simple type: the task's context string plus its visuals)."""

    is_simple = True

    def __init__(self, pretrained: str, device: str | None = None, batch_size: int | str = 1,
                 max_batch_size: int | None = None, **kwargs: Any) -> None:
        super().__init__()  # max_batch_size (lmms-eval's automatic batch sizing) does not apply: batch_size is used
        batch_size = parse_batch_size(batch_size)  # "auto" is refused with a clear message
        placement = process_placement(device)
        self.accelerator = None
        if placement.world_size > 1:  # accelerate launch: lmms-eval shards by rank and waits on the accelerator
            from accelerate import Accelerator

            self.accelerator = Accelerator()
            placement.rank, placement.world_size = self.accelerator.process_index, self.accelerator.num_processes
        self._rank, self._world_size = placement.rank, placement.world_size
        self.bard = BatchedBardVL(pretrained, device=placement.device, batch_size=batch_size, **kwargs)
        self._device = placement.device

    # lmms-eval reads these
    @property
    def batch_size(self) -> int:
        return self.bard.batch_size

    @property
    def device(self) -> str:
        return self._device

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world_size

    @property
    def model(self) -> Any:
        return self.bard.model

    @property
    def tokenizer(self) -> Any:
        return self.bard.processor.tokenizer

    def _visuals(self, request: Instance) -> Any:
        context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
        return lambda: [v for v in (doc_to_visual(self.task_dict[task][split][doc_id]) or []) if v is not None]

    def generate_until(self, requests: list[Instance]) -> list[Any]:
        from tqdm import tqdm

        items = [EvalItem(context=r.args[0], visuals=self._visuals(r), gen_kwargs=dict(r.args[1] or {})) for r in requests]
        bar = tqdm(total=len(items), disable=(self.rank != 0), desc="Bard-VL")
        results = self.bard.generate(items, progress=bar.update)
        bar.close()
        report = self.bard.runs[-1]
        from loguru import logger

        logger.info(format_report(report))
        print(format_report(report), flush=True)
        out = []
        for request, result in zip(requests, results):
            self.cache_hook.add_partial("generate_until", (request.args[0], request.args[1]), result["text"])
            if GenerationResult is None:
                out.append(result["text"])
            else:
                counts = TokenCounts(input_tokens=result["input_tokens"], output_tokens=result["output_tokens"])
                out.append(GenerationResult(text=result["text"], token_counts=counts))
        return out

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        raise NotImplementedError("bard_vl answers generate_until tasks; log-likelihood scoring is not implemented")

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError("bard_vl does not implement multi-round generation")
