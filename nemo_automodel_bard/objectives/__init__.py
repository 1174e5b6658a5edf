"""Training objectives: what a recipe's step computes from a model and a collated batch.

* :mod:`.block_diffusion` -- the block-diffusion loss of Progressive Block Merging (and of the
  self-distillation stage, which adds a certainty term): :func:`diffusion_training_loss`,
  :func:`build_training_mask`;
* :mod:`.distillation` -- the stage-wise distillation loss: a large-block student against a
  small-block anchor's top-k (:func:`swd_training_loss`, :func:`teacher_view`);
* :mod:`.teacher_cache` -- the anchor's top-k computed once, stored, and read back by an SWD run.

Objectives sit between the model package (configuration, modeling, generation glue) and the NeMo
recipes (orchestration); the tensor maths they share lives in :mod:`nemo_automodel_bard.diffusion`.
"""

from .block_diffusion import ATTENTION_MODES, build_training_mask, diffusion_training_loss
from .distillation import check_same_tokenizer, swd_training_loss, teacher_view
from .teacher_cache import TeacherCacheError, TeacherTopKCache, build_teacher_cache

__all__ = [
    "ATTENTION_MODES",
    "TeacherCacheError",
    "TeacherTopKCache",
    "build_teacher_cache",
    "build_training_mask",
    "check_same_tokenizer",
    "diffusion_training_loss",
    "swd_training_loss",
    "teacher_view",
]
