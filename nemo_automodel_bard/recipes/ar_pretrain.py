"""Autoregressive (AR) objective: pre-train a plain, causal Qwen3-VL with NeMo's recipe machinery.

It produces the stand-in for a pretrained Qwen3-VL in the embedded tiny pipeline: a random tiny
Qwen3-VL (``model.tiny: {}``) is trained on the shapes task with next-token cross-entropy on the
response tokens, and the export ``<checkpoint_dir>/final`` is a plain Qwen3-VL directory
(``model_type: qwen3_vl``, ``architectures: [Qwen3VLForConditionalGeneration]``, tokenizer and
processor included) -- exactly what :mod:`nemo_automodel_bard.recipes.ar_init` converts.

Run::

    torchrun --standalone --nproc-per-node=1 -m nemo_automodel.cli.app recipes/tiny/ar_pretrain.yaml

Loss: the sum of the response tokens' cross-entropies of a micro-batch divided by the *global*
number of response tokens of the optimizer step (all micro-batches, all data-parallel ranks), i.e.
the token mean of the step, identical with 1 or N processes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nemo_automodel_bard.data.ar_collator import IGNORE_INDEX, MODEL_INPUTS

from .common import BardRecipeBase
from .model_builder import build_qwen3_vl_ar

__all__ = ["BardVLARPretrainRecipe"]


class BardVLARPretrainRecipe(BardRecipeBase):
    """Causal-LM training of a plain Qwen3-VL (the AR stage of the tiny pipeline).

    YAML: ``recipe: nemo_automodel_bard.recipes.ar_pretrain.BardVLARPretrainRecipe``, ``model._target_:
    nemo_automodel_bard.recipes.model_builder.build_qwen3_vl_ar``, ``dataloader.collate_fn._target_:
    nemo_automodel_bard.recipes.collate.ar_collate_fn``; see ``recipes/tiny/ar_pretrain.yaml``.
    """

    objective = "ar"
    collate_fn_name = "nemo_automodel_bard.recipes.collate.ar_collate_fn"
    builders = (build_qwen3_vl_ar,)
    denominator_key = "loss_tokens"

    def _validation_collate_defaults(self, train) -> dict:
        """The validation collator cuts rows like the training one (``max_length``)."""
        collator = getattr(train, "collator", None)
        return {"max_length": getattr(collator, "max_length", None)}

    def _local_counts(self, batch: dict) -> dict[str, float]:
        return {
            "samples": float(batch.get("num_samples", batch["input_ids"].shape[0])),
            "tokens": float(torch.as_tensor(batch["attention_mask"]).sum()),
            "loss_tokens": float((torch.as_tensor(batch["labels"]) != IGNORE_INDEX).sum()),
            "skipped": float(batch.get("num_skipped", 0)),
        }

    def _compute_loss(self, model: torch.nn.Module, batch: dict, denominator: float) -> tuple[torch.Tensor, dict]:
        inputs = {k: batch[k] for k in MODEL_INPUTS if batch.get(k) is not None}
        logits = model(**inputs, use_cache=False).logits
        labels = batch["labels"]
        keep = labels != IGNORE_INDEX
        selected = logits[keep].float()
        targets = labels[keep]
        ce = F.cross_entropy(selected, targets, reduction="sum")
        loss = ce / denominator + logits.sum() * 0.0  # stays on the graph when nothing is supervised
        with torch.no_grad():
            correct = (selected.argmax(-1) == targets).sum() if targets.numel() else torch.zeros(())
        return loss, {"ce_sum": float(ce.detach()), "correct": float(correct)}
