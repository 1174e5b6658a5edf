"""Tests for the weighted diffusion cross-entropy and the top-k distillation loss."""

from __future__ import annotations

import math

import pytest
import torch

from nemo_automodel_bard.diffusion import (
    diffusion_ce_loss,
    teacher_topk,
    topk_kd_loss,
)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _problem(m=40, v=23, samples=6, seed=0):
    g = _gen(seed)
    logits = torch.randn(m, v, generator=g) * 3
    targets = torch.randint(0, v, (m,), generator=g)
    weights = torch.rand(m, generator=g) * 5 + 0.1
    # sample 2 gets no loss position at all
    pool = torch.tensor([s for s in range(samples) if s != 2])
    sample_index = pool[torch.randint(0, pool.numel(), (m,), generator=g)]
    normalizer = torch.randint(8, 64, (samples,), generator=g).float()
    return logits, targets, weights, sample_index, normalizer


def _ce(logits_row, target):
    logz = math.log(sum(math.exp(x) for x in logits_row.tolist()))
    return logz - float(logits_row[target])


def _reference_sample_mean(logits, targets, weights, sample_index, normalizer):
    sums, has = {}, {}
    for i in range(logits.shape[0]):
        s = int(sample_index[i])
        sums[s] = sums.get(s, 0.0) + float(weights[i]) * _ce(logits[i], int(targets[i]))
        has[s] = True
    per_sample = [sums[s] / float(normalizer[s]) for s in sorted(has)]
    return sum(per_sample) / len(per_sample), sum(per_sample)


def test_sample_mean_matches_loop_reference():
    for seed in range(3):
        logits, targets, weights, idx, norm = _problem(seed=seed)
        ref_mean, ref_sum = _reference_sample_mean(logits, targets, weights, idx, norm)
        got = diffusion_ce_loss(logits, targets, weights, idx, norm)
        assert got.dtype == torch.float32 and got.dim() == 0
        assert math.isclose(float(got), ref_mean, rel_tol=1e-5)
        # a global divisor (e.g. all-reduced sample count) replaces the local count
        got_global = diffusion_ce_loss(logits, targets, weights, idx, norm, denominator=16)
        assert math.isclose(float(got_global), ref_sum / 16, rel_tol=1e-5)


def test_token_mean_and_none_match_loop_reference():
    logits, targets, weights, idx, norm = _problem(seed=5)
    per = [float(weights[i]) * _ce(logits[i], int(targets[i])) for i in range(logits.shape[0])]
    got = diffusion_ce_loss(logits, targets, weights, idx, norm, reduction="token_mean")
    assert math.isclose(float(got), sum(per) / len(per), rel_tol=1e-5)
    got_none = diffusion_ce_loss(logits, targets, weights, None, None, reduction="none")
    torch.testing.assert_close(got_none, torch.tensor(per), rtol=1e-5, atol=1e-6)
    got_sum = diffusion_ce_loss(logits, targets, weights, None, None, reduction="sum")
    assert math.isclose(float(got_sum), sum(per), rel_tol=1e-5)
    with pytest.raises(ValueError):
        diffusion_ce_loss(logits, targets, weights, None, None, reduction="sample_mean")
    with pytest.raises(ValueError):
        diffusion_ce_loss(logits, targets, weights, idx, norm, reduction="average")


def test_low_precision_logits_are_upcast():
    logits, targets, weights, idx, norm = _problem(seed=1)
    bf16 = logits.to(torch.bfloat16)
    got = diffusion_ce_loss(bf16, targets, weights, idx, norm)
    ref = diffusion_ce_loss(bf16.float(), targets, weights, idx, norm)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref)


def test_gradients_and_empty_batch():
    logits, targets, weights, idx, norm = _problem(seed=2)
    logits.requires_grad_(True)
    diffusion_ce_loss(logits, targets, weights, idx, norm).backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()

    empty = torch.zeros(0, 7, requires_grad=True)
    e_t = torch.zeros(0, dtype=torch.long)
    for red in ("sample_mean", "token_mean"):
        loss = diffusion_ce_loss(empty, e_t, torch.zeros(0), e_t, torch.ones(3), reduction=red)
        assert float(loss.detach()) == 0.0
        loss.backward()


# -------------------------------------------------------------------------------------- KD


def test_teacher_topk():
    logits = torch.randn(5, 30, generator=_gen(0))
    vals, ids = teacher_topk(logits, 4)
    assert vals.shape == ids.shape == (5, 4) and ids.dtype == torch.int64 and vals.dtype == torch.float32
    ref_vals, ref_ids = torch.sort(logits, dim=-1, descending=True)
    torch.testing.assert_close(vals, ref_vals[:, :4])
    assert torch.equal(ids, ref_ids[:, :4])
    assert teacher_topk(logits, 100)[0].shape == (5, 30)


