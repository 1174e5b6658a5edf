"""Stage-wise distillation (SWD) loss: a large-block student learns from a small-block anchor.

Teacher and student see the **same** collated row — the same corrupted tokens, mRoPE positions and
images — and differ only in the block size of their attention mask (the teacher's block ids are
recomputed with :func:`nemo_automodel_bard.diffusion.masks.reblock`). At the student's corrupted
noisy positions::

    loss = ce_weight * CE(student, gold) + kd_weight * KD(student || teacher top-k)

KD is computed from the teacher's top-``k`` logits at those positions only (the teacher's full
logits for the whole row are never formed), in fp32, forward (the published cross-entropy of the
student's full-vocabulary log-softmax against the renormalised teacher top-k, reported as a KL —
minus the teacher's top-k entropy, which has no gradient) or reverse. No 1/t weight.

Block padding: the student's response is padded to a multiple of ``B_s`` with ``<|im_end|>``; a
``B_t`` anchor was only ever trained to predict fewer than ``B_t`` such tokens after a response, so
at the remaining padding targets its distribution is off-distribution noise (measured: a B=4 anchor
is right at 96 % of a B=32 student's response targets but at 49 % of its padding targets). KD is
therefore applied only at response targets by default (``kd_at_block_padding=False``; CE still
covers every position); ``True`` gives the published behaviour (KD at every loss position).

Each sample's loss is the mean over its loss positions; the batch loss sums samples and divides by
``denominator`` (the global sample count of the optimizer step) or by the local sample count.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Union

import torch
import torch.nn.functional as F

from nemo_automodel_bard.diffusion.losses import kd_direction, reduce_token_losses, teacher_topk, topk_kd_loss
from nemo_automodel_bard.diffusion.masks import reblock

from .block_diffusion import _MODEL_INPUTS, build_training_mask

__all__ = ["SWD_DEFAULTS", "anchor_topk", "check_same_tokenizer", "kd_loss_rows", "row_inputs", "swd_training_loss", "teacher_view"]


#: The published SWD settings: the one place their defaults are written (the loss below, the recipe's ``bard.*``
#: keys, the teacher cache and the pipeline's control runs read them).
SWD_DEFAULTS = {
    "teacher_block_size": 4,  # a B=4 anchor
    "ce_weight": 1.0,
    "kd_weight": 0.5,
    "top_k": 16,
    "direction": "forward",
    "temperature": 1.0,
    "kd_at_block_padding": False,  # ours; published: True (see the module docstring)
}

def teacher_view(batch: Mapping[str, Any], teacher_block_size: int) -> dict[str, Any]:
    """The same batch with block ids recomputed for the teacher's block size."""
    token_type = torch.as_tensor(batch["token_type"])
    doc_ids = torch.as_tensor(batch["doc_ids"])
    return {**batch, "block_ids": reblock(token_type, doc_ids, int(teacher_block_size))}


def kd_loss_rows(batch: Mapping[str, Any], kd_at_block_padding: bool) -> torch.Tensor:
    """Indices ``[R]`` (CPU) of the loss positions that get KD: all of them, or all but the block-padding
    targets (``batch["loss_is_block_pad"]``; all when the batch has no such key)."""
    n = torch.as_tensor(batch["loss_positions"]).numel()
    pad = batch.get("loss_is_block_pad")
    if kd_at_block_padding or pad is None:
        return torch.arange(n)
    return torch.nonzero(~torch.as_tensor(pad).bool().cpu()).reshape(-1)


def row_inputs(batch: Mapping[str, Any], device: Any) -> dict[str, Any]:
    """Model inputs of a collated batch's rows (tokens, mRoPE positions, media) on ``device``, no mask."""
    return dict(
        input_ids=torch.as_tensor(batch["input_ids"]).to(device),
        position_ids=torch.as_tensor(batch["position_ids"]).to(device),
        use_cache=False,
        **{k: torch.as_tensor(batch[k]).to(device) for k in _MODEL_INPUTS if batch.get(k) is not None},
    )


