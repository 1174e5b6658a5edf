"""Block-diffusion decoding: the engine behind ``BardVLForConditionalGeneration.generate``.

* :func:`block_diffusion_generate` — parallel block-wise decoding (fused commit, batching, stats);
* :mod:`.unmasking` — token proposal and the unmasking rules;
* :func:`ar_generate` — plain autoregressive decoding with a KV cache (the causal baseline);
* :func:`render_trajectory` — a PNG of which step committed each position;

See ``docs/decoding.md``.
"""

import importlib

#: public name -> submodule; imported on first use, so that ``decoding.defaults`` / ``decoding.inputs`` stay light
_EXPORTS = {
    "ar_generate": "autoregressive",
    "BlockCallback": "engine",
    "DecodingOptions": "engine",
    "DecodingResult": "engine",
    "block_diffusion_generate": "engine",
    "resolve_options": "engine",
    "render_trajectory": "trajectory",
    "RULES": "unmasking",
    "UnmaskingRule": "unmasking",
    "filter_logits": "unmasking",
    "propose_tokens": "unmasking",
    "select_commits": "unmasking",
    "transfer_schedule": "unmasking",
    "DEFAULT_DECODING": "defaults",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
