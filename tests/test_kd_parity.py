"""Parity of our SWD knowledge-distillation loss with the published Bard-VL KD loss.

Published source read (fudan-generative-vision/Bard-VL, commit a948396f2f03e81a1ef6e563d29cc215e2030fe0 on
``master``; the same files are unchanged on the ``bard-uni`` branch, commit
cbbbe570d26198d62a5420d1ec460cb5ec600311):

* ``nemo_automodel/components/loss/topk_kd_loss.py`` (``TopKKDLoss.forward``) -- the per-position loss;
* ``train/kd_diffusion.py`` (``build_teacher_topk``, ``compute_diffusion_kd_losses``) -- how the teacher's
  top-k is taken and how CE and KD are combined and reduced;
* ``examples/distillation/bard_vl_kd_diffusion_b*_mask_*.yaml`` -- the settings: ``kl_direction:
  forward-kl``, ``temperature: 1.0``, ``fp32_upcast: true``, ``teacher_topk: 16``, ``ce_weight: 1.0``,
  ``kd_weight: 0.5``, mask rates in [0.10, 0.50], ``per_device_train_batch_size: 1``.

The published formula, restated (no code was copied; the reference functions below are written from it):
the teacher's logits at a KD position are cut to their ``k`` largest entries and renormalised by a softmax
over those ``k`` logits (divided by ``T``), ``p``. Both sides are upcast to fp32. The student keeps a
log-softmax over the *whole* vocabulary (divided by ``T``), ``log q``, read at the teacher's ``k`` ids. The
per-position loss is the cross-entropy ``-sum_j p_j log q_j`` -- *not* the KL: the teacher entropy
``-sum_j p_j log p_j`` is not subtracted. No ``T**2`` factor. It is averaged over the KD positions of the
micro-batch (sum / number of positions), and the micro-batch loss is ``1.0 * mean CE + 0.5 * mean KD``
over the same positions (``response_mask & loss_mask``: every corrupted response token, block padding
included). With one sample per micro-batch and gradient accumulation (which averages the micro-batch
losses), an optimizer step's loss is the mean over its samples of each sample's per-position mean.

What ours computes and how it relates:

* ``topk_kd_loss(direction="forward")`` computes the published per-position cross-entropy exactly (value and
  gradient), for any temperature, fp32 or bf16 logits.
* ``swd_training_loss`` (what the SWD recipe calls) passes ``subtract_teacher_entropy=True``, i.e. it
  reports the forward KL ``sum_j p_j (log p_j - log q_j)``. This differs from the published value by
  ``kd_weight`` times the (per-sample-averaged) teacher top-k entropy, a quantity that depends only on the
  teacher, so the gradient with respect to the student logits is identical. The tests assert equal
  gradients and equal values once that constant is added back.
* Reduction: ours averages each sample's ``ce_weight * CE + kd_weight * KD`` over its loss positions and then
  averages over samples -- the published step loss under its batch size of 1. (With several samples per
  micro-batch the published code would instead pool all positions of the micro-batch; its configs do not
  do that.)
* KD positions: our default ``kd_at_block_padding=False`` leaves KD out at block-padding targets on purpose
  (see docs/swd.md); the published rule is ``kd_at_block_padding=True``, which these tests use.

Tolerances: 1e-6 absolute (and relative) on values and on gradients with respect to the student logits. The
references run in float64 from the same (fp32- or bf16-valued) inputs, so the only discrepancy left is our
fp32 arithmetic.
"""

from __future__ import annotations

import types

import pytest
import torch

from nemo_automodel_bard.diffusion.losses import teacher_topk, topk_kd_loss
from nemo_automodel_bard.diffusion.masks import TokenType, reblock
from nemo_automodel_bard.objectives.distillation import SWD_DEFAULTS, swd_training_loss

VOCAB = 300
TOP_K = 16
ATOL = RTOL = 1e-6


# ----------------------------------------------------------------------------------------------------------
# independent reference, written from the published formula (see the module docstring)
# ----------------------------------------------------------------------------------------------------------


def _published_topk_ids(teacher_rows: torch.Tensor, k: int) -> torch.Tensor:
    """Ids of the teacher's ``k`` largest logits per row (order is irrelevant to the loss)."""
    return torch.argsort(teacher_rows.double(), dim=-1, descending=True)[:, :k]


