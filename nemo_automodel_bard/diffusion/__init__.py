"""Pure-torch block-diffusion core: attention masks, noise and losses (no transformers / NeMo)."""

from .losses import (
    REDUCTIONS,
    diffusion_ce_loss,
    reduce_token_losses,
    teacher_topk,
    topk_kd_loss,
)
from .masks import (
    PAD_DOC_ID,
    TokenType,
    dense_attention_mask,
    flex_block_mask,
    mask_mod_fn,
    pack_layouts,
    prompt_block_ids,
    reblock,
    response_block_ids,
    sample_layout,
    visibility,
)
from .noise import (
    SCHEDULES,
    CosineSchedule,
    LinearSchedule,
    NoiseMode,
    NoiseSchedule,
    PolynomialSchedule,
    corrupt_response,
    get_schedule,
    mix_probabilities,
    ordinary_token_ids,
    sample_block_levels,
    sample_generator,
    stratified_times,
)

__all__ = [
    "reblock",
    # masks
    "TokenType",
    "PAD_DOC_ID",
    "sample_layout",
    "pack_layouts",
    "prompt_block_ids",
    "response_block_ids",
    "mask_mod_fn",
    "visibility",
    "dense_attention_mask",
    "flex_block_mask",
    # noise
    "NoiseSchedule",
    "LinearSchedule",
    "CosineSchedule",
    "PolynomialSchedule",
    "SCHEDULES",
    "get_schedule",
    "stratified_times",
    "sample_block_levels",
    "NoiseMode",
    "mix_probabilities",
    "corrupt_response",
    "sample_generator",
    "ordinary_token_ids",
    # losses
    "REDUCTIONS",
    "reduce_token_losses",
    "diffusion_ce_loss",
    "teacher_topk",
    "topk_kd_loss",
]
