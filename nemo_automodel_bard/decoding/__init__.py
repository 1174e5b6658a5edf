"""Block-diffusion decoding: the engine behind ``BardVLForConditionalGeneration.generate``.

* :func:`block_diffusion_generate` — parallel block-wise decoding (fused commit, batching, stats);
* :mod:`.unmasking` — token proposal and the unmasking rules;
* :func:`ar_generate` — plain autoregressive decoding with a KV cache (the causal baseline);
* :func:`render_trajectory` — a PNG of which step committed each position;

See ``docs/decoding.md``.
"""

from .autoregressive import ar_generate
from .engine import BlockCallback, DecodingOptions, DecodingResult, block_diffusion_generate, resolve_options
from .trajectory import render_trajectory
from .unmasking import RULES, UnmaskingRule, filter_logits, propose_tokens, select_commits, transfer_schedule

__all__ = [
    "BlockCallback",
    "DecodingOptions",
    "DecodingResult",
    "RULES",
    "UnmaskingRule",
    "ar_generate",
    "block_diffusion_generate",
    "filter_logits",
    "propose_tokens",
    "render_trajectory",
    "resolve_options",
    "select_commits",
    "transfer_schedule",
]