def _reference_kd(student, teacher_full, k, direction, temperature):
    """Loop reference built from the teacher's full logits restricted to its top-k ids."""
    out = []
    for i in range(student.shape[0]):
        t_row = teacher_full[i].double() / temperature
        s_row = student[i].double() / temperature
        ids = torch.topk(teacher_full[i], k).indices.tolist()
        zt = sum(math.exp(float(t_row[j])) for j in ids)
        p = {j: math.exp(float(t_row[j])) / zt for j in ids}
        if direction == "forward":
            logz = math.log(sum(math.exp(float(x)) for x in s_row))
            out.append(-sum(p[j] * (float(s_row[j]) - logz) for j in ids))
        else:
            zs = sum(math.exp(float(s_row[j])) for j in ids)
            q = {j: math.exp(float(s_row[j])) / zs for j in ids}
            out.append(sum(q[j] * (math.log(q[j]) - math.log(p[j])) for j in ids))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_topk_kd_matches_reference(direction, temperature):
    g = _gen(3)
    m, v, k = 12, 50, 6
    student = torch.randn(m, v, generator=g) * 2
    teacher = torch.randn(m, v, generator=g) * 2
    vals, ids = teacher_topk(teacher, k)
    ref = _reference_kd(student, teacher, k, direction, temperature)
    per = topk_kd_loss(student, vals, ids, direction=direction, temperature=temperature, reduction="none")
    torch.testing.assert_close(per.double(), ref, rtol=1e-5, atol=1e-6)
    mean = topk_kd_loss(student, vals, ids, direction=direction, temperature=temperature)
    assert math.isclose(float(mean), float(ref.mean()), rel_tol=1e-5)


def test_forward_kd_equals_full_vocab_ce_against_sparse_teacher():
    g = _gen(4)
    student = torch.randn(7, 40, generator=g)
    teacher = torch.randn(7, 40, generator=g)
    vals, ids = teacher_topk(teacher, 16)
    target = torch.zeros(7, 40).scatter(-1, ids, torch.softmax(vals, -1))
    ref = torch.nn.functional.cross_entropy(student, target, reduction="none")
    torch.testing.assert_close(topk_kd_loss(student, vals, ids, reduction="none"), ref, rtol=1e-5, atol=1e-6)


def test_kd_vanishes_when_student_equals_teacher_full_vocab():
    g = _gen(5)
    logits = torch.randn(9, 32, generator=g) * 2
    vals, ids = teacher_topk(logits, 32)  # k = V
    entropy = -(torch.softmax(logits, -1) * torch.log_softmax(logits, -1)).sum(-1)
    fwd = topk_kd_loss(logits, vals, ids, direction="forward", reduction="none")
    torch.testing.assert_close(fwd, entropy, rtol=1e-5, atol=1e-5)  # CE = H(p) at a match
    fwd_kl = topk_kd_loss(logits, vals, ids, subtract_teacher_entropy=True, reduction="none")
    assert fwd_kl.abs().max() < 1e-5
    rev = topk_kd_loss(logits, vals, ids, direction="reverse", reduction="none")
    assert rev.abs().max() < 1e-5
    # reverse with k < V also vanishes: both sides are renormalised on the same support
    v8, i8 = teacher_topk(logits, 8)
    assert topk_kd_loss(logits, v8, i8, direction="reverse").abs() < 1e-5


def test_kd_reductions_and_weights():
    g = _gen(6)
    student = torch.randn(10, 20, generator=g, requires_grad=True)
    vals, ids = teacher_topk(torch.randn(10, 20, generator=g), 4)
    per = topk_kd_loss(student, vals, ids, reduction="none")
    idx = torch.tensor([0, 0, 1, 1, 1, 3, 3, 3, 3, 3])
    norm = torch.tensor([4.0, 5.0, 7.0, 9.0])
    got = topk_kd_loss(student, vals, ids, reduction="sample_mean", sample_index=idx, normalizer=norm)
    ref = (per[:2].sum() / 4 + per[2:5].sum() / 5 + per[5:].sum() / 9) / 3
    torch.testing.assert_close(got, ref)
    w = torch.linspace(0.5, 2.0, 10)
    torch.testing.assert_close(topk_kd_loss(student, vals, ids, weights=w, reduction="sum"), (per * w).sum())
    got.backward()
    assert student.grad is not None and torch.isfinite(student.grad).all()
    with pytest.raises(ValueError):
        topk_kd_loss(student, vals, ids, direction="sideways")
    with pytest.raises(ValueError):
        topk_kd_loss(student, vals, ids[:, :3])
