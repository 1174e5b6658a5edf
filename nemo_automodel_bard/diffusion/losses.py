"""Block-diffusion losses: ELBO-weighted cross-entropy and top-k knowledge distillation.

All functions take logits gathered at the *loss positions only* (``M`` rows), never the full
``[batch, L, V]`` tensor, and compute in fp32.

Stage-1 normalisation (our default, ``reduction="sample_mean"``)::

    loss = mean over samples s with >= 1 loss position of
           sum_{i in s} w_i * CE_i / normalizer[s]

where ``w_i`` is the ELBO weight of the position's block (``1/t`` for the linear schedule), halved
at block-padding targets, and ``normalizer[s]`` is the number of tokens in the sample's noisy region
(padded response length), supplied by the collator. This matches what the published Bard-VL code
computes: per sample it sums ``(1/t) * CE`` over the loss positions (the corrupted noisy tokens),
divides by the number of noisy-region tokens (its ``response_mask``), sums over samples and divides by
the global sample count of the optimiser step (all data-parallel ranks and micro-batches); it halves
the weight of block-padding tokens by doubling their ``t``. Pass ``denominator=`` to reproduce that
global division under data parallelism / gradient accumulation.

This module depends on torch and the standard library only.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F


__all__ = [
    "KD_DIRECTIONS",
    "REDUCTIONS",
    "kd_direction",
    "reduce_token_losses",
    "diffusion_ce_loss",
    "certainty_entropy",
    "teacher_topk",
    "topk_kd_loss",
]

REDUCTIONS = ("sample_mean", "token_mean", "mean", "sum", "none")
Number = Union[int, float, torch.Tensor]


#: the directions of the top-k KD term
KD_DIRECTIONS = ("forward", "reverse")


def kd_direction(direction: str) -> str:
    """``"forward"`` or ``"reverse"`` for a KD direction name (``forward-kl``/``fkl``, ``reverse-kl``/``rkl``
    accepted); ``ValueError`` naming the value otherwise. The one check of the direction (loss, recipe, pipeline)."""
    d = str(direction).strip().lower().replace("_", "-")
    d = {"forward-kl": "forward", "fkl": "forward", "reverse-kl": "reverse", "rkl": "reverse"}.get(d, d)
    if d not in KD_DIRECTIONS:
        raise ValueError(f"direction must be 'forward' or 'reverse', got {direction!r}")
    return d


def _zero_like_graph(x: torch.Tensor) -> torch.Tensor:
    """A scalar 0 connected to ``x``'s graph (so ``backward`` works on empty batches)."""
    return x.float().sum() * 0.0


def _reduce(
    per_token: torch.Tensor,
    reduction: str,
    sample_index: Optional[torch.Tensor],
    normalizer: Optional[torch.Tensor],
    denominator: Optional[Number],
) -> torch.Tensor:
    """Reduce per-position losses ``[M]``; see :func:`diffusion_ce_loss` for the modes."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; valid: {', '.join(REDUCTIONS)}")
    if reduction == "none":
        return per_token
    if reduction == "sum":
        return per_token.sum()
    if reduction in ("token_mean", "mean"):
        count = per_token.numel() if denominator is None else denominator
        if per_token.numel() == 0:
            return _zero_like_graph(per_token)
        return per_token.sum() / torch.as_tensor(count, dtype=torch.float32, device=per_token.device).clamp_min(1e-12)
    # sample_mean
    if sample_index is None or normalizer is None:
        raise ValueError("reduction='sample_mean' needs sample_index [M] and normalizer [num_samples]")
    normalizer = torch.as_tensor(normalizer, device=per_token.device).to(torch.float32).reshape(-1)
    sample_index = torch.as_tensor(sample_index, device=per_token.device).to(torch.int64).reshape(-1)
    if sample_index.numel() != per_token.numel():
        raise ValueError(f"sample_index has {sample_index.numel()} entries, expected {per_token.numel()}")
    num_samples = normalizer.numel()
    sums = torch.zeros(num_samples, dtype=torch.float32, device=per_token.device).index_add(0, sample_index, per_token)
    counts = torch.bincount(sample_index, minlength=num_samples)
    has_loss = counts > 0
    if not bool(has_loss.any()):
        return _zero_like_graph(per_token)
    per_sample = sums[has_loss] / normalizer[has_loss].clamp_min(1e-12)
    count = has_loss.sum() if denominator is None else denominator
    return per_sample.sum() / torch.as_tensor(count, dtype=torch.float32, device=per_token.device).clamp_min(1e-12)


def reduce_token_losses(
    per_token: torch.Tensor,
    reduction: str = "sample_mean",
    sample_index: Optional[torch.Tensor] = None,
    normalizer: Optional[torch.Tensor] = None,
    denominator: Optional[Number] = None,
) -> torch.Tensor:
    """Reduce already-weighted per-position losses ``[M]`` exactly as :func:`diffusion_ce_loss` does.

    ``diffusion_ce_loss(..., reduction=r)`` equals
    ``reduce_token_losses(diffusion_ce_loss(..., reduction="none"), r, sample_index, normalizer)``;
    useful when the per-position values are also needed (e.g. for logging) without a second softmax.
    """
    return _reduce(per_token.float(), reduction, sample_index, normalizer, denominator)


def diffusion_ce_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    weights: torch.Tensor,
    sample_index: Optional[torch.Tensor],
    normalizer: Optional[torch.Tensor],
    *,
    reduction: str = "sample_mean",
    denominator: Optional[Number] = None,
) -> torch.Tensor:
    """Weighted cross-entropy at the loss positions.

    Args:
        logits: ``[M, V]`` logits at the loss positions (any float dtype; computed in fp32).
        targets: ``[M]`` clean token ids.
        weights: ``[M]`` per-position weight (the collator's ``loss_weights``: the block's ELBO weight, times ``pad_weight`` at block padding; ones for plain CE).
        sample_index: ``[M]`` which sample (``0 .. num_samples-1``) each position belongs to.
        normalizer: ``[num_samples]`` per-sample divisor (its number of noisy-region tokens).
        reduction: ``"sample_mean"`` -- per sample ``sum(w * CE) / normalizer[s]``, then the mean over
            samples that have >= 1 loss position; ``"token_mean"`` (alias ``"mean"``) --
            ``sum(w * CE) / M``; ``"sum"``; ``"none"`` -- the ``[M]`` weighted per-position losses.
        denominator: replaces the final divisor (the local count of samples with a loss position, or
            ``M``), e.g. by a sample / token count all-reduced over ranks and micro-batches.

    Returns:
        fp32 scalar (``[M]`` for ``"none"``).
    """
    per_token = F.cross_entropy(logits.float(), targets.long(), reduction="none")
    per_token = per_token * torch.as_tensor(weights, device=per_token.device).to(torch.float32)
    return _reduce(per_token, reduction, sample_index, normalizer, denominator)


def certainty_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Certainty forcing: the entropy of the predicted distribution at each loss position whose argmax is
    already the target, 0 elsewhere (``[M]``, fp32). Added to the cross-entropy, it makes the model sure of
    what it already gets right -- so a confidence-threshold decoder commits those tokens earlier --
    without pushing positions it gets wrong towards their wrong argmax.

    Args:
        logits: ``[M, V]`` logits at the loss positions.
        targets: ``[M]`` target token ids.
    """
    logp = torch.log_softmax(logits.float(), dim=-1)
    entropy = -(logp.exp() * logp).sum(-1)
    right = logits.detach().argmax(-1) == targets.long()
    return entropy * right.to(entropy.dtype)


