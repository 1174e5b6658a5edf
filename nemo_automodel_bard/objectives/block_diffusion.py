"""Stage-1 block-diffusion training loss of Bard-VL (one forward over collated rows).

:func:`diffusion_training_loss` takes a batch from
:class:`nemo_automodel_bard.data.collator.BardVLCollator`, builds the attention mask from its
``token_type`` / ``block_ids`` / ``doc_ids`` (a dense additive ``[b, 1, L, L]`` mask for SDPA / eager,
a FlexAttention ``BlockMask`` for a model loaded with ``attn_implementation="flex_attention"``), runs
the model with ``logits_positions=batch["loss_positions"]`` -- logits exist only at the ``M`` loss
positions, never ``[b, L, vocab]`` -- and returns the ELBO-weighted cross-entropy
(:func:`nemo_automodel_bard.diffusion.losses.diffusion_ce_loss`).

Example:
    >>> batch = collator(records)                                            # doctest: +SKIP
    >>> loss, metrics = diffusion_training_loss(model, batch)                # doctest: +SKIP
    >>> loss.backward()                                                      # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Union

import torch

from nemo_automodel_bard.diffusion.losses import certainty_entropy, diffusion_ce_loss, reduce_token_losses
from nemo_automodel_bard.decoding.inputs import MEDIA_KEYS
from nemo_automodel_bard.diffusion.masks import TokenType, dense_attention_mask, flex_block_mask

__all__ = ["ATTENTION_MODES", "build_training_mask", "diffusion_training_loss"]

#: accepted values of ``attention``
ATTENTION_MODES = ("auto", "dense", "flex")
_MODEL_INPUTS = MEDIA_KEYS
_REQUIRED = (
    "input_ids",
    "position_ids",
    "token_type",
    "block_ids",
    "doc_ids",
    "loss_positions",
    "loss_targets",
    "loss_weights",
    "loss_sample_index",
    "loss_normalizer",
)


def _model_device_dtype(model: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    param = next(model.parameters())
    return param.device, param.dtype


def _resolve_attention(model: Any, attention: str) -> str:
    if attention not in ATTENTION_MODES:
        raise ValueError(f"attention must be one of {ATTENTION_MODES}, got {attention!r}")
    uses_flex = bool(getattr(model, "uses_flex_attention", False))
    if attention == "auto":
        return "flex" if uses_flex else "dense"
    if attention == "flex" and not uses_flex:
        raise ValueError(
            "attention='flex' needs a model whose text tower uses FlexAttention; load it with "
            "attn_implementation='flex_attention' (or use attention='dense')"
        )
    if attention == "dense" and uses_flex:
        raise ValueError(
            "attention='dense' was requested but the model's text attention is FlexAttention; load it with "
            "attn_implementation='sdpa' for the dense path (or use attention='flex')"
        )
    return attention


def build_training_mask(
    model: Any,
    batch: Mapping[str, Any],
    *,
    attention: str = "auto",
    legacy_clean_sees_noisy: bool = False,
) -> Any:
    """The attention mask of a collated batch for ``model``.

    Returns a dense additive float mask ``[b, 1, L, L]`` in the model's dtype (``attention="dense"``,
    the ``auto`` choice for SDPA / eager models and on CPU) or a FlexAttention ``BlockMask``
    (``attention="flex"``, the ``auto`` choice for FlexAttention models), on the model's device.
    """
    mode = _resolve_attention(model, attention)
    device, dtype = _model_device_dtype(model)
    tt, bid, doc = (torch.as_tensor(batch[k]).to(device) for k in ("token_type", "block_ids", "doc_ids"))
    if mode == "flex":
        return flex_block_mask(tt, bid, doc, legacy_clean_sees_noisy=legacy_clean_sees_noisy, device=device)
    return dense_attention_mask(tt, bid, doc, legacy_clean_sees_noisy=legacy_clean_sees_noisy, dtype=dtype)


def diffusion_training_loss(
    model: Any,
    batch: Mapping[str, Any],
    *,
    attention: str = "auto",
    legacy_clean_sees_noisy: Optional[bool] = None,
    reduction: Optional[str] = None,
    denominator: Optional[Union[int, float, torch.Tensor]] = None,
    certainty_weight: float = 0.0,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """ELBO-weighted diffusion cross-entropy of one collated batch.

    Args:
        model: a :class:`BardVLForConditionalGeneration` (any model with its ``forward`` contract:
            ``logits_positions`` -> logits ``[M, V]``).
        batch: output of :class:`~nemo_automodel_bard.data.collator.BardVLCollator` (tensors may
            already be on the model's device).
        attention: ``"auto"`` (FlexAttention ``BlockMask`` when ``model.uses_flex_attention``, else the
            dense additive mask), ``"dense"`` or ``"flex"``.
        legacy_clean_sees_noisy: the published mask rule (clean queries also see noisy keys); ``None``
            takes the batch's ``legacy_clean_sees_noisy`` entry (default False).
        reduction: ``diffusion_ce_loss`` reduction; ``None`` takes the batch's ``loss_reduction``
            (default ``"sample_mean"``).
        denominator: replaces the final divisor (e.g. the global sample count of the optimiser step).
        certainty_weight: adds this times :func:`~nemo_automodel_bard.diffusion.losses.certainty_entropy`
            (the entropy at loss positions already predicted right) to each position's loss, reduced like
            the CE (self-distillation; 0: the plain objective, bit for bit).

    Returns:
        ``(loss, metrics)``: fp32 scalar loss; ``metrics`` holds detached 0-d tensors ``loss``, ``ce``
        (unweighted mean CE at the loss positions), ``accuracy`` (argmax == target there),
        ``mask_fraction``, ``certainty`` (mean entropy at the positions predicted right; only with
        ``certainty_weight``), and ints ``num_loss_tokens``, ``num_samples``, ``num_tokens`` (non-padding).
    """
    missing = [k for k in _REQUIRED if k not in batch]
    if missing:
        raise KeyError(f"batch is missing {missing}; build it with BardVLCollator")
    if legacy_clean_sees_noisy is None:
        legacy_clean_sees_noisy = bool(batch.get("legacy_clean_sees_noisy", False))
    reduction = reduction or batch.get("loss_reduction") or "sample_mean"
    device, _ = _model_device_dtype(model)

    def to_dev(key: str) -> torch.Tensor:
        return torch.as_tensor(batch[key]).to(device)

    input_ids = to_dev("input_ids")
    positions = to_dev("loss_positions").long()
    num_samples = int(batch.get("num_samples", int(torch.as_tensor(batch["loss_normalizer"]).numel())))
    if input_ids.numel() == 0:  # every sample of this batch was skipped: a zero loss tied to the graph
        loss = sum(p.sum() for p in model.parameters() if p.requires_grad) * 0.0
        zero = torch.zeros((), device=device)
        return loss, {
            "loss": zero, "ce": zero, "accuracy": zero, "mask_fraction": zero,
            "num_loss_tokens": 0, "num_samples": 0, "num_tokens": 0,
        }  # fmt: skip
    if positions.numel() and int(positions.max()) >= input_ids.numel():
        raise ValueError(f"loss_positions index {int(positions.max())} is outside the batch ({input_ids.numel()} tokens)")

    mask = build_training_mask(model, batch, attention=attention, legacy_clean_sees_noisy=legacy_clean_sees_noisy)
    extra = {k: to_dev(k) for k in _MODEL_INPUTS if batch.get(k) is not None}
    out = model(
        input_ids=input_ids,
        attention_mask=mask,
        position_ids=to_dev("position_ids"),
        logits_positions=positions,
        use_cache=False,
        **extra,
    )
    logits = out.logits  # [M, V]
    targets = to_dev("loss_targets").long()
    weights = to_dev("loss_weights").float()
    # weighted CE per loss position (one fp32 softmax), then the requested reduction
    per_token = diffusion_ce_loss(logits, targets, weights, None, None, reduction="none")  # [M]
    ce_per_token = per_token
    certainty = None
    if certainty_weight:
        certainty = certainty_entropy(logits, targets)
        per_token = per_token + float(certainty_weight) * certainty
    loss = reduce_token_losses(
        per_token, reduction, to_dev("loss_sample_index"), to_dev("loss_normalizer"), denominator
    )
    with torch.no_grad():
        if targets.numel():
            ce = (ce_per_token.detach() / weights.clamp_min(1e-12)).mean()
            accuracy = (logits.detach().argmax(-1) == targets).float().mean()
        else:
            ce = accuracy = torch.zeros((), device=device)
        pad = torch.as_tensor(batch["token_type"]).to(device) == int(TokenType.PAD)
    metrics = {
        "loss": loss.detach(),
        "ce": ce,
        "accuracy": accuracy,
        "mask_fraction": torch.as_tensor(batch.get("mask_fraction", 0.0), dtype=torch.float32),
        "num_loss_tokens": int(targets.numel()),
        "num_samples": num_samples,
        "num_tokens": int((~pad).sum()),
    }
    if certainty is not None:
        right = logits.detach().argmax(-1) == targets
        metrics["certainty"] = (certainty.detach().sum() / right.sum().clamp_min(1)).float()
    return loss, metrics
