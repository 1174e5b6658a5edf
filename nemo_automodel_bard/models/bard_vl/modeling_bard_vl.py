"""Bard-VL: Qwen3-VL turned into a block-diffusion model.

The weights, parameter names and module tree are exactly Qwen3-VL's (``model.visual.*``,
``model.language_model.*``, ``lm_head.weight``), so published checkpoints load with no key
remapping. What changes:

* text attention is non-causal; all structure comes from the attention mask the caller passes
  (a 4-D additive float mask ``[batch, 1, q, kv]`` for ``sdpa``/``eager``, or a FlexAttention
  ``BlockMask`` for ``flex_attention``);
* prediction is not shifted: the logit at position ``i`` predicts the token at position ``i``;
* ``logits_positions`` computes logits only at selected flat positions (training never needs
  full-vocabulary logits for the whole row);
* ``generate`` is parallel block-wise decoding (see :mod:`nemo_automodel_bard.decoding`).

The class builds on NeMo-AutoModel's Qwen3-VL class so NeMo's parallelisation plan and
checkpointing apply unchanged.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from nemo_automodel.components.models.qwen3_vl.model import (
    Qwen3VLForConditionalGeneration as NeMoQwen3VLForConditionalGeneration,
)
from torch.nn.attention.flex_attention import BlockMask
from transformers import AttentionInterface
from transformers.integrations.flex_attention import flex_attention_forward
from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLCausalLMOutputWithPast

from transformers import AutoModel
from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextModel, Qwen3VLVisionPatchEmbed

from .configuration_bard_vl import BardVLConfig, BardVLTextConfig
from .registration import register_configs

logger = logging.getLogger(__name__)

#: Name under which the FlexAttention forward is registered for the text tower (HF's Qwen3-VL
#: refuses ``attn_implementation="flex_attention"``; a custom name passes its checks).
FLEX_ATTENTION_NAME = "bard_flexattn"  # must not contain "flex_attention" (HF gates that name)
AttentionInterface.register(FLEX_ATTENTION_NAME, flex_attention_forward)



#: ``config.json`` model types a Bard-VL directory may hold (a Qwen3-VL checkpoint is relabelled on load)
LOADABLE_MODEL_TYPES = ("bard_vl", "qwen3_vl")


def _weight_files(model_dir: Any) -> str:
    from pathlib import Path

    files = sorted(Path(str(model_dir)).glob("*.safetensors"))
    return ", ".join(str(f) for f in files) or str(model_dir)


def check_model_dir(model_dir: Any, allow_pickle: bool = False) -> None:
    """Check a local model directory before loading: its ``config.json`` names a Qwen3-VL or Bard-VL model and
    it holds safetensors weights (pickle ``*.bin`` files are refused unless ``allow_pickle``). Hub ids and
    other non-directories pass through unchanged. Raises ``ValueError`` naming the file."""
    import json
    from pathlib import Path

    path = Path(str(model_dir))
    if not path.is_dir():
        return
    config_file = path / "config.json"
    if config_file.is_file():
        try:
            model_type = json.loads(config_file.read_text(encoding="utf-8")).get("model_type")
        except (ValueError, AttributeError) as exc:
            raise ValueError(f"{config_file}: not a JSON object ({exc})") from exc
        if model_type not in LOADABLE_MODEL_TYPES:
            raise ValueError(f"{config_file}: model_type {model_type!r} is not a Bard-VL or Qwen3-VL model "
                             f"(expected one of {list(LOADABLE_MODEL_TYPES)})")
    has_safetensors = any(path.glob("*.safetensors")) or any(path.glob("*.safetensors.index.json"))
    pickles = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
    if not has_safetensors and pickles and not allow_pickle:
        raise ValueError(f"{path}: holds only pickle weights ({', '.join(pickles)}); Bard-VL loads safetensors "
                         "only. Convert them (e.g. load them once in a trusted environment and save_pretrained), or "
                         "pass use_safetensors=False to accept pickle files you trust")


class BardVLTextModel(Qwen3VLTextModel):
    """Qwen3-VL text tower bound to :class:`BardVLTextConfig` (same modules and parameter names)."""

    config_class = BardVLTextConfig


register_configs()
AutoModel.register(BardVLTextConfig, BardVLTextModel, exist_ok=True)

_DENSE_IMPLEMENTATIONS = ("sdpa", "eager")
_SUPPORTED_IMPLEMENTATIONS = (*_DENSE_IMPLEMENTATIONS, FLEX_ATTENTION_NAME)


class LinearPatchEmbed(Qwen3VLVisionPatchEmbed):
    """Qwen3-VL's patch embedding computed as one matrix product.

    The ``Conv3d`` has kernel == stride == the whole patch, so it is a dot product of each flattened
    patch ``[C * T * P * P]`` with each filter; ``F.linear`` on the reshaped weight gives the same
    result (same parameters, same checkpoint keys) without the convolution path, whose CPU backward
    took ~17 % of a tiny training step.
    """

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        weight = self.proj.weight
        patches = hidden_states.reshape(-1, weight[0].numel()).to(weight.dtype)
        return F.linear(patches, weight.reshape(weight.shape[0], -1), self.proj.bias)


def use_linear_patch_embed(model: torch.nn.Module) -> torch.nn.Module:
    """Switch a Qwen3-VL-shaped model's vision patch embedding to :class:`LinearPatchEmbed` (in place)."""
    embed = model.model.visual.patch_embed
    if type(embed) is Qwen3VLVisionPatchEmbed:
        embed.__class__ = LinearPatchEmbed
    return model


