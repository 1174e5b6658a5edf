"""The decoder's defaults: what a Bard-VL decoding call falls back to when neither the caller, the
checkpoint's generation config nor its ``config.json`` sets a value. Every other module (the model's
generation glue and config, the evaluation, the pipeline, the server) reads them from here.
"""

from __future__ import annotations

__all__ = ["DEFAULT_DECODING", "DEFAULT_MAX_NEW_TOKENS", "DEFAULT_THRESHOLD", "DEFAULT_REVISION"]

#: The published ``generate`` defaults (greedy unless sampling is asked for).
DEFAULT_DECODING = {
    "block_size": 4,
    "denoising_steps": 4,
    "remasking_strategy": "low_confidence_dynamic",
    "confidence_threshold": 0.9,
}
#: the confidence threshold of ``low_confidence_dynamic`` (also the evaluation's and the pipeline's default)
DEFAULT_THRESHOLD = DEFAULT_DECODING["confidence_threshold"]
#: new tokens per call when nothing else says
DEFAULT_MAX_NEW_TOKENS = 256
#: revision (opt-in ``revise=True``): re-mask committed tokens whose confidence fell below this, at most this often
DEFAULT_REVISION = {"revision_threshold": 0.9, "max_revision_steps": 2}
