"""diffusion_training_loss on a tiny Bard-VL: no label leak, dense == flex, logits only at loss positions."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from nemo_automodel_bard import BardVLForConditionalGeneration
from nemo_automodel_bard.data.chat_dataset import shapes_dataset
from nemo_automodel_bard.data.collator import BardVLCollator
from nemo_automodel_bard.diffusion import TokenType, dense_attention_mask
from nemo_automodel_bard.objectives.block_diffusion import build_training_mask, diffusion_training_loss

B = 4
_PIXELS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "mm_token_type_ids")


@pytest.fixture(scope="module")
def records():
    ds = shapes_dataset("train", size=2, seed=0)
    text = {"messages": [{"role": "user", "content": "say something"},
                         {"role": "assistant", "content": "red circle 1 1, blue cross 2 2."}], "index": 7}  # fmt: skip
    return [ds[0], text, ds[1]]


@pytest.fixture(scope="module")
def batch(tiny_processor, records):
    return BardVLCollator(processor=tiny_processor, block_size=B)(records)


def _only(batch: dict, keep: torch.Tensor) -> dict:
    """The batch with its loss restricted to the loss entries selected by ``keep``."""
    out = dict(batch)
    for key in ("loss_positions", "loss_targets", "loss_weights", "loss_sample_index"):
        out[key] = batch[key][keep]
    return out


@pytest.mark.parametrize("legacy", [False, True])
def test_no_label_leak_through_the_dense_mask(tiny_model, batch, legacy):
    L = batch["input_ids"].shape[1]
    row = 0
    tt, bid = batch["token_type"][row], batch["block_ids"][row]
    noisy_blocks = bid[tt == int(TokenType.NOISY)].unique()
    pos = batch["loss_positions"]
    in_row = (pos // L) == row
    block_of = bid[pos % L]
    # a loss position in a response block that has earlier response blocks
    target_block = next(int(b) for b in noisy_blocks[1:] if bool((in_row & (block_of == b)).any()))
    pick = torch.nonzero(in_row & (block_of == target_block)).reshape(-1)[:1]
    q = int(pos[pick]) % L

    captured = {}

    def hook(module, inputs, output):
        leaf = output.detach().requires_grad_(True)
        captured["emb"] = leaf
        return leaf

    handle = tiny_model.model.language_model.embed_tokens.register_forward_hook(hook)
    try:
        loss, _ = diffusion_training_loss(tiny_model, _only(batch, pick), legacy_clean_sees_noisy=legacy)
        loss.backward()
    finally:
        handle.remove()
    grad = captured["emb"].grad[row].norm(dim=-1)  # [L]
    clean, noisy = tt == int(TokenType.CLEAN), tt == int(TokenType.NOISY)
    prompt = tt == int(TokenType.PROMPT)
    image = batch["mm_token_type_ids"][row] > 0  # overwritten by vision features after the embedding
    assert (grad[clean & (bid >= target_block)] == 0).all(), "clean tokens of the own / later blocks leak"
    assert (grad[noisy & (bid > target_block)] == 0).all()
    earlier_noisy = grad[noisy & (bid < target_block)]
    # legacy: earlier clean keys saw their own (noisier) noisy copies -- no label leak, but a dependence
    assert (earlier_noisy > 0).any() if legacy else (earlier_noisy == 0).all()
    assert (grad[batch["token_type"][row] == int(TokenType.PAD)] == 0).all()
    assert (grad[clean & (bid < target_block)] > 0).all()
    assert (grad[prompt & ~image] > 0).all()
    assert grad[q] > 0
    # other rows of the batch are untouched
    assert (captured["emb"].grad[1:] == 0).all()


def test_logits_only_at_loss_positions(tiny_model, batch):
    rows = []
    handle = tiny_model.lm_head.register_forward_hook(lambda m, i, o: rows.append(i[0].shape))
    try:
        loss, metrics = diffusion_training_loss(tiny_model, batch)
    finally:
        handle.remove()
    M = batch["loss_positions"].numel()
    assert rows == [torch.Size([M, tiny_model.config.text_config.hidden_size])]
    assert metrics["num_loss_tokens"] == M and metrics["num_samples"] == 3
    loss.backward()
    assert torch.isfinite(tiny_model.lm_head.weight.grad).all()


def test_loss_matches_full_logits_reference(tiny_model, batch):
    with torch.no_grad():
        loss, metrics = diffusion_training_loss(tiny_model, batch)
        mask = dense_attention_mask(batch["token_type"], batch["block_ids"], batch["doc_ids"])
        extra = {k: batch[k] for k in _PIXELS if k in batch}
        logits = tiny_model(
            input_ids=batch["input_ids"], attention_mask=mask, position_ids=batch["position_ids"], **extra
        ).logits  # [b, L, V]
    flat = logits.reshape(-1, logits.shape[-1]).float()
    per_sample = []
    for s in range(batch["num_samples"]):
        sel = batch["loss_sample_index"] == s
        ce = F.cross_entropy(flat[batch["loss_positions"][sel]], batch["loss_targets"][sel], reduction="none")
        per_sample.append((batch["loss_weights"][sel] * ce).sum() / batch["loss_normalizer"][s])
    reference = torch.stack(per_sample).mean()
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-5)
    plain = F.cross_entropy(flat[batch["loss_positions"]], batch["loss_targets"])
    torch.testing.assert_close(metrics["ce"], plain, rtol=1e-5, atol=1e-5)


def test_dense_and_flex_agree(tiny_model, tiny_model_dir, tiny_processor, records):
    packed = BardVLCollator(processor=tiny_processor, block_size=B, pack=True, max_length=256)(records)
    dense = tiny_model
    flex = BardVLForConditionalGeneration.from_pretrained(
        tiny_model_dir, dtype=torch.float32, attn_implementation="flex_attention"
    ).eval()
    assert isinstance(build_training_mask(flex, packed), torch.nn.attention.flex_attention.BlockMask)
    outputs = {}
    for name, model in (("dense", dense), ("flex", flex)):
        captured = []
        handle = model.lm_head.register_forward_hook(lambda m, i, o: captured.append(o))
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loss, _ = diffusion_training_loss(model, packed)
        handle.remove()
        outputs[name] = (loss, captured[0])
    torch.testing.assert_close(outputs["flex"][1], outputs["dense"][1], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(outputs["flex"][0], outputs["dense"][0], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="attention='flex' needs"):
        diffusion_training_loss(dense, packed, attention="flex")
    with pytest.raises(ValueError, match="attention='dense' was requested"):
        diffusion_training_loss(flex, packed, attention="dense")


def test_packed_and_unpacked_losses_are_equal(tiny_model, tiny_processor, records, batch):
    packed = BardVLCollator(processor=tiny_processor, block_size=B, pack=True, max_length=256)(records)
    assert packed["input_ids"].shape[0] < batch["input_ids"].shape[0]
    with torch.no_grad():
        a, _ = diffusion_training_loss(tiny_model, batch)
        b, _ = diffusion_training_loss(tiny_model, packed)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_empty_batch_gives_a_zero_loss(tiny_model, tiny_processor):
    empty = BardVLCollator(processor=tiny_processor, block_size=B)([{"messages": [{"role": "user", "content": "x"}]}])
    assert empty["num_samples"] == 0 and empty["num_skipped"] == 1
    loss, metrics = diffusion_training_loss(tiny_model, empty)
    loss.backward()
    assert float(loss.detach()) == 0.0 and metrics["num_samples"] == 0


def test_reduce_token_losses_matches_diffusion_ce_loss():
    from nemo_automodel_bard.diffusion import diffusion_ce_loss, reduce_token_losses

    g = torch.Generator().manual_seed(0)
    logits, targets = torch.randn(9, 17, generator=g), torch.randint(0, 17, (9,), generator=g)
    weights, owner, norm = torch.rand(9, generator=g) + 0.5, torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2]), torch.tensor([4.0, 8.0, 4.0])
    per_token = diffusion_ce_loss(logits, targets, weights, None, None, reduction="none")
    for reduction in ("sample_mean", "token_mean", "sum"):
        torch.testing.assert_close(
            reduce_token_losses(per_token, reduction, owner, norm),
            diffusion_ce_loss(logits, targets, weights, owner, norm, reduction=reduction),
        )


@pytest.mark.parametrize("block_size", [2, 4])
def test_training_view_equals_the_decoding_forward(tiny_model, tiny_processor, block_size):
    """What training teaches is what decoding asks: a noisy block's logits in the training row equal
    the logits ``generate`` computes for that block (prompt prefill, the earlier blocks committed, the
    block all MASK), for every block of the answer. A wrong position, block id or visibility breaks it."""
    from nemo_automodel_bard.decoding.engine import _BlockDecoder, _model_inputs, resolve_options
    from nemo_automodel_bard.pipeline.evaluate import _encode, records_from_chat

    sample = shapes_dataset("heldout", size=1, seed=0)[0]
    batch = BardVLCollator(processor=tiny_processor, block_size=block_size)([sample])
    tt, ids = batch["token_type"][0], batch["input_ids"][0].clone()
    noisy = torch.nonzero(tt == int(TokenType.NOISY)).reshape(-1)
    gold = ids[tt == int(TokenType.CLEAN)]
    mask_id = tiny_model.config.mask_token_id
    ids[noisy] = mask_id  # every block all MASK: each sees the clean earlier blocks, as in decoding
    with torch.no_grad():
        train_logits = tiny_model(
            input_ids=ids[None],
            attention_mask=build_training_mask(tiny_model, batch),
            position_ids=batch["position_ids"],
            logits_positions=noisy,
            use_cache=False,
            **{k: batch[k] for k in _PIXELS if batch.get(k) is not None},
        ).logits.view(-1, block_size, tiny_model.config.text_config.vocab_size)

    inputs = _encode(tiny_processor, records_from_chat([sample]))
    # the decoder's pieces driven by hand: its separate prefill fills the cache, each block reads it
    opts = resolve_options(tiny_model, None, block_size=block_size, max_new_tokens=gold.numel(), fused_prefill=False)
    num_blocks = gold.numel() // block_size
    assert num_blocks >= 3
    cpu = torch.device("cpu")
    dec = _BlockDecoder(tiny_model, _model_inputs(inputs, {}, cpu), opts, cpu, torch.float32, None)
    with torch.no_grad():
        dec.prefill()
        for k in range(num_blocks):
            positions = dec.positions(k)
            shifted = False
            for pos in (positions, positions + 1):  # the real positions, then one off (must differ)
                logits = tiny_model(
                    input_ids=dec.mask_block,
                    attention_mask=dec.masks.step(dec.cached, 0, block_size),
                    position_ids=pos[None].expand(3, 1, block_size),
                    past_key_values=dec.cache,
                    use_cache=True,
                    logits_positions=dec.noisy_rows[0],
                ).logits
                dec.cache.crop(dec.cached)
                if not shifted:
                    torch.testing.assert_close(logits, train_logits[k], rtol=1e-4, atol=1e-4)
                else:
                    assert (logits - train_logits[k]).abs().max() > 1e-3
                shifted = True
            dec.commit(gold[k * block_size : (k + 1) * block_size][None], positions)
