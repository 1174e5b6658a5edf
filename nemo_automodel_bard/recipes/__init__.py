"""NeMo-AutoModel recipes of Bard-VL (see docs/recipes.md).

* :mod:`~nemo_automodel_bard.recipes.ar_init` -- AR Qwen3-VL directory -> Bard-VL starting directory.
* :mod:`~nemo_automodel_bard.recipes.pbm` -- ``BardVLPBMRecipe``, the block-diffusion (PBM) stage; with
  ``bard.certainty_weight`` > 0 on the model's own answers, the pipeline's ``self_distill`` stage.
* :mod:`~nemo_automodel_bard.recipes.swd` -- ``BardVLSWDRecipe``, stage-wise distillation;
  :mod:`~nemo_automodel_bard.recipes.swd_cache` builds its offline teacher cache.
* :mod:`~nemo_automodel_bard.recipes.ar_pretrain` -- ``BardVLARPretrainRecipe``, causal-LM training.
* :mod:`~nemo_automodel_bard.recipes.common`, :mod:`~nemo_automodel_bard.recipes.model_builder`,
  :mod:`~nemo_automodel_bard.recipes.collate` -- shared machinery (model builders, NeMo collate adapters).

The chain of stages (AR init, PBM 2 -> 32, SWD, self-distillation) is the ``bard-vl`` pipeline's job.
Submodules are imported on demand (importing NeMo's recipe machinery is slow).
"""
