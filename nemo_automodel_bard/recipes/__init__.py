"""NeMo-AutoModel recipes of Bard-VL (see docs/recipes.md).

* :mod:`~nemo_automodel_bard.recipes.ar_init` -- AR Qwen3-VL directory -> Bard-VL starting directory.
* :mod:`~nemo_automodel_bard.recipes.pbm` -- ``BardVLPBMRecipe``, the block-diffusion (PBM) stage.
* :mod:`~nemo_automodel_bard.recipes.self_distill` -- ``BardVLSelfDistillRecipe``, PBM on the model's own
  answers plus the certainty term (the pipeline's ``self_distill`` stage).
* :mod:`~nemo_automodel_bard.recipes.ar_pretrain` -- ``BardVLARPretrainRecipe``, causal-LM training.
* :mod:`~nemo_automodel_bard.recipes.chain` -- AR init + PBM 2 -> 4 -> 8 -> 16 -> 32 in one command.
* :mod:`~nemo_automodel_bard.recipes.common`, :mod:`~nemo_automodel_bard.recipes.model_builder`,
  :mod:`~nemo_automodel_bard.recipes.collate` -- shared machinery (model builders, NeMo collate adapters).

Submodules are imported on demand (importing NeMo's recipe machinery is slow).
"""