def _text_attn_implementation(config: BardVLConfig) -> str:
    impl = getattr(config.text_config, "_attn_implementation", None) or getattr(config, "_attn_implementation", None)
    return impl or "sdpa"


def check_attention_inputs(attn_implementation: str, attention_mask: Any) -> None:
    """Refuse attention implementations that would silently ignore or misread a Bard mask.

    Raises:
        ValueError: for an implementation that cannot apply an arbitrary mask (FlashAttention-2/3,
            paged kernels), eager attention with a boolean mask (eager *adds* the mask), a
            ``BlockMask`` with a dense implementation, or a dense mask with FlexAttention.
    """
    if attn_implementation not in _SUPPORTED_IMPLEMENTATIONS:
        raise ValueError(
            f"Bard-VL text attention cannot use attn_implementation={attn_implementation!r}: block diffusion "
            f"needs an arbitrary 4-D attention mask, which that implementation would ignore or reject. "
            f"Use one of {list(_DENSE_IMPLEMENTATIONS)} (dense additive mask) or 'flex_attention' (BlockMask)."
        )
    if isinstance(attention_mask, BlockMask):
        if attn_implementation != FLEX_ATTENTION_NAME:
            raise ValueError(
                f"a FlexAttention BlockMask was passed but attn_implementation={attn_implementation!r}; "
                "load the model with attn_implementation='flex_attention' or pass a dense additive mask"
            )
        return
    if attention_mask is None:
        return
    if attn_implementation == "eager" and attention_mask.dtype == torch.bool:
        raise ValueError(
            "eager attention adds the mask to the scores, so a boolean mask would be silently wrong; "
            "pass an additive float mask (0 where visible, -inf/finfo.min where hidden) or use sdpa"
        )
    if attn_implementation == FLEX_ATTENTION_NAME:
        raise ValueError(
            "attn_implementation='flex_attention' expects a BlockMask as attention_mask "
            "(see nemo_automodel_bard.diffusion.masks.flex_block_mask); got a dense tensor"
        )


