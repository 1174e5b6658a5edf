"""Bard-VL model package: configuration, modeling and registration with transformers and NeMo.

Importing this package registers Bard-VL with ``AutoConfig`` (``bard_vl``, ``bard_vl_text``),
``AutoModelForImageTextToText``, ``AutoProcessor`` (:class:`BardVLProcessor`, Qwen3-VL's processor
that also takes ``qwen_vl_utils``' ``fps`` list) and NeMo-AutoModel's
architecture registry. It is also importable as ``nemo_automodel.components.models.bard_vl``.
"""

from .configuration_bard_vl import (
    DEFAULT_DECODING,
    QWEN3_VL_EOS_TOKEN_ID,
    QWEN3_VL_MASK_TOKEN_ID,
    BardVLConfig,
    BardVLTextConfig,
)
from .registration import register
from .modeling_bard_vl import FLEX_ATTENTION_NAME, BardVLForConditionalGeneration
from .processing_bard_vl import BardVLProcessor

register()

ModelClass = BardVLForConditionalGeneration

__all__ = [
    "BardVLConfig",
    "BardVLTextConfig",
    "BardVLForConditionalGeneration",
    "BardVLProcessor",
    "DEFAULT_DECODING",
    "FLEX_ATTENTION_NAME",
    "QWEN3_VL_EOS_TOKEN_ID",
    "QWEN3_VL_MASK_TOKEN_ID",
    "ModelClass",
    "register",
]
