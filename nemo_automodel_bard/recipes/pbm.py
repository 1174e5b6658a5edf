"""Progressive Block Merging (PBM): the Stage-1 block-diffusion recipe for the ``automodel`` CLI.

Each PBM stage is one run of :class:`BardVLPBMRecipe` at a block size ``B`` (2, 4, 8, 16, 32),
initialised from the previous stage's export (the first from the AR-init output). The block size is
the collator's (``dataloader.collate_fn.block_size``); the recipe writes it into the exported
``config.json`` (``block_size``) and ``generation_config.json`` (``block_size``,
``denoising_steps``), so the decoder defaults to the trained block size.

Run (CPU, gloo; N processes give the same losses and gradients as one)::

    torchrun --standalone --nproc-per-node=2 -m nemo_automodel.cli.app recipes/tiny/pbm.yaml \\
        --dataloader.collate_fn.block_size=2 --step_scheduler.max_steps=100

GPU hosts: ``automodel recipes/qwen3_vl_4b/pbm.yaml`` (see ``docs/recipes.md``).

Certainty-forcing self-distillation (the pipeline's ``self_distill`` stage, ``docs/self_distill.md``) is
this recipe on the model's own right answers with ``bard.certainty_weight`` > 0: the entropy of the
prediction at every masked position the model already predicts right is added to the loss (dParallel's
certainty forcing). ``0`` (the default) is the PBM objective.

Loss normalisation: each sample's ELBO-weighted cross-entropy is normalised by its noisy-region
length, summed over the samples of a micro-batch and divided by the *global* number of samples of
the optimizer step (all micro-batches on all data-parallel ranks) -- ``diffusion_ce_loss(...,
denominator=)``. The logged ``loss`` is therefore the mean per-sample loss of the step.

Logged per step (``<checkpoint_dir>/training.jsonl``, W&B / MLflow when configured): ``loss``,
``ce`` (unweighted CE at the loss positions), ``accuracy``, ``grad_norm``, ``lr`` / ``lr_language``
/ ``lr_merger`` / ``lr_vision``, ``tps`` (non-padding tokens per second), ``mask_fraction``
(corrupted / noisy-region tokens), ``num_samples``, ``num_label_tokens``, ``num_skipped``,
``block_size``, ``step_time`` (and ``certainty_weight`` when it is set).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch

from nemo_automodel_bard.diffusion.masks import TokenType
from nemo_automodel_bard.models.bard_vl.generation_bard_vl import bard_generation_config
from nemo_automodel_bard.objectives.block_diffusion import ATTENTION_MODES, diffusion_training_loss

from .common import BardRecipeBase, RecipeConfigError
from .model_builder import build_bard_vl

logger = logging.getLogger(__name__)

__all__ = ["BardVLPBMRecipe", "diffusion_collate_defaults", "validation_collate_defaults"]

#: decoding settings carried over from the input model's generation config
_KEEP_DECODING = ("remasking_strategy", "confidence_threshold", "max_new_tokens", "temperature", "top_k", "top_p")


def diffusion_collate_defaults(config: Any) -> dict:
    """Collator arguments taken from the model's config when the YAML leaves them out."""
    defaults: dict[str, Any] = {"mask_token_id": getattr(config, "mask_token_id", None)}
    if getattr(config, "pad_block_token_id", None) is not None:
        defaults["pad_block_token_id"] = config.pad_block_token_id
    return defaults


def validation_collate_defaults(config: Any, train: Any) -> dict:
    """The validation collator follows the training one (block size, length, noise, mask rule)."""
    return {
        **diffusion_collate_defaults(config),
        "block_size": train.block_size,
        "max_length": train.collator.max_length,
        "noise_mode": train.collator.noise_mode.value,
        "legacy_clean_sees_noisy": train.collator.legacy_clean_sees_noisy,
    }


