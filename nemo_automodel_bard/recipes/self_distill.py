"""Certainty-forcing self-distillation: the recipe of the pipeline's ``self_distill`` stage.

The stage (``bard-vl stages=[...,self_distill,...]``, see ``docs/self_distill.md``) first lets a trained
block-diffusion model decode its own training prompts and keeps the answers it gets right (its
trajectories' end points: the tokens a confidence-threshold decoder committed); this recipe then trains
the same model on those answers with the PBM objective plus a certainty term -- the entropy of the
prediction at every masked position it already predicts right (dParallel's certainty-forcing
distillation). The model learns to be sure, earlier, of what it already decodes, so a threshold decoder
commits more tokens per forward at the same answers.

YAML: ``recipe: nemo_automodel_bard.recipes.self_distill.BardVLSelfDistillRecipe``; everything of a PBM
recipe plus ``bard.certainty_weight`` (default 1.0; 0 is the PBM objective). The dataset is the
trajectory file the stage writes (chat JSONL, ``make_dataset(kind="jsonl")``).

Run by hand (CPU)::

    torchrun --standalone --nproc-per-node=1 -m nemo_automodel.cli.app recipes/tiny/self_distill.yaml \\
        --model.pretrained_model_name_or_path=<B=32 export> --dataset.path=<trajectories.jsonl>
"""

from __future__ import annotations

import math
from typing import Any

from .common import RecipeConfigError
from .pbm import BardVLPBMRecipe

__all__ = ["BardVLSelfDistillRecipe", "DEFAULT_CERTAINTY_WEIGHT"]

#: weight of the certainty (entropy) term when the YAML does not set ``bard.certainty_weight``
DEFAULT_CERTAINTY_WEIGHT = 1.0


class BardVLSelfDistillRecipe(BardVLPBMRecipe):
    """PBM training on the model's own answers with the certainty-forcing term added to the loss."""

    extra_bard_keys = frozenset({"certainty_weight"})

    def validate_config(self) -> None:
        super().validate_config()
        weight = self.cfg.get("bard.certainty_weight", DEFAULT_CERTAINTY_WEIGHT)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
            raise RecipeConfigError(f"bard.certainty_weight must be a finite number >= 0, got {weight!r}")

    @property
    def certainty_weight(self) -> float:
        return float(self.cfg.get("bard.certainty_weight", DEFAULT_CERTAINTY_WEIGHT))

    def _loss_options(self) -> dict[str, Any]:
        return {"certainty_weight": self.certainty_weight}

    def _extra_metrics(self, totals: dict[str, float]) -> dict[str, Any]:
        return {**super()._extra_metrics(totals), "certainty_weight": self.certainty_weight}
