"""SWD loss: same row for teacher and student, top-k KD, no gradient to the teacher, tokenizer check."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from nemo_automodel_bard.data.chat_dataset import shapes_dataset
from nemo_automodel_bard.data.collator import BardVLCollator
from nemo_automodel_bard.diffusion.masks import reblock
from nemo_automodel_bard.objectives.distillation import check_same_tokenizer, swd_training_loss, teacher_view


@pytest.fixture(scope="module")
def swd_batch(tiny_processor):
    collator = BardVLCollator(processor=tiny_processor, block_size=8, seed=3)
    dataset = shapes_dataset(split="train", size=3, seed=0)
    return collator([dataset[i] for i in range(3)])


def test_teacher_view_changes_only_block_ids(swd_batch):
    view = teacher_view(swd_batch, 4)
    for key in ("input_ids", "position_ids", "token_type", "loss_positions", "pixel_values"):
        assert torch.equal(torch.as_tensor(view[key]), torch.as_tensor(swd_batch[key]))
    assert torch.equal(view["block_ids"], reblock(swd_batch["token_type"], swd_batch["doc_ids"], 4))
    assert not torch.equal(view["block_ids"], torch.as_tensor(swd_batch["block_ids"]))
    # same block size: the view is the student's own layout
    assert torch.equal(teacher_view(swd_batch, 8)["block_ids"], torch.as_tensor(swd_batch["block_ids"]))


def test_kd_is_zero_when_student_equals_teacher(tiny_model, swd_batch):
    vocab = tiny_model.config.text_config.vocab_size
    teacher = copy.deepcopy(tiny_model)
    loss, metrics = swd_training_loss(tiny_model, teacher, swd_batch, teacher_block_size=8, ce_weight=0.0,
                                      kd_weight=1.0, top_k=vocab)
    assert abs(float(metrics["kd"])) < 1e-5 and abs(float(loss)) < 1e-5
    assert float(metrics["agreement"]) == 1.0
    # a smaller-block teacher is a different model of the same row: KD > 0
    _, other = swd_training_loss(tiny_model, teacher, swd_batch, teacher_block_size=4, ce_weight=0.0,
                                 kd_weight=1.0, top_k=vocab)
    assert float(other["kd"]) > 1e-4


def test_kd_weight_zero_without_teacher_equals_the_loss_with_one(tiny_model, swd_batch):
    teacher = copy.deepcopy(tiny_model)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
    grads = []
    for given in (teacher, None):
        tiny_model.zero_grad()
        loss, metrics = swd_training_loss(tiny_model, given, swd_batch, teacher_block_size=4, ce_weight=1.0,
                                          kd_weight=0.0)
        loss.backward()
        grads.append((float(loss), [p.grad.clone() for p in tiny_model.parameters() if p.grad is not None]))
    assert grads[0][0] == pytest.approx(grads[1][0], rel=1e-6)
    assert all(torch.allclose(a, b, atol=1e-7) for a, b in zip(grads[0][1], grads[1][1]))
    assert metrics["num_kd_tokens"] == 0 and float(metrics["kd"]) == 0.0
    with pytest.raises(ValueError, match="needs a teacher model or its cached top-k"):
        swd_training_loss(tiny_model, None, swd_batch, teacher_block_size=4, kd_weight=0.5)


def test_no_gradient_reaches_the_teacher_and_kd_decreases_with_training(tiny_model, swd_batch, tiny_model_dir):
    from nemo_automodel_bard import BardVLForConditionalGeneration

    torch.manual_seed(1)
    teacher = BardVLForConditionalGeneration.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with torch.no_grad():  # a different teacher: perturb its weights
        for p in teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
    teacher.requires_grad_(True)  # even if left trainable, the loss must not reach it
    before = {n: p.detach().clone() for n, p in teacher.named_parameters()}
    optimizer = torch.optim.Adam(tiny_model.parameters(), lr=3e-3)
    kds = []
    for _ in range(8):
        loss, metrics = swd_training_loss(tiny_model, teacher, swd_batch, teacher_block_size=4, ce_weight=0.0,
                                          kd_weight=1.0, top_k=16)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        kds.append(float(metrics["kd"]))
    assert all(p.grad is None for p in teacher.parameters())
    assert all(torch.equal(p, before[n]) for n, p in teacher.named_parameters())
    assert kds[0] > 0 and kds[-1] < 0.7 * kds[0]


def test_topk_kd_matches_a_reference_from_full_logits(tiny_model, swd_batch, tiny_model_dir):
    from nemo_automodel_bard import BardVLForConditionalGeneration
    from nemo_automodel_bard.objectives.block_diffusion import build_training_mask

    teacher = BardVLForConditionalGeneration.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        for p in teacher.parameters():
            p.mul_(1.1)
    k = 16
    _, metrics = swd_training_loss(tiny_model, teacher, swd_batch, teacher_block_size=4, ce_weight=1.0,
                                   kd_weight=0.5, top_k=k)
    # reference: full logits of both models at every position, restricted afterwards
    inputs = dict(input_ids=swd_batch["input_ids"], position_ids=swd_batch["position_ids"],
                  pixel_values=swd_batch["pixel_values"], image_grid_thw=swd_batch["image_grid_thw"],
                  mm_token_type_ids=swd_batch["mm_token_type_ids"])
    with torch.no_grad():
        t_full = teacher(attention_mask=build_training_mask(teacher, teacher_view(swd_batch, 4)), **inputs).logits
        s_full = tiny_model(attention_mask=build_training_mask(tiny_model, swd_batch), **inputs).logits
    pos = swd_batch["loss_positions"]
    t = t_full.reshape(-1, t_full.shape[-1])[pos]
    s = s_full.reshape(-1, s_full.shape[-1])[pos]
    values, ids = t.topk(k, dim=-1)
    p_t = values.softmax(-1)
    log_q = s.log_softmax(-1).gather(-1, ids)
    kd_per_token = (p_t * (p_t.log() - log_q)).sum(-1)
    ce_per_token = F.cross_entropy(s, swd_batch["loss_targets"], reduction="none")
    # default: KD only at response targets, not at the block padding after the response
    taught = ~swd_batch["loss_is_block_pad"]
    assert taught.any() and not taught.all()
    torch.testing.assert_close(metrics["kd"], kd_per_token[taught].mean(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(metrics["ce"], ce_per_token.mean(), rtol=1e-4, atol=1e-5)
    assert metrics["num_kd_tokens"] == int(taught.sum())
    # the loss: per-sample mean of CE + 0.5 KD (KD 0 at padding), averaged over samples
    per_token = ce_per_token + 0.5 * torch.where(taught, kd_per_token, torch.zeros_like(kd_per_token))
    owner = swd_batch["loss_sample_index"]
    loss_ref = torch.stack([per_token[owner == n].mean() for n in range(swd_batch["num_samples"])]).mean()
    torch.testing.assert_close(metrics["loss"], loss_ref, rtol=1e-4, atol=1e-5)
    # published behaviour: KD at every loss position
    _, everywhere = swd_training_loss(tiny_model, teacher, swd_batch, teacher_block_size=4, ce_weight=1.0,
                                      kd_weight=0.5, top_k=k, kd_at_block_padding=True)
    torch.testing.assert_close(everywhere["kd"], kd_per_token.mean(), rtol=1e-4, atol=1e-5)
    assert everywhere["num_kd_tokens"] == int(pos.numel())


def test_tokenizer_mismatch_is_refused(tiny_model_dir, tmp_path):
    from nemo_automodel_bard.fixtures.tiny import build_tiny_tokenizer

    check_same_tokenizer(tiny_model_dir, tiny_model_dir)
    build_tiny_tokenizer(["completely different text for another vocabulary"] * 5, vocab_size=300).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="teacher tokenizer .* differs from the student's"):
        check_same_tokenizer(tiny_model_dir, tmp_path)


def test_cached_teacher_topk_gives_the_online_loss(tiny_model, tiny_processor, tiny_model_dir, tmp_path):
    """A cache built from the same rows feeds swd_training_loss exactly what the online teacher computes."""
    from nemo_automodel_bard import BardVLForConditionalGeneration
    from nemo_automodel_bard.objectives.teacher_cache import TeacherTopKCache, build_teacher_cache

    torch.manual_seed(2)
    teacher = BardVLForConditionalGeneration.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
    collator = BardVLCollator(processor=tiny_processor, block_size=8, seed=3)
    data = shapes_dataset(split="train", size=3, seed=0)
    dataset = [data[i] for i in range(3)]
    build_teacher_cache(teacher, dataset, collator, tmp_path / "c", epochs=[0, 1], teacher_block_size=4, top_k=16,
                        batch_size=2)  # other batches than the training ones: the lookup must not care
    cache = TeacherTopKCache(tmp_path / "c")
    for epoch in (0, 1):
        collator.set_epoch(epoch)
        batch = collator([dataset[2], dataset[0], dataset[1]])
        values, ids = cache.lookup("train", epoch, batch, kd_at_block_padding=False)
        online_loss, online = swd_training_loss(tiny_model, teacher, batch, teacher_block_size=4)
        cached_loss, cached = swd_training_loss(tiny_model, None, batch, teacher_block_size=4,
                                                teacher_topk_values=values, teacher_topk_ids=ids)
        torch.testing.assert_close(cached_loss, online_loss, rtol=1e-5, atol=1e-6)
        assert float(cached["kd"]) == pytest.approx(float(online["kd"]), rel=1e-5)
        assert float(cached["teacher_accuracy"]) == float(online["teacher_accuracy"])
    with pytest.raises(ValueError, match="one row per KD position"):
        swd_training_loss(tiny_model, None, batch, teacher_block_size=4, teacher_topk_values=values[:-1],
                          teacher_topk_ids=ids[:-1])
    with pytest.raises(ValueError, match="needs a teacher model or its cached top-k"):
        swd_training_loss(tiny_model, None, batch, teacher_block_size=4)
    # same answer, another prompt: the per-sample input hash refuses the cached targets
    import copy as _copy

    reworded = _copy.deepcopy(dataset[0])
    reworded["messages"][0]["content"][1]["text"] = "Name each shape in the image as color shape row column."
    assert reworded["messages"][0]["content"][1]["text"] != dataset[0]["messages"][0]["content"][1]["text"]
    collator.set_epoch(0)
    with pytest.raises(ValueError, match="input of sample 0 .* differs"):
        cache.lookup("train", 0, collator([reworded]), kd_at_block_padding=False)
    with pytest.raises(ValueError, match="index 1 occurs twice"):
        build_teacher_cache(teacher, [dataset[1], dataset[1]], collator, tmp_path / "dup", teacher_block_size=4)
    with pytest.raises(ValueError, match="no 'train' data for epoch 2"):
        collator.set_epoch(2)
        cache.lookup("train", 2, collator([dataset[0]]), kd_at_block_padding=False)

