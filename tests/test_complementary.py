"""Complementary masking: a second noisy copy masking exactly what the first kept; no leak between copies."""

from __future__ import annotations

import warnings

import pytest
import torch

from nemo_automodel_bard import BardVLForConditionalGeneration
from nemo_automodel_bard.data.chat_dataset import shapes_dataset
from nemo_automodel_bard.data.collator import BardVLCollator
from nemo_automodel_bard.diffusion import TokenType
from nemo_automodel_bard.diffusion.masks import reblock, sample_layout, visibility
from nemo_automodel_bard.objectives.block_diffusion import build_training_mask, diffusion_training_loss

B = 4
NOISY, COMP, CLEAN, PROMPT = (int(TokenType.NOISY), int(TokenType.NOISY_COMPLEMENT), int(TokenType.CLEAN),
                              int(TokenType.PROMPT))


@pytest.fixture(scope="module")
def records():
    ds = shapes_dataset("train", size=3, seed=0)
    return [ds[i] for i in range(3)]


@pytest.fixture(scope="module")
def batches(tiny_processor, records):
    plain = BardVLCollator(processor=tiny_processor, block_size=B, seed=5)(records)
    both = BardVLCollator(processor=tiny_processor, block_size=B, seed=5, complementary=True)(records)
    return plain, both


def test_layout_and_visibility_of_the_two_copies():
    tt, bid = sample_layout(3, 4, 2, complementary=True)
    assert tt.tolist() == [PROMPT] * 3 + [CLEAN] * 4 + [NOISY] * 4 + [COMP] * 4
    assert bid.tolist() == [0, 0, 1] + [2, 2, 3, 3] * 3
    vis = visibility(tt, bid, torch.zeros_like(tt))[0]
    noisy, comp = slice(7, 11), slice(11, 15)
    assert not vis[noisy, comp].any() and not vis[comp, noisy].any()  # the copies never see each other
    assert torch.equal(vis[comp, comp], vis[noisy, noisy])  # each sees its own block of its own copy
    assert torch.equal(vis[comp, :7], vis[noisy, :7])  # prompt and earlier clean blocks alike
    assert not vis[:7, 7:].any()  # prompt and clean see no noisy copy
    # reblock recovers the layout of the complement copy too
    assert torch.equal(reblock(tt, torch.zeros_like(tt), 2), bid)
    assert torch.equal(reblock(tt, torch.zeros_like(tt), 4), sample_layout(3, 4, 4, complementary=True)[1])


def test_complement_masks_exactly_what_the_first_copy_kept(batches, tiny_processor):
    plain, both = batches
    mask_id = BardVLCollator(processor=tiny_processor, block_size=B).mask_token_id
    L0, L1 = plain["input_ids"].shape[1], both["input_ids"].shape[1]
    for row in range(both["input_ids"].shape[0]):
        tt, ids, pos = both["token_type"][row], both["input_ids"][row], both["position_ids"][:, row]
        clean, noisy, comp = ids[tt == CLEAN], ids[tt == NOISY], ids[tt == COMP]
        assert torch.equal(noisy, plain["input_ids"][row][plain["token_type"][row] == NOISY])  # same first copy
        first_masked = noisy == mask_id
        assert torch.equal(comp, torch.where(first_masked, clean, torch.full_like(clean, mask_id)))
        assert torch.equal(pos[:, tt == COMP], pos[:, tt == CLEAN])  # the clean positions, reused
        # every response token is a loss target exactly once, at the copy where it is masked
        loss = both["loss_positions"][(both["loss_positions"] // L1) == row] % L1
        assert loss.numel() == clean.numel()
        assert torch.equal(ids[loss] == mask_id, torch.ones(loss.numel(), dtype=torch.bool))
    n_plain = (plain["loss_positions"] // L0).bincount(minlength=3)
    assert (both["loss_positions"] // L1).bincount(minlength=3).sum() > n_plain.sum()
    torch.testing.assert_close(both["loss_normalizer"], 2 * plain["loss_normalizer"])
    # first copy's weights unchanged, the complement's at level 1 - t: 1 / (1 - t)
    levels = both["noise_levels"]
    assert levels.numel() == 2 * plain["noise_levels"].numel()


def test_complementary_needs_mask_noise_and_the_consistent_mask(tiny_processor):
    with pytest.raises(ValueError, match="complementary=True needs noise_mode='mask'"):
        BardVLCollator(processor=tiny_processor, block_size=B, complementary=True, noise_mode="mix")
    with pytest.raises(ValueError, match="legacy_clean_sees_noisy"):
        BardVLCollator(processor=tiny_processor, block_size=B, complementary=True, legacy_clean_sees_noisy=True)


def test_no_label_leak_from_either_copy(tiny_model, batches):
    """A loss position of one copy gets no gradient from the other copy, nor from clean tokens of its own or
    later blocks."""
    _, batch = batches
    L = batch["input_ids"].shape[1]
    row = 0
    tt, bid = batch["token_type"][row], batch["block_ids"][row]
    pos = batch["loss_positions"]
    for own, other in ((NOISY, COMP), (COMP, NOISY)):
        pick_all = torch.nonzero(((pos // L) == row) & (tt[pos % L] == own)).reshape(-1)
        blocks = bid[pos[pick_all] % L]
        later = pick_all[blocks > blocks.min()]
        pick = (later if later.numel() else pick_all)[:1]
        q = int(pos[pick]) % L
        target_block = int(bid[q])
        captured = {}

        def hook(module, inputs, output):
            leaf = output.detach().requires_grad_(True)
            captured["emb"] = leaf
            return leaf

        only = dict(batch)
        for key in ("loss_positions", "loss_targets", "loss_weights", "loss_sample_index"):
            only[key] = batch[key][pick]
        handle = tiny_model.model.language_model.embed_tokens.register_forward_hook(hook)
        try:
            loss, _ = diffusion_training_loss(tiny_model, only)
            loss.backward()
        finally:
            handle.remove()
        grad = captured["emb"].grad[row].norm(dim=-1)
        tiny_model.zero_grad(set_to_none=True)
        assert (grad[tt == other] == 0).all(), f"copy {own} sees copy {other}"
        assert (grad[(tt == CLEAN) & (bid >= target_block)] == 0).all()
        assert (grad[(tt == own) & (bid != target_block)] == 0).all()
        assert grad[q] > 0
        if target_block > int(bid[tt == own].min()):
            assert (grad[(tt == CLEAN) & (bid < target_block)] > 0).all()


@pytest.fixture()
def fresh_compiler():
    """Forget compiled FlexAttention kernels before and after: a second compile with other shapes switches
    torch's inductor to dynamic shapes, whose CPU flex kernel does not compile in torch 2.14.1."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_dense_and_flex_agree_with_two_copies(tiny_model, tiny_model_dir, tiny_processor, records, fresh_compiler):
    packed = BardVLCollator(processor=tiny_processor, block_size=B, pack=True, max_length=384,
                            complementary=True)(records)
    flex = BardVLForConditionalGeneration.from_pretrained(
        tiny_model_dir, dtype=torch.float32, attn_implementation="flex_attention").eval()
    assert isinstance(build_training_mask(flex, packed), torch.nn.attention.flex_attention.BlockMask)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dense_loss, _ = diffusion_training_loss(tiny_model, packed)
        flex_loss, _ = diffusion_training_loss(flex, packed)
    torch.testing.assert_close(flex_loss, dense_loss, rtol=1e-4, atol=1e-4)