class BardVLPBMRecipe(BardRecipeBase):
    """Block-diffusion (Stage-1) training of Bard-VL on NeMo-AutoModel's VLM recipe machinery.

    YAML: ``recipe: nemo_automodel_bard.recipes.pbm.BardVLPBMRecipe``, ``model._target_:
    nemo_automodel_bard.recipes.model_builder.build_bard_vl``, ``dataloader.collate_fn._target_:
    nemo_automodel_bard.recipes.collate.bard_collate_fn``; see ``recipes/tiny/pbm.yaml``.
    """

    objective = "diffusion"
    collate_fn_name = "nemo_automodel_bard.recipes.collate.bard_collate_fn"
    builders = (build_bard_vl,)
    denominator_key = "samples"
    extra_bard_keys = frozenset({"certainty_weight"})

    def validate_config(self) -> None:
        super().validate_config()
        weight = self.cfg.get("bard.certainty_weight", 0.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
            raise RecipeConfigError(f"bard.certainty_weight must be a finite number >= 0, got {weight!r}")
        attention = self.cfg.get("bard.attention", "auto")
        if attention not in ATTENTION_MODES:
            raise RecipeConfigError(f"bard.attention must be one of {ATTENTION_MODES}, got {attention!r}")
        block = self.cfg.get("dataloader.collate_fn.block_size", None)
        if block is not None and (not isinstance(block, int) or block < 1):
            raise RecipeConfigError(f"dataloader.collate_fn.block_size must be a positive integer, got {block!r}")

    @property
    def block_size(self) -> int:
        """The block size this stage trains (the training collator's)."""
        return int(self.train_collator.block_size)

    @property
    def certainty_weight(self) -> float:
        """Weight of the certainty (entropy) term; 0 is the PBM objective."""
        return float(self.cfg.get("bard.certainty_weight", 0.0))

    @property
    def attention(self) -> str:
        return self.cfg.get("bard.attention", "auto")

    def _collate_defaults(self) -> dict:
        return diffusion_collate_defaults(self._unwrapped_model().config)

    def _validation_collate_defaults(self, train: Any) -> dict:
        return validation_collate_defaults(self._unwrapped_model().config, train)

    def _install_collators(self) -> None:
        super()._install_collators()
        config = self._unwrapped_model().config
        mask = getattr(config, "mask_token_id", None)
        if mask is not None and self.train_collator.mask_token_id != mask:
            raise RecipeConfigError(
                f"dataloader.collate_fn.mask_token_id={self.train_collator.mask_token_id} differs from the model's "
                f"config.mask_token_id={mask}; drop the collator setting to use the model's"
            )
        if self.val_dataloader is not None and self.val_dataloader.collate_fn.block_size != self.block_size:
            logger.warning(
                "validation block size %d differs from the training block size %d",
                self.val_dataloader.collate_fn.block_size,
                self.block_size,
            )

    def _prepare_model(self, model: torch.nn.Module) -> None:
        """Record the stage's block size (and mask rule) in the config and generation config that
        every checkpoint and the final export carry."""
        config = model.config
        config.block_size = self.block_size
        config.legacy_clean_sees_noisy = bool(self.train_collator.collator.legacy_clean_sees_noisy)
        keep = {}
        previous = getattr(model, "generation_config", None)
        for key in _KEEP_DECODING:
            value = getattr(previous, key, None) if previous is not None else None
            if value is not None:
                keep[key] = value
        model.generation_config = bard_generation_config(config, **keep)
        if self.dist_env.is_main:
            logger.info(
                "PBM stage: block_size %d, noise %s, mask id %d, attention %s",
                self.block_size,
                self.train_collator.collator.noise_mode.value,
                self.train_collator.mask_token_id,
                self.attention,
            )

    def _local_counts(self, batch: dict) -> dict[str, float]:
        return {
            "samples": float(batch["num_samples"]),
            "tokens": float((torch.as_tensor(batch["token_type"]) != int(TokenType.PAD)).sum()),
            "loss_tokens": float(torch.as_tensor(batch["loss_positions"]).numel()),
            "noisy_tokens": float(torch.as_tensor(batch["loss_normalizer"]).sum()),
            "skipped": float(batch.get("num_skipped", 0)),
        }

    def _loss_options(self) -> dict[str, Any]:
        """Extra keyword arguments of :func:`diffusion_training_loss` (the certainty term when it is on)."""
        return {"certainty_weight": self.certainty_weight} if self.certainty_weight else {}

    def _compute_loss(self, model: torch.nn.Module, batch: dict, denominator: float) -> tuple[torch.Tensor, dict]:
        loss, metrics = diffusion_training_loss(model, batch, attention=self.attention, denominator=denominator,
                                                **self._loss_options())
        m = float(metrics["num_loss_tokens"])
        return loss, {"ce_sum": float(metrics["ce"]) * m, "correct": float(metrics["accuracy"]) * m}

    def _extra_metrics(self, totals: dict[str, float]) -> dict[str, Any]:
        noisy = totals.get("noisy_tokens", 0.0)
        metrics = {
            "mask_fraction": totals.get("loss_tokens", 0.0) / noisy if noisy else 0.0,
            "block_size": self.block_size,
        }
        if self.certainty_weight:
            metrics["certainty_weight"] = self.certainty_weight
        return metrics

    def _export_metadata(self) -> dict:
        collator = self.train_collator.collator
        return {
            **super()._export_metadata(),
            "block_size": self.block_size,
            "noise_mode": collator.noise_mode.value,
            "legacy_clean_sees_noisy": collator.legacy_clean_sees_noisy,
        }
