"""Stage-wise distillation (SWD) loss: a large-block student learns from a small-block anchor.

Teacher and student see the **same** collated row — the same corrupted tokens, mRoPE positions and
images — and differ only in the block size of their attention mask (the teacher's block ids are
recomputed with :func:`nemo_automodel_bard.diffusion.masks.reblock`). At the student's corrupted
noisy positions::

    loss = ce_weight * CE(student, gold) + kd_weight * KD(student || teacher top-k)

KD is computed from the teacher's top-``k`` logits at those positions only (the teacher's full
logits for the whole row are never formed), in fp32, forward (the published cross-entropy of the
student's full-vocabulary log-softmax against the renormalised teacher top-k, reported as a KL —
minus the teacher's top-k entropy, which has no gradient) or reverse. No 1/t weight. Each sample's loss is the
mean over its loss positions; the batch loss sums samples and divides by ``denominator`` (the
global sample count of the optimizer step) or by the local sample count.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Union

import torch
import torch.nn.functional as F

from nemo_automodel_bard.diffusion.losses import reduce_token_losses, teacher_topk, topk_kd_loss
from nemo_automodel_bard.diffusion.masks import reblock

from .training import _MODEL_INPUTS, build_training_mask

__all__ = ["check_same_tokenizer", "swd_training_loss", "teacher_view"]


def teacher_view(batch: Mapping[str, Any], teacher_block_size: int) -> dict[str, Any]:
    """The same batch with block ids recomputed for the teacher's block size."""
    token_type = torch.as_tensor(batch["token_type"])
    doc_ids = torch.as_tensor(batch["doc_ids"])
    return {**batch, "block_ids": reblock(token_type, doc_ids, int(teacher_block_size))}


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
    ce_weight: float = 1.0,
    kd_weight: float = 0.5,
    top_k: int = 16,
    direction: str = "forward",
    temperature: float = 1.0,
    attention: str = "auto",
    teacher_attention: str = "auto",
    denominator: Optional[Union[int, float]] = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """``(loss, metrics)`` of one collated batch; no gradient reaches the teacher.

    ``metrics``: detached ``loss``, ``ce``, ``kd`` (means over loss positions), ``accuracy`` and
    ``teacher_accuracy`` (argmax == gold), ``agreement`` (student argmax == teacher argmax),
    ``num_loss_tokens``, ``num_samples``.
    """
    if direction not in ("forward", "reverse"):
        raise ValueError(f"direction must be 'forward' or 'reverse', got {direction!r}")
    device = next(student.parameters()).device
    positions = torch.as_tensor(batch["loss_positions"]).to(device).long()
    targets = torch.as_tensor(batch["loss_targets"]).to(device).long()
    sample_index = torch.as_tensor(batch["loss_sample_index"]).to(device).long()
    num_samples = int(batch.get("num_samples", int(torch.as_tensor(batch["loss_normalizer"]).numel())))
    input_ids = torch.as_tensor(batch["input_ids"]).to(device)
    if input_ids.numel() == 0 or positions.numel() == 0:
        loss = sum(p.sum() for p in student.parameters() if p.requires_grad) * 0.0
        zero = torch.zeros((), device=device)
        return loss, {"loss": zero, "ce": zero, "kd": zero, "accuracy": zero, "teacher_accuracy": zero,
                      "agreement": zero, "num_loss_tokens": 0, "num_samples": 0}
    inputs = dict(
        input_ids=input_ids,
        position_ids=torch.as_tensor(batch["position_ids"]).to(device),
        logits_positions=positions,
        use_cache=False,
        **{k: torch.as_tensor(batch[k]).to(device) for k in _MODEL_INPUTS if batch.get(k) is not None},
    )
    with torch.no_grad():
        t_mask = build_training_mask(teacher, teacher_view(batch, teacher_block_size), attention=teacher_attention)
        teacher_logits = teacher(attention_mask=t_mask, **inputs).logits.float()
        t_values, t_ids = teacher_topk(teacher_logits, min(int(top_k), teacher_logits.shape[-1]))
        teacher_argmax = t_ids[:, 0]
        del teacher_logits
    s_mask = build_training_mask(student, batch, attention=attention)
    logits = student(attention_mask=s_mask, **inputs).logits.float()  # [M, V]
    ce = F.cross_entropy(logits, targets, reduction="none")
    # forward KD as a KL (the published cross-entropy minus the teacher's top-k entropy): the same
    # gradient, and 0 when the student equals the teacher (k = vocabulary)
    kd = topk_kd_loss(logits, t_values.to(device), t_ids.to(device), direction=direction,
                      temperature=temperature, reduction="none", subtract_teacher_entropy=direction == "forward")
    per_token = ce_weight * ce + kd_weight * kd
    per_sample_count = torch.bincount(sample_index, minlength=num_samples).clamp_min(1).to(per_token.dtype)
    loss = reduce_token_losses(per_token, "sample_mean", sample_index, per_sample_count, denominator)
    with torch.no_grad():
        argmax = logits.argmax(-1)
        metrics = {
            "loss": loss.detach(),
            "ce": ce.detach().mean(),
            "kd": kd.detach().mean(),
            "accuracy": (argmax == targets).float().mean(),
            "teacher_accuracy": (teacher_argmax == targets).float().mean(),
            "agreement": (argmax == teacher_argmax).float().mean(),
            "num_loss_tokens": int(targets.numel()),
            "num_samples": num_samples,
        }
    return loss, metrics