def teacher_topk(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher's top-``k`` logits and ids at the loss positions.

    Returns:
        ``(values [M, k] fp32, ids [M, k] int64)``, sorted by decreasing logit.
    """
    k = min(int(k), logits.shape[-1])
    values, ids = torch.topk(logits, k, dim=-1, largest=True, sorted=True)
    return values.float(), ids.long()


def topk_kd_loss(
    student_logits: torch.Tensor,
    teacher_topk_logits: torch.Tensor,
    teacher_topk_ids: torch.Tensor,
    *,
    direction: str = "forward",
    temperature: float = 1.0,
    reduction: str = "mean",
    sample_index: Optional[torch.Tensor] = None,
    normalizer: Optional[torch.Tensor] = None,
    weights: Optional[torch.Tensor] = None,
    denominator: Optional[Number] = None,
    subtract_teacher_entropy: bool = False,
) -> torch.Tensor:
    """Distillation from a teacher's top-``k`` distribution (fp32).

    With ``p_t = softmax(teacher_topk_logits / T)`` over the ``k`` teacher ids:

    * ``direction="forward"``: ``-sum_j p_t(j) log q_s(j)`` with ``q_s`` the student's *full-vocab*
      ``log_softmax(student / T)`` (the published SWD objective). It equals the teacher entropy, not 0,
      when the student matches; ``subtract_teacher_entropy=True`` returns the KL
      ``sum_j p_t(j) (log p_t(j) - log q_s(j))`` instead (same gradient, 0 at a match when ``k = V``).
    * ``direction="reverse"``: ``KL(q_s^k || p_t)`` with ``q_s^k`` the student restricted to the
      teacher's ids and renormalised.

    No ``T**2`` factor is applied. ``weights`` (``[M]``) optionally scales each position.

    Args:
        student_logits: ``[M, V]``; teacher_topk_logits: ``[M, k]``; teacher_topk_ids: ``[M, k]``.
        reduction: as in :func:`diffusion_ce_loss`; default ``"mean"`` (plain mean over ``M``).
    """
    if teacher_topk_logits.shape != teacher_topk_ids.shape:
        raise ValueError(
            f"teacher logits {tuple(teacher_topk_logits.shape)} and ids {tuple(teacher_topk_ids.shape)} differ"
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    d = kd_direction(direction)

    inv_t = 1.0 / float(temperature)
    s = student_logits.float() * inv_t
    ids = teacher_topk_ids.long()
    teacher_logp = F.log_softmax(teacher_topk_logits.float() * inv_t, dim=-1)  # [M, k]
    teacher_p = teacher_logp.exp()
    if d == "forward":
        student_logp = F.log_softmax(s, dim=-1).gather(-1, ids)  # [M, k]
        per_token = -(teacher_p * student_logp).sum(-1)
        if subtract_teacher_entropy:
            per_token = per_token + (teacher_p * teacher_logp).sum(-1)
    else:
        student_logq = F.log_softmax(s.gather(-1, ids), dim=-1)  # [M, k]
        per_token = (student_logq.exp() * (student_logq - teacher_logp)).sum(-1)
    if weights is not None:
        per_token = per_token * torch.as_tensor(weights, device=per_token.device).to(torch.float32)
    return _reduce(per_token, reduction, sample_index, normalizer, denominator)
