"""Configuration of Bard-VL: a Qwen3-VL configuration plus the block-diffusion fields.

The published Bard-VL ``config.json`` files are Qwen3-VL configs relabelled with
``model_type: "bard_vl"`` (text sub-config ``bard_vl_text``; the vision sub-config was written with
``model_type: "bard_vl"``). Plain Qwen3-VL configs load as well. Rotary settings are accepted both
as transformers-5 ``rope_parameters`` and as the transformers-4.57 ``rope_scaling`` + ``rope_theta``.
"""

from __future__ import annotations

from typing import Any

from nemo_automodel_bard.decoding.defaults import DEFAULT_DECODING  # the decoder owns its defaults

from transformers.models.qwen3_vl.configuration_qwen3_vl import (
    Qwen3VLConfig,
    Qwen3VLTextConfig,
    Qwen3VLVisionConfig,
)

#: Row of the Qwen3-VL vocabulary used as MASK (an existing, unused row; no resize needed).
QWEN3_VL_MASK_TOKEN_ID = 151671
#: ``<|im_end|>`` in the Qwen3-VL vocabulary: EOS and the block-padding token.
QWEN3_VL_EOS_TOKEN_ID = 151645

# Sampling settings use GenerationConfig's own fields: greedy (do_sample=False) unless set there.

# The vision tower keeps Qwen3-VL's own config class (transformers builds it with AutoModel).
_VISION_TYPES = {"bard_vl", "bard_vl_vision", "qwen3_vl", "qwen3_vl_vision"}
_TEXT_TYPES = {"bard_vl_text", "qwen3_vl_text"}


class BardVLTextConfig(Qwen3VLTextConfig):
    """Text tower settings (identical to Qwen3-VL's; attention is made non-causal by the model)."""

    model_type = "bard_vl_text"


class BardVLConfig(Qwen3VLConfig):
    """Qwen3-VL configuration with the fields a block-diffusion checkpoint needs.

    Args:
        mask_token_id: vocabulary row used as MASK (151671 for the Qwen3-VL vocabulary).
        block_size: the block size the checkpoint was trained with; decoding defaults to it. Published
            configs do not store it: they get 4, the published ``generate`` default.
        pad_block_token_id: token that right-pads a response to a multiple of the block size
            (``<|im_end|>``, 151645, in the Qwen3-VL vocabulary); ``None`` means ``eos_token_id``.
        legacy_clean_sees_noisy: whether training let clean queries see noisy keys (the published
            rule); informational for inference, which never needs it.
    """

    model_type = "bard_vl"
    sub_configs = {"vision_config": Qwen3VLVisionConfig, "text_config": BardVLTextConfig}

    mask_token_id: int = QWEN3_VL_MASK_TOKEN_ID
    block_size: int = DEFAULT_DECODING["block_size"]
    pad_block_token_id: int | None = None
    legacy_clean_sees_noisy: bool = False

    def __post_init__(self, **kwargs: Any) -> None:
        for key, allowed in (("vision_config", _VISION_TYPES), ("text_config", _TEXT_TYPES)):
            sub = getattr(self, key)
            if isinstance(sub, dict):
                sub = dict(sub)
                given = sub.get("model_type")
                if given is not None and given not in allowed:
                    raise ValueError(
                        f"BardVLConfig: {key}.model_type is {given!r}; expected one of {sorted(allowed)}"
                    )
                sub["model_type"] = self.sub_configs[key].model_type
                setattr(self, key, self.sub_configs[key](**sub))
            elif sub is not None and not isinstance(sub, self.sub_configs[key]):
                # a Qwen3-VL sub-config object: re-wrap so the relabelled type is saved
                setattr(self, key, self.sub_configs[key](**sub.to_dict()))
        super().__post_init__(**kwargs)
        self._check_bard_fields()

    def _check_bard_fields(self) -> None:
        vocab = self.text_config.vocab_size
        if not isinstance(self.mask_token_id, int) or not 0 <= self.mask_token_id < vocab:
            raise ValueError(
                f"BardVLConfig: mask_token_id={self.mask_token_id!r} is outside the vocabulary "
                f"(text_config.vocab_size={vocab})"
            )
        if not isinstance(self.block_size, int) or self.block_size <= 0:
            raise ValueError(f"BardVLConfig: block_size must be a positive integer, got {self.block_size!r}")
        pad = self.pad_block_token_id
        if pad is not None and not 0 <= pad < vocab:
            raise ValueError(f"BardVLConfig: pad_block_token_id={pad!r} is outside the vocabulary ({vocab})")

    @property
    def block_pad_token_id(self) -> int | None:
        """The block-padding token: ``pad_block_token_id`` or else the EOS id."""
        if self.pad_block_token_id is not None:
            return self.pad_block_token_id
        eos = getattr(self, "eos_token_id", None) or getattr(self.text_config, "eos_token_id", None)
        if isinstance(eos, (list, tuple)):
            eos = eos[0] if eos else None
        return eos

    @classmethod
    def from_qwen3_vl(cls, config: Qwen3VLConfig | dict, **overrides: Any) -> "BardVLConfig":
        """Relabel a Qwen3-VL config (object or dict) as a Bard-VL config, keeping every size."""
        data = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        model_type = data.get("model_type")
        if model_type not in ("qwen3_vl", "bard_vl"):
            raise ValueError(
                f"expected a Qwen3-VL config (model_type 'qwen3_vl' or 'bard_vl'), got model_type={model_type!r}"
            )
        for key in ("model_type", "transformers_version", "architectures", "auto_map"):
            data.pop(key, None)
        data.update(overrides)
        out = cls(**data)
        out.architectures = ["BardVLForConditionalGeneration"]
        return out


__all__ = [
    "BardVLConfig",
    "BardVLTextConfig",
    "DEFAULT_DECODING",
    "QWEN3_VL_MASK_TOKEN_ID",
    "QWEN3_VL_EOS_TOKEN_ID",
]