def anchor_topk(
    teacher: Any,
    batch: Mapping[str, Any],
    positions: torch.Tensor,
    *,
    teacher_block_size: int,
    top_k: int,
    attention: str = "auto",
    inputs: Optional[Mapping[str, Any]] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The anchor's top-``k`` ``(values [R, k] fp32, ids [R, k] int64)`` at flat row ``positions`` [R],
    seen with its own block size's mask (no gradient; full logits only at those positions)."""
    if inputs is None:
        inputs = row_inputs(batch, next(teacher.parameters()).device)
    with torch.no_grad():
        mask = build_training_mask(teacher, teacher_view(batch, teacher_block_size), attention=attention)
        logits = teacher(attention_mask=mask, logits_positions=positions, **inputs).logits.float()
        return teacher_topk(logits, min(int(top_k), logits.shape[-1]))


def check_same_tokenizer(student_dir: Any, teacher_dir: Any) -> None:
    """Refuse a teacher whose tokenizer differs from the student's (ids would not line up)."""
    from transformers import AutoTokenizer

    student = AutoTokenizer.from_pretrained(str(student_dir))
    teacher = AutoTokenizer.from_pretrained(str(teacher_dir))
    if student.get_vocab() != teacher.get_vocab():
        only_s = len(set(student.get_vocab().items()) - set(teacher.get_vocab().items()))
        only_t = len(set(teacher.get_vocab().items()) - set(student.get_vocab().items()))
        raise ValueError(
            f"teacher tokenizer ({teacher_dir}) differs from the student's ({student_dir}): {only_s} student and "
            f"{only_t} teacher (token, id) pairs do not match; SWD needs one shared tokenizer"
        )


def swd_training_loss(
    student: Any,
    teacher: Any,
    batch: Mapping[str, Any],
    *,
    teacher_block_size: int,
    ce_weight: float = SWD_DEFAULTS["ce_weight"],
    kd_weight: float = SWD_DEFAULTS["kd_weight"],
    top_k: int = SWD_DEFAULTS["top_k"],
    direction: str = SWD_DEFAULTS["direction"],
    temperature: float = SWD_DEFAULTS["temperature"],
    attention: str = "auto",
    teacher_attention: str = "auto",
    kd_at_block_padding: bool = SWD_DEFAULTS["kd_at_block_padding"],
    denominator: Optional[Union[int, float]] = None,
    teacher_topk_values: Optional[torch.Tensor] = None,
    teacher_topk_ids: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """``(loss, metrics)`` of one collated batch; no gradient reaches the teacher.

    KD positions are the loss positions minus block-padding targets (``batch["loss_is_block_pad"]``),
    or all loss positions with ``kd_at_block_padding=True`` (or when the batch has no such key).

    Offline teacher: pass the teacher's top-k at the KD positions as ``teacher_topk_values`` /
    ``teacher_topk_ids`` ``[R, k]`` (from :class:`~.teacher_cache.TeacherTopKCache`); ``teacher`` is
    then not run (it may be ``None``). With ``kd_weight=0`` and no teacher (a no-KD control run) the
    loss is ``ce_weight * CE`` and the KD metrics are 0 with ``num_kd_tokens=0``; a teacher that is
    given is still run, for its metrics.

    ``metrics``: detached ``loss``, ``ce`` (mean over loss positions), ``kd`` (mean over KD positions),
    ``accuracy`` (argmax == gold, loss positions), ``teacher_accuracy`` (teacher argmax == gold) and
    ``agreement`` (student argmax == teacher argmax), both over KD positions, ``num_loss_tokens``,
    ``num_kd_tokens``, ``num_samples``.
    """
    direction = kd_direction(direction)
    device = next(student.parameters()).device
    positions = torch.as_tensor(batch["loss_positions"]).to(device).long()
    targets = torch.as_tensor(batch["loss_targets"]).to(device).long()
    sample_index = torch.as_tensor(batch["loss_sample_index"]).to(device).long()
    num_samples = int(batch.get("num_samples", int(torch.as_tensor(batch["loss_normalizer"]).numel())))
    if torch.as_tensor(batch["input_ids"]).numel() == 0 or positions.numel() == 0:
        loss = sum(p.sum() for p in student.parameters() if p.requires_grad) * 0.0
        zero = torch.zeros((), device=device)
        return loss, {"loss": zero, "ce": zero, "kd": zero, "accuracy": zero, "teacher_accuracy": zero,
                      "agreement": zero, "num_loss_tokens": 0, "num_kd_tokens": 0, "num_samples": 0}
    offline = teacher_topk_values is not None or teacher_topk_ids is not None
    no_teacher = teacher is None and not offline
    if no_teacher and kd_weight != 0:
        raise ValueError("swd_training_loss needs a teacher model or its cached top-k (teacher_topk_values / _ids) "
                         f"when kd_weight is not 0 (got {kd_weight})")
    # a control run (kd_weight 0, no teacher) has nothing to distil
    kd_index = positions.new_zeros(0) if no_teacher else kd_loss_rows(batch, kd_at_block_padding).to(device)
    taught = kd_index.numel() > 0  # False when every loss position is block padding, or in a control run
    if offline and (teacher_topk_values is None or teacher_topk_ids is None
                    or teacher_topk_values.shape[0] != kd_index.numel() or teacher_topk_ids.shape != teacher_topk_values.shape):
        raise ValueError(
            f"offline teacher top-k must hold one row per KD position ({kd_index.numel()}); got values "
            f"{None if teacher_topk_values is None else tuple(teacher_topk_values.shape)} and ids "
            f"{None if teacher_topk_ids is None else tuple(teacher_topk_ids.shape)}"
        )
    inputs = row_inputs(batch, device)
    if taught and offline:
        t_values, t_ids = teacher_topk_values.float(), teacher_topk_ids.long()
        teacher_argmax = t_ids[:, 0].to(device)
    elif taught:
        t_values, t_ids = anchor_topk(teacher, batch, positions[kd_index], teacher_block_size=teacher_block_size,
                                      top_k=top_k, attention=teacher_attention, inputs=inputs)
        teacher_argmax = t_ids[:, 0]
    s_mask = build_training_mask(student, batch, attention=attention)
    logits = student(attention_mask=s_mask, logits_positions=positions, **inputs).logits.float()  # [M, V]
    ce = F.cross_entropy(logits, targets, reduction="none")
    kd = torch.zeros_like(ce)
    if taught:
        # forward KD as a KL (the published cross-entropy minus the teacher's top-k entropy): the same
        # gradient, and 0 when the student equals the teacher (k = vocabulary)
        kd = kd.index_put((kd_index,), topk_kd_loss(
            logits[kd_index], t_values.to(device), t_ids.to(device), direction=direction,
            temperature=temperature, reduction="none", subtract_teacher_entropy=direction == "forward"))
    per_token = ce_weight * ce + kd_weight * kd
    per_sample_count = torch.bincount(sample_index, minlength=num_samples).clamp_min(1).to(per_token.dtype)
    loss = reduce_token_losses(per_token, "sample_mean", sample_index, per_sample_count, denominator)
    with torch.no_grad():
        argmax = logits.argmax(-1)
        zero = torch.zeros((), device=device)
        metrics = {
            "loss": loss.detach(),
            "ce": ce.detach().mean(),
            "kd": kd.detach()[kd_index].mean() if taught else zero,
            "accuracy": (argmax == targets).float().mean(),
            "teacher_accuracy": (teacher_argmax == targets[kd_index]).float().mean() if taught else zero,
            "agreement": (argmax[kd_index] == teacher_argmax).float().mean() if taught else zero,
            "num_loss_tokens": int(targets.numel()),
            "num_kd_tokens": int(kd_index.numel()),
            "num_samples": num_samples,
        }
    return loss, metrics