def bidirectional_padding_mask(
    padding_mask: torch.Tensor | None, batch: int, q_len: int, kv_len: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """Additive 4-D mask ``[batch, 1, q_len, kv_len]``: every query sees every non-padding key.

    ``padding_mask`` is ``[batch, kv_len]`` (1 = token, 0 = padding) or ``None``. Query rows whose
    keys are all padding see themselves-only is not expressible here, so such rows see all keys
    (their outputs are never used, and this keeps SDPA free of NaN).
    """
    mask = torch.zeros(batch, 1, q_len, kv_len, dtype=dtype, device=device)
    if padding_mask is None:
        return mask
    keep = padding_mask.to(device=device, dtype=torch.bool)[:, None, None, :].expand(batch, 1, q_len, kv_len)
    keep = keep | ~keep.any(dim=-1, keepdim=True)
    return mask.masked_fill(~keep, torch.finfo(dtype).min)


class BardVLForConditionalGeneration(NeMoQwen3VLForConditionalGeneration):
    """Bard-VL block-diffusion vision-language model (Qwen3-VL parameters, non-causal text attention).

    Example:
        >>> from nemo_automodel.components.models.bard_vl import BardVLForConditionalGeneration
        >>> model = BardVLForConditionalGeneration.from_pretrained(model_dir, dtype="auto",
        ...                                                        _attn_implementation="sdpa")
        >>> ids = model.generate(batch, max_new_tokens=64, block_size=16)  # doctest: +SKIP
    """

    config_class = BardVLConfig
    config: BardVLConfig
    _supports_flex_attn = False  # flex goes through FLEX_ATTENTION_NAME for the text tower only

    def __init__(self, config: BardVLConfig) -> None:
        if not isinstance(config, BardVLConfig):
            raise TypeError(
                f"BardVLForConditionalGeneration needs a BardVLConfig (model_type 'bard_vl'), got "
                f"{type(config).__name__} (model_type {getattr(config, 'model_type', None)!r}); "
                "convert a Qwen3-VL config with BardVLConfig.from_qwen3_vl(...)"
            )
        super().__init__(config)
        for layer in self.model.language_model.layers:
            layer.self_attn.is_causal = False
        use_linear_patch_embed(self)
        self._validate_attn_implementation()

    # ------------------------------------------------------------------ attention implementation
    @classmethod
    def _normalize_attn_implementation(cls, kwargs: dict[str, Any]) -> None:
        for key in ("attn_implementation", "_attn_implementation"):
            if kwargs.get(key) == "flex_attention":
                kwargs[key] = {"text_config": FLEX_ATTENTION_NAME, "vision_config": "sdpa", "": "sdpa"}

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> "BardVLForConditionalGeneration":
        """Load a Bard-VL (or relabelled Qwen3-VL) directory; ``attn_implementation='flex_attention'``
        selects FlexAttention for the text tower and SDPA for the vision tower.

        Weights load from safetensors only (``use_safetensors=False`` opts into pickle files), and a local
        directory must hold a Qwen3-VL or Bard-VL ``config.json``; both are checked before any weight is read,
        and an unreadable weight file is reported by name."""
        cls._normalize_attn_implementation(kwargs)
        kwargs.setdefault("use_safetensors", True)
        if args and kwargs.get("config") is None:
            check_model_dir(args[0], allow_pickle=kwargs["use_safetensors"] is False)
        try:
            return super().from_pretrained(*args, **kwargs)
        except Exception as exc:  # a truncated or corrupt safetensors file: say which one
            if type(exc).__name__ != "SafetensorError" or not args:
                raise
            raise OSError(f"{_weight_files(args[0])}: cannot read the safetensors weights ({exc}); the file is "
                          "truncated or corrupt -- copy or export it again") from exc

    def tie_weights(self, missing_keys: set | None = None, recompute_mapping: bool = True, **kwargs: Any) -> None:
        """Tie ``lm_head`` to the text embedding (NeMo's rule) and, while loading, drop the tied head from
        ``missing_keys``: NeMo's override ignores that argument, so tied exports were reported as missing
        ``lm_head.weight`` although the head is tied right after."""
        super().tie_weights()
        if missing_keys is not None:  # the mapping is empty unless the config ties the embeddings
            for target, source in (getattr(self, "all_tied_weights_keys", None) or {}).items():
                if source not in missing_keys:
                    missing_keys.discard(target)

    @classmethod
    def _from_config(cls, config: BardVLConfig, **kwargs: Any) -> "BardVLForConditionalGeneration":
        cls._normalize_attn_implementation(kwargs)
        return super()._from_config(config, **kwargs)

    def _validate_attn_implementation(self) -> None:
        check_attention_inputs(_text_attn_implementation(self.config), None)

    @property
    def text_attn_implementation(self) -> str:
        """The attention implementation of the text tower (``sdpa``, ``eager`` or flex)."""
        return _text_attn_implementation(self.config)

    @property
    def uses_flex_attention(self) -> bool:
        """Whether the text tower expects FlexAttention ``BlockMask`` masks."""
        return self.text_attn_implementation == FLEX_ATTENTION_NAME

    # ------------------------------------------------------------------ saving
    def save_pretrained(self, save_directory: str, *args: Any, checkpointer: Any = None, **kwargs: Any) -> None:
        """Save like transformers (safetensors + config); with ``checkpointer`` use NeMo's distributed path."""
        if checkpointer is not None:
            return super().save_pretrained(save_directory, checkpointer=checkpointer, **kwargs)
        from transformers import PreTrainedModel

        return PreTrainedModel.save_pretrained(self, save_directory, *args, **kwargs)

    # ------------------------------------------------------------------ positions
    def position_ids_for(
        self,
        input_ids: torch.LongTensor,
        *,
        mm_token_type_ids: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        video_grid_thw: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.LongTensor:
        """Qwen3-VL mRoPE positions ``[3, batch, seq]`` for a (possibly left-padded) prompt.

        Uses Qwen3-VL's own ``get_rope_index``; ``attention_mask`` is the 2-D padding mask.
        Padding positions get position 0 (they are masked out of attention anyway).
        """
        if mm_token_type_ids is None:
            if image_grid_thw is not None or video_grid_thw is not None:
                raise ValueError(
                    "images/videos were given without mm_token_type_ids; pass the processor output unchanged "
                    "(it returns mm_token_type_ids alongside input_ids)"
                )
            mm_token_type_ids = torch.zeros_like(input_ids, dtype=torch.int32)
        position_ids, _ = self.model.get_rope_index(
            input_ids,
            mm_token_type_ids,
            image_grid_thw=image_grid_thw,
            video_grid_thw=video_grid_thw,
            attention_mask=attention_mask,
        )
        return position_ids

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | BlockMask | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Any | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        pixel_values_videos: torch.FloatTensor | None = None,
        image_grid_thw: torch.LongTensor | None = None,
        video_grid_thw: torch.LongTensor | None = None,
        mm_token_type_ids: torch.IntTensor | None = None,
        use_cache: bool | None = None,
        cache_position: torch.LongTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        logits_positions: torch.LongTensor | None = None,
        **kwargs: Any,
    ) -> Qwen3VLCausalLMOutputWithPast:
        """Non-causal Qwen3-VL forward with unshifted prediction.

        Args:
            input_ids: ``[batch, seq]``.
            attention_mask: a 4-D additive float mask ``[batch, 1, seq, kv]`` (0 visible, very
                negative hidden), a FlexAttention ``BlockMask``, a 2-D padding mask ``[batch, kv]``
                (turned into a bidirectional mask) or ``None`` (full bidirectional attention).
            position_ids: mRoPE positions ``[3, batch, seq]`` (or ``[4, batch, seq]`` with a text row).
                Computed from ``input_ids`` with Qwen3-VL's rope index when omitted.
            labels: ``[batch, seq]`` unshifted targets (``-100`` = ignored), or ``[M]`` targets when
                ``logits_positions`` is given.
            logits_positions: flat indices ``[M]`` into ``batch * seq``; when given, logits are
                computed only there and have shape ``[M, vocab]``.
            logits_to_keep: as in transformers (trailing count or index tensor along ``seq``).

        Returns:
            ``Qwen3VLCausalLMOutputWithPast`` with ``logits`` ``[batch, kept, vocab]`` (or
            ``[M, vocab]``) and, if labels were given, the unshifted mean cross-entropy.
        """
        check_attention_inputs(self.text_attn_implementation, attention_mask)
        if input_ids is None and inputs_embeds is None:
            raise ValueError("Bard-VL forward needs input_ids or inputs_embeds")
        ref = input_ids if input_ids is not None else inputs_embeds
        batch, q_len = ref.shape[0], ref.shape[1]
        past_len = past_key_values.get_seq_length() if past_key_values is not None else 0

        if position_ids is None:
            if input_ids is None or past_len > 0:
                raise ValueError(
                    "position_ids are required with inputs_embeds or a non-empty KV cache (Bard-VL cannot infer "
                    "mRoPE positions of a continuation); compute them with model.position_ids_for(...)"
                )
            padding = attention_mask if isinstance(attention_mask, torch.Tensor) and attention_mask.ndim == 2 else None
            position_ids = self.position_ids_for(
                input_ids,
                mm_token_type_ids=mm_token_type_ids,
                image_grid_thw=image_grid_thw,
                video_grid_thw=video_grid_thw,
                attention_mask=padding,
            )
        if attention_mask is None or (isinstance(attention_mask, torch.Tensor) and attention_mask.ndim == 2):
            if self.uses_flex_attention:
                raise ValueError("with flex_attention pass a BlockMask as attention_mask")
            attention_mask = bidirectional_padding_mask(
                attention_mask, batch, q_len, past_len + q_len, self.dtype, ref.device
            )

        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            pixel_values=pixel_values,
            pixel_values_videos=pixel_values_videos,
            image_grid_thw=image_grid_thw,
            video_grid_thw=video_grid_thw,
            mm_token_type_ids=mm_token_type_ids,
            use_cache=use_cache,
            **kwargs,
        )
        hidden = outputs.last_hidden_state
        if logits_positions is not None:
            logits = self.lm_head(hidden.reshape(-1, hidden.shape[-1]).index_select(0, logits_positions))
        elif isinstance(logits_to_keep, int) and logits_to_keep == 0:
            logits = self.lm_head(hidden)
        else:
            index = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
            logits = self.lm_head(hidden[:, index, :])

        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1).to(logits.device), ignore_index=-100
            )
        return Qwen3VLCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            rope_deltas=None,
        )

    # ------------------------------------------------------------------ decoding
    @torch.no_grad()
    def generate(self, inputs: Any = None, *args: Any, **kwargs: Any) -> Any:
        """Parallel block-wise decoding with the published signature and the Hugging Face forms.

        ``model.generate(batch, max_new_tokens=1024, block_size=16, denoising_steps=16,
        temperature=0.0, top_k=0, top_p=1.0, remasking_strategy="low_confidence_dynamic",
        confidence_threshold=0.9, return_step_stats=False)`` (the published argument order; every argument
        optional) where ``batch`` is the processor's output; ``model.generate(**batch, generation_config=..., do_sample=..., streamer=...,
        return_dict_in_generate=True)`` works too. Omitted arguments come from the generation config
        (a Bard one, or only its non-sampling fields), then ``config.json``, then the published
        defaults (:data:`nemo_automodel_bard.decoding.defaults.DEFAULT_DECODING`: block 4, 4 steps, threshold
        0.9, greedy). Returns the generated ids
        ``[batch, new_tokens]`` (EOS-trimmed, right-padded with the EOS/pad id), ``(ids, stats)`` with
        ``return_step_stats=True``, or a :class:`~.generation_bard_vl.BardVLGenerateOutput` with
        ``return_dict_in_generate=True``. Beam search, several sequences per prompt and logits
        processors are refused with a message naming the option. See
        :mod:`nemo_automodel_bard.models.bard_vl.generation_bard_vl` and
        :func:`nemo_automodel_bard.decoding.block_diffusion_generate` for every option.
        """
        from .generation_bard_vl import bard_generate

        return bard_generate(self, inputs, *args, **kwargs)

__all__ = ["BardVLForConditionalGeneration", "BardVLTextModel", "FLEX_ATTENTION_NAME", "LinearPatchEmbed", "use_linear_patch_embed", "bidirectional_padding_mask", "check_attention_inputs", "check_model_dir", "LOADABLE_MODEL_TYPES"]
