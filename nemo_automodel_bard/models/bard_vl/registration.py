"""Registration of Bard-VL with transformers' Auto classes and NeMo-AutoModel's registry.

Idempotent: safe to call any number of times (``exist_ok=True`` everywhere).
"""

from __future__ import annotations

from .configuration_bard_vl import BardVLConfig, BardVLTextConfig

ARCHITECTURE = "BardVLForConditionalGeneration"


def register_configs() -> None:
    """Register the config classes so ``model_type: bard_vl`` / ``bard_vl_text`` parse."""
    from transformers import AutoConfig

    AutoConfig.register(BardVLConfig.model_type, BardVLConfig, exist_ok=True)
    AutoConfig.register(BardVLTextConfig.model_type, BardVLTextConfig, exist_ok=True)


def register() -> None:
    """Register config, model, processor and NeMo architecture."""
    from transformers import AutoModel, AutoModelForImageTextToText, AutoProcessor

    from .modeling_bard_vl import BardVLForConditionalGeneration, BardVLTextModel
    from .processing_bard_vl import BardVLProcessor

    register_configs()
    # Qwen3VLModel builds its text tower with AutoModel.from_config(text_config).
    AutoModel.register(BardVLTextConfig, BardVLTextModel, exist_ok=True)
    AutoModelForImageTextToText.register(BardVLConfig, BardVLForConditionalGeneration, exist_ok=True)
    AutoProcessor.register(BardVLConfig, BardVLProcessor, exist_ok=True)

    from nemo_automodel._transformers.registry import register_architecture

    register_architecture(ARCHITECTURE, BardVLForConditionalGeneration, exist_ok=True)
