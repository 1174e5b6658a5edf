"""Block-diffusion decoding: the engine behind ``BardVLForConditionalGeneration.generate``."""

from .engine import DecodingOptions, DecodingResult, block_diffusion_generate, resolve_options
from .unmasking import RULES, UnmaskingRule, filter_logits, propose_tokens, select_commits, transfer_schedule

__all__ = [
    "DecodingOptions",
    "DecodingResult",
    "RULES",
    "UnmaskingRule",
    "block_diffusion_generate",
    "filter_logits",
    "propose_tokens",
    "resolve_options",
    "select_commits",
    "transfer_schedule",
]