def _published_kd_per_position(student_rows: torch.Tensor, teacher_rows: torch.Tensor, k: int,
                               temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position published forward top-k KD, in float64: ``(cross_entropy [R], teacher_entropy [R])``.

    ``teacher_rows`` are the teacher's full-vocabulary logits; only its top ``k`` enter the loss.
    """
    ids = _published_topk_ids(teacher_rows, k)
    kept = teacher_rows.double().gather(-1, ids) / temperature  # [R, k]
    # renormalise the teacher over its k kept logits
    log_p = kept - torch.logsumexp(kept, dim=-1, keepdim=True)
    p = torch.exp(log_p)
    # the student is normalised over the full vocabulary, then read at the teacher's ids
    z = student_rows.double() / temperature
    log_q = (z - torch.logsumexp(z, dim=-1, keepdim=True)).gather(-1, ids)
    cross_entropy = -(p * log_q).sum(-1)
    teacher_entropy = -(p * log_p).sum(-1)
    return cross_entropy, teacher_entropy


def _published_ce_per_position(student_rows: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Gold cross-entropy per position, float64."""
    z = student_rows.double()
    return torch.logsumexp(z, dim=-1) - z.gather(-1, targets.long()[:, None])[:, 0]


def _published_step_loss(student_rows, teacher_rows, targets, owner, num_samples, *, ce_weight, kd_weight, k):
    """The published step loss: per sample (one per micro-batch) ``ce_weight * mean CE + kd_weight * mean KD``
    over its KD positions (= its loss positions), then the mean over samples (gradient accumulation).
    Also returns ``kd_weight`` times the teacher's top-k entropy, reduced the same way: the published loss minus
    it is the KL form our SWD loss reports."""
    student_rows = student_rows.double()  # one upcast: CE and KD gradients add up before any rounding
    kd, h_teacher = _published_kd_per_position(student_rows, teacher_rows, k)
    ce = _published_ce_per_position(student_rows, targets)
    per_sample, per_sample_entropy = [], []
    for s in range(num_samples):
        rows = owner == s
        per_sample.append(ce_weight * ce[rows].mean() + kd_weight * kd[rows].mean())
        per_sample_entropy.append(kd_weight * h_teacher[rows].mean())
    loss = torch.stack(per_sample).mean()
    return loss, torch.stack(per_sample_entropy).mean()


# ----------------------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------------------


def _logits(rows: int, dtype: torch.dtype, seed: int, scale: float) -> torch.Tensor:
    """``[rows, VOCAB]`` random logits of ``dtype`` with no two equal entries in a row.

    Distinct values keep the teacher's top-k *set* well defined: bf16 has so few values that plain random
    logits tie at the k-th place in a fifth of the rows, where any choice among the tied ids is a valid
    top-k and the losses of two valid choices differ. Each row draws ``VOCAB`` distinct values from a pool
    of Gaussian samples already rounded to ``dtype``.
    """
    g = torch.Generator().manual_seed(seed)
    pool = torch.unique((scale * torch.randn(40 * VOCAB, generator=g, dtype=torch.float64)).to(dtype))
    assert pool.numel() >= VOCAB
    return torch.stack([pool[torch.randperm(pool.numel(), generator=g)[:VOCAB]] for _ in range(rows)])


def _assert_close(got: torch.Tensor, want: torch.Tensor) -> None:
    torch.testing.assert_close(got.double(), want.double(), atol=ATOL, rtol=RTOL)


# ----------------------------------------------------------------------------------------------------------
# the loss function itself
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_topk_kd_loss_equals_published_cross_entropy(dtype, temperature):
    """``topk_kd_loss(direction="forward")`` = the published per-position loss, averaged over positions."""
    rows = 24  # loss positions (rows gathered by the loss-position mask)
    teacher = _logits(rows, dtype, seed=0, scale=3.0)
    student = _logits(rows, dtype, seed=1, scale=2.0).requires_grad_(True)
    values, ids = teacher_topk(teacher, TOP_K)  # our recipe's top-k (fp32 values, int64 ids)
    assert values.dtype == torch.float32 and ids.shape == (rows, TOP_K)

    ours = topk_kd_loss(student, values, ids, direction=SWD_DEFAULTS["direction"], temperature=temperature,
                        reduction="mean")
    (grad_ours,) = torch.autograd.grad(ours, student)

    student_ref = student.detach().clone().requires_grad_(True)
    ce, h_teacher = _published_kd_per_position(student_ref, teacher, TOP_K, temperature)
    ref = ce.mean()
    (grad_ref,) = torch.autograd.grad(ref, student_ref)

    assert ours.dtype == torch.float32 and grad_ours.dtype == dtype
    _assert_close(ours, ref)
    _assert_close(grad_ours, grad_ref.to(dtype))

    # the KL form (what swd_training_loss reports): lower by the mean teacher entropy, same gradient
    kl = topk_kd_loss(student, values, ids, direction="forward", temperature=temperature, reduction="mean",
                      subtract_teacher_entropy=True)
    (grad_kl,) = torch.autograd.grad(kl, student)
    _assert_close(kl, ref - h_teacher.mean())
    assert float(h_teacher.mean()) > 0.1  # the constant is not negligible: the two values really differ
    _assert_close(grad_kl, grad_ref.to(dtype))


# ----------------------------------------------------------------------------------------------------------
# through swd_training_loss (the function the SWD recipe calls), with stand-in models
# ----------------------------------------------------------------------------------------------------------


class _FixedLogits(torch.nn.Module):
    """A stand-in model: its "logits" at flat row positions are rows of a stored ``[num_rows, V]`` table.

    The SWD loss only uses a model through ``forward(attention_mask=..., logits_positions=..., ...).logits``,
    so this exercises the loss's own arithmetic on logits we choose (the mask it builds is ignored)."""

    def __init__(self, table: torch.Tensor, trainable: bool):
        super().__init__()
        self.table = torch.nn.Parameter(table, requires_grad=trainable)

    def forward(self, *, attention_mask, logits_positions, input_ids, position_ids, use_cache=False, **_):
        assert attention_mask.shape[-1] == input_ids.shape[-1]
        return types.SimpleNamespace(logits=self.table[logits_positions])


def _swd_batch(num_samples: int, seed: int) -> dict:
    """A collated-batch-shaped dict: rows ``[prompt 4 | clean 8 | noisy 8]``; a random 10-50 % of the noisy
    copy is corrupted (the published mask-rate range), at least one token per sample; those are the loss
    positions. Two noisy tokens per sample are marked block padding (KD there too: the published rule)."""
    prompt, resp = 4, 8
    length = prompt + 2 * resp
    g = torch.Generator().manual_seed(seed)
    token_type = torch.tensor([int(TokenType.PROMPT)] * prompt + [int(TokenType.CLEAN)] * resp
                              + [int(TokenType.NOISY)] * resp).repeat(num_samples, 1)
    doc_ids = torch.zeros(num_samples, length, dtype=torch.long)
    positions, owner, is_pad = [], [], []
    for s in range(num_samples):
        rate = 0.1 + 0.4 * float(torch.rand((), generator=g))
        masked = torch.rand(resp, generator=g) < rate
        masked[int(torch.randint(resp, (), generator=g))] = True
        for j in torch.nonzero(masked).reshape(-1).tolist():
            positions.append(s * length + prompt + resp + j)
            owner.append(s)
            is_pad.append(j >= resp - 2)
    positions = torch.tensor(positions)
    input_ids = torch.randint(VOCAB, (num_samples, length), generator=g)
    return {
        "input_ids": input_ids,
        "position_ids": torch.arange(length).repeat(num_samples, 1),
        "token_type": token_type,
        "doc_ids": doc_ids,
        "block_ids": reblock(token_type, doc_ids, 8),
        "loss_positions": positions,
        "loss_targets": torch.randint(VOCAB, (positions.numel(),), generator=g),
        "loss_sample_index": torch.tensor(owner),
        "loss_normalizer": torch.full((num_samples,), float(resp)),
        "loss_is_block_pad": torch.tensor(is_pad),
        "num_samples": num_samples,
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swd_training_loss_equals_published_objective(dtype):
    """``swd_training_loss`` with the published settings = the published step loss minus ``kd_weight`` times
    the teacher top-k entropy (a teacher-only constant); gradients w.r.t. the student logits are equal."""
    num_samples = 4
    batch = _swd_batch(num_samples, seed=5)
    rows = batch["input_ids"].numel()
    teacher = _FixedLogits(_logits(rows, dtype, seed=7, scale=3.0), trainable=False)
    student = _FixedLogits(_logits(rows, dtype, seed=8, scale=2.0), trainable=True)
    settings = dict(SWD_DEFAULTS, kd_at_block_padding=True)  # the published rule: KD at every loss position
    assert (settings["direction"], settings["temperature"], settings["top_k"]) == ("forward", 1.0, TOP_K)
    assert (settings["ce_weight"], settings["kd_weight"]) == (1.0, 0.5)

    loss, metrics = swd_training_loss(student, teacher, batch, **settings)
    (grad_ours,) = torch.autograd.grad(loss, student.table)
    assert metrics["num_kd_tokens"] == batch["loss_positions"].numel()
    assert bool(batch["loss_is_block_pad"].any())  # padding targets are among the KD positions

    pos = batch["loss_positions"]
    student_table = student.table.detach().clone().requires_grad_(True)
    ref, entropy_term = _published_step_loss(
        student_table[pos], teacher.table.detach()[pos], batch["loss_targets"], batch["loss_sample_index"],
        num_samples, ce_weight=settings["ce_weight"], kd_weight=settings["kd_weight"], k=TOP_K)
    (grad_ref,) = torch.autograd.grad(ref, student_table)

    _assert_close(loss + entropy_term, ref)
    assert float(entropy_term) > 0.1
    _assert_close(grad_ours, grad_ref.to(dtype))
    # only the loss positions get a gradient
    untouched = torch.ones(rows, dtype=torch.bool)
    untouched[pos] = False
    assert float(grad_ours[untouched].abs().max()) == 0.0

    # the cached (offline) teacher path gives the same loss from our top-k of the same logits
    values, ids = teacher_topk(teacher.table.detach()[pos].float(), TOP_K)
    cached, _ = swd_training_loss(student, None, batch, **settings, teacher_topk_values=values,
                                  teacher_topk_ids=ids)
    (grad_cached,) = torch.autograd.grad(cached, student.table)
    _assert_close(cached + entropy_term, ref)
    _assert_close(grad_cached, grad_ref.to(dtype))
