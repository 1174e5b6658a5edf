"""BardVLCollator and ChatDataset: row layout, noise, truncation, packing, bad samples, datasets."""

from __future__ import annotations

import doctest
import io
import json

import pytest
import torch
from PIL import Image

from nemo_automodel_bard.data import chat_dataset
from nemo_automodel_bard.data.chat_dataset import ChatDataset, ShapesChatDataset, shapes_dataset
from nemo_automodel_bard.data.collator import BardVLCollator
from nemo_automodel_bard.data.rope import qwen3_vl_rope_index
from nemo_automodel_bard.data.shapes import ShapesTask, write_jsonl
from nemo_automodel_bard.diffusion import TokenType, sample_layout, visibility

B = 4


@pytest.fixture(scope="module")
def collator(tiny_processor):
    return BardVLCollator(processor=tiny_processor, block_size=B)


@pytest.fixture(scope="module")
def records():
    ds = shapes_dataset("train", size=3, seed=0)
    return [ds[i] for i in range(3)]


def _text_record(question: str, answer: str, index: int | None = None, system: str | None = None) -> dict:
    messages = [{"role": "system", "content": system}] if system else []
    messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    rec = {"messages": messages}
    if index is not None:
        rec["index"] = index
    return rec


def _segments(batch, row: int, doc: int = 0):
    """Index tensors of the prompt / clean / noisy parts of one sample in a row."""
    tt, docs = batch["token_type"][row], batch["doc_ids"][row]
    mine = docs == doc
    part = lambda t: torch.nonzero(mine & (tt == int(t))).reshape(-1)  # noqa: E731
    return part(TokenType.PROMPT), part(TokenType.CLEAN), part(TokenType.NOISY)


def test_row_layout(collator, records, tiny_processor, tiny_model):
    tok = tiny_processor.tokenizer
    mask_id, im_end = tok.mask_token_id, tok.convert_tokens_to_ids("<|im_end|>")
    image_pad = tok.convert_tokens_to_ids("<|image_pad|>")
    gen_prompt = tok("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    batch = collator(records)
    b, L = batch["input_ids"].shape
    assert b == 3 and batch["num_samples"] == 3 and batch["num_skipped"] == 0
    assert batch["position_ids"].shape == (3, b, L)
    for key in ("token_type", "block_ids", "doc_ids", "mm_token_type_ids"):
        assert batch[key].shape == (b, L)
    assert batch["image_grid_thw"].shape == (3, 3) and batch["pixel_values"].shape[0] == 3 * 36
    flat = batch["input_ids"].reshape(-1)
    loss_pos = batch["loss_positions"]
    assert torch.equal(flat[loss_pos], torch.full_like(loss_pos, mask_id))  # mask mode: corrupted = MASK
    assert torch.equal(batch["token_type"].reshape(-1)[loss_pos], torch.full_like(loss_pos, int(TokenType.NOISY)))
    for row in range(b):
        ids, pos = batch["input_ids"][row], batch["position_ids"][:, row]
        prompt, clean, noisy = _segments(batch, row)
        P, R = len(prompt), len(clean)
        assert R == len(noisy) and R % B == 0 and R == int(batch["loss_normalizer"][row])
        assert ids[prompt][-len(gen_prompt):].tolist() == gen_prompt
        answer = records[row]["messages"][1]["content"][0]["text"]
        clean_ids = ids[clean]
        eos_at = clean_ids.tolist().index(im_end)
        assert tok.decode(clean_ids[:eos_at]) == answer
        assert (clean_ids[eos_at:] == im_end).all() and R - eos_at - 1 < B  # padded with <|im_end|>
        # images once, in the prompt; mm types exactly at the placeholders (also 0 in the noisy copy)
        assert int((ids == image_pad).sum()) == 9 and bool((ids[prompt] == image_pad).sum() == 9)
        assert torch.equal(batch["mm_token_type_ids"][row], (ids == image_pad).long())
        # noisy copy: same positions as clean; equal to clean where not corrupted
        assert torch.equal(pos[:, noisy], pos[:, clean])
        row_loss = loss_pos[(loss_pos // L) == row] % L
        corrupted = torch.zeros(L, dtype=torch.bool)
        corrupted[row_loss] = True
        assert corrupted[noisy].any() and not corrupted[prompt].any() and not corrupted[clean].any()
        assert torch.equal(ids[noisy][~corrupted[noisy]], clean_ids[~corrupted[noisy]])
        sel = (loss_pos // L) == row
        assert torch.equal(batch["loss_targets"][sel], clean_ids[row_loss - P - R])
        # layout and positions agree with the diffusion core and with the model's rope index
        tt, bid = sample_layout(P, R, B)
        assert torch.equal(batch["token_type"][row, : P + 2 * R], tt) and torch.equal(batch["block_ids"][row, : P + 2 * R], bid)
        n = P + R
        expected = tiny_model.position_ids_for(
            ids[None, :n],
            mm_token_type_ids=batch["mm_token_type_ids"][row : row + 1, :n],
            image_grid_thw=batch["image_grid_thw"][row : row + 1],
        )
        assert torch.equal(pos[:, :n], expected[:, 0])
        # weights: 1/t of the block (linear schedule), halved at block padding beyond the real <|im_end|>
        levels = batch["noise_levels"][batch["noise_levels_sample_index"] == row]
        offs = row_loss - P - R
        want = 1.0 / levels[offs // B]
        want = torch.where(offs > eos_at, want * 0.5, want)
        torch.testing.assert_close(batch["loss_weights"][sel], want)
    assert 0 < float(batch["mask_fraction"]) <= 1
    assert torch.equal(batch["sample_indices"], torch.tensor([0, 1, 2]))


def test_rows_are_right_padded(collator):
    batch = collator([_text_record("a", "b c d e f g h i j k l m n", 0), _text_record("hi", "ok", 1)])
    row = 1
    pad = batch["token_type"][row] == int(TokenType.PAD)
    assert pad.any() and pad[pad.nonzero().min() :].all()
    assert (batch["input_ids"][row][pad] == collator.pad_token_id).all()
    assert (batch["doc_ids"][row][pad] == -1).all() and (batch["position_ids"][:, row][:, pad] == 0).all()
    assert "pixel_values" not in batch


def test_video_and_mixed_batch(tiny_processor):
    collator = BardVLCollator(processor=tiny_processor, block_size=B)
    frames = [Image.new("RGB", (64, 64), (60 * i, 0, 0)) for i in range(4)]
    video = {"messages": [{"role": "user", "content": [{"type": "video", "video": frames}, {"type": "text", "text": "what"}]},
                          {"role": "assistant", "content": "red"}], "index": 0}  # fmt: skip
    image = shapes_dataset("heldout", 1)[0]
    batch = collator([video, _text_record("q", "a", 2), image])
    assert batch["video_grid_thw"].tolist() == [[2, 4, 4]] and batch["image_grid_thw"].shape == (1, 3)
    assert batch["pixel_values_videos"].shape[0] == 32
    video_pad = tiny_processor.tokenizer.convert_tokens_to_ids("<|video_pad|>")
    assert torch.equal(batch["mm_token_type_ids"][0] == 2, batch["input_ids"][0] == video_pad)
    assert (batch["mm_token_type_ids"][1] == 0).all()


def test_bad_samples_are_skipped_and_counted(tiny_processor, tmp_path, caplog):
    collator = BardVLCollator(processor=tiny_processor, block_size=B, max_length=40, image_root=str(tmp_path))
    good = _text_record("q", "a b", 0)
    bad = [
        {"messages": [{"role": "user", "content": "hi"}], "index": 1},
        _text_record("q", "   ", 2),
        {"messages": [{"role": "user", "content": [{"type": "image", "image": "missing.png"}]},
                      {"role": "assistant", "content": "x"}], "index": 3},  # fmt: skip
        {"messages": [{"role": "user", "content": [{"type": "image", "image": b"not an image"}]},
                      {"role": "assistant", "content": "x"}], "index": 4},  # fmt: skip
        _text_record("literal <|image_pad|> without an image", "x", 5),
        _text_record("a long question " * 20, "x", 6),
        {"messages": [{"role": "robot", "content": "x"}], "index": 7},
    ]
    with caplog.at_level("WARNING"):
        batch = collator([good, *bad])
    assert batch["num_samples"] == 1 and batch["num_skipped"] == 7
    reasons = dict(batch["skipped"])
    assert reasons[1] == "no assistant turn"
    assert "empty response" in reasons[2]
    assert "image file not found" in reasons[3] and "missing.png" in reasons[3]
    assert "unreadable inline image" in reasons[4]
    assert "placeholder/feature mismatch" in reasons[5]
    assert "too long" in reasons[6]
    assert "role 'robot'" in reasons[7]
    assert "skipping sample 3" in caplog.text
    strict = BardVLCollator(processor=tiny_processor, block_size=B, strict=True, image_root=str(tmp_path))
    with pytest.raises(ValueError, match=r"sample 3: image file not found"):
        strict([good, bad[2]])


def test_truncation_keeps_whole_blocks_and_the_prompt(tiny_processor, records):
    full = BardVLCollator(processor=tiny_processor, block_size=B)(records[:1])
    prompt, clean, _ = _segments(full, 0)
    P, R = len(prompt), len(clean)
    max_length = P + 2 * (R - B) - 3  # room for R/B - 2 whole blocks
    cut = BardVLCollator(processor=tiny_processor, block_size=B, max_length=max_length)(records[:1])
    c_prompt, c_clean, c_noisy = _segments(cut, 0)
    assert cut["num_truncated"] == 1 and cut["input_ids"].shape[1] <= max_length
    assert len(c_prompt) == P and torch.equal(cut["input_ids"][0, :P], full["input_ids"][0, :P])
    assert len(c_clean) == len(c_noisy) == R - 2 * B
    assert torch.equal(cut["input_ids"][0, c_clean], full["input_ids"][0, clean[: R - 2 * B]])
    # a prompt that cannot fit with one block is skipped
    tight = BardVLCollator(processor=tiny_processor, block_size=B, max_length=P + 2 * B - 1)(records[:1])
    assert tight["num_samples"] == 0 and "too long" in tight["skipped"][0][1]


def test_noise_is_deterministic_per_seed_epoch_index(tiny_processor, records):
    collator = BardVLCollator(processor=tiny_processor, block_size=B, noise_mode="mix")

    def noisy_of(batch, index):
        row = batch["sample_indices"].tolist().index(index)
        _, _, noisy = _segments(batch, row)
        return batch["input_ids"][row, noisy]

    alone = noisy_of(collator([records[1]]), 1)
    mixed = noisy_of(collator([records[2], records[1], records[0]]), 1)
    assert torch.equal(alone, mixed)
    collator.set_epoch(1)
    assert not torch.equal(noisy_of(collator([records[1]]), 1), alone)
    collator.set_epoch(0)
    other_seed = BardVLCollator(processor=tiny_processor, block_size=B, noise_mode="mix", seed=1)
    assert not torch.equal(noisy_of(other_seed([records[1]]), 1), alone)


def test_uniform_noise_draws_ordinary_tokens(tiny_processor, records):
    collator = BardVLCollator(processor=tiny_processor, block_size=B, noise_mode="uniform")
    batch = collator(records)
    drawn = batch["input_ids"].reshape(-1)[batch["loss_positions"]]
    assert int(drawn.max()) < collator._first_special_id()


def test_packing_never_crosses_samples(tiny_processor, records):
    texts = [_text_record("q one", "alpha beta gamma", 10), _text_record("question two", "delta", 11)]
    samples = [records[0], texts[0], records[1], texts[1]]
    collator = BardVLCollator(processor=tiny_processor, block_size=B, pack=True, max_length=160)
    batch = collator(samples)
    b, L = batch["input_ids"].shape
    assert batch["num_samples"] == 4 and b < 4 and L <= 160
    assert (batch["doc_ids"].max(dim=1).values >= 1).any()  # some row holds two samples
    vis = visibility(batch["token_type"], batch["block_ids"], batch["doc_ids"])
    docs = batch["doc_ids"]
    cross = docs[:, :, None] != docs[:, None, :]
    assert not (vis & cross).any()
    for row in range(b):
        for doc in docs[row].unique().tolist():
            if doc < 0:
                continue
            prompt, clean, noisy = _segments(batch, row, doc)
            assert int(batch["block_ids"][row, prompt[0]]) == 0  # own block numbering
            assert torch.equal(batch["position_ids"][:, row, noisy], batch["position_ids"][:, row, clean])
    # the image grids follow the samples' row-major order
    order = batch["sample_indices"].tolist()
    image_samples = [i for i in order if i in (0, 1)]
    single = BardVLCollator(processor=tiny_processor, block_size=B)([records[i] for i in image_samples])
    assert torch.equal(batch["pixel_values"], single["pixel_values"])


def test_train_all_turns(tiny_processor):
    rec = {
        "messages": [
            {"role": "user", "content": "first question"},
            {"role": "assistant", "content": "first answer"},
            {"role": "user", "content": "second question"},
            {"role": "assistant", "content": "second answer"},
        ],
        "index": 4,
    }
    tok = tiny_processor.tokenizer
    last = BardVLCollator(processor=tiny_processor, block_size=B)([rec])
    both = BardVLCollator(processor=tiny_processor, block_size=B, train_all_turns=True)([rec])
    assert last["num_samples"] == 1 and both["num_samples"] == 2
    p0, c0, _ = _segments(both, 0)
    p1, c1, _ = _segments(both, 1)
    assert "first answer" in tok.decode(both["input_ids"][0, c0]) and "first answer" not in tok.decode(both["input_ids"][0, p0])
    assert "first answer" in tok.decode(both["input_ids"][1, p1]) and "second answer" in tok.decode(both["input_ids"][1, c1])


def test_rope_index_helper_matches_processor_layout(collator, records):
    batch = collator(records[:1])
    prompt, clean, _ = _segments(batch, 0)
    n = len(prompt) + len(clean)
    pos = qwen3_vl_rope_index(batch["input_ids"][:, :n], batch["mm_token_type_ids"][:, :n], batch["image_grid_thw"])
    assert torch.equal(pos, batch["position_ids"][:, :, :n])


def test_collator_from_processor_path(tiny_model_dir):
    collator = BardVLCollator(processor_path=str(tiny_model_dir), block_size=8, noise_mode="mix")
    assert collator.mask_token_id == collator.tokenizer.mask_token_id
    assert collator.pad_block_token_id == collator.tokenizer.convert_tokens_to_ids("<|im_end|>")
    batch = collator([_text_record("q", "a b c", 0)])
    assert batch["num_samples"] == 1 and int(batch["loss_normalizer"][0]) % 8 == 0


# ------------------------------------------------------------------------------------------ datasets


def test_jsonl_dataset_broken_line_relative_paths_missing_image(tmp_path, tiny_processor):
    path = write_jsonl(ShapesTask(seed=0), "train", 3, tmp_path)
    lines = path.read_text().splitlines()
    (tmp_path / "images" / "train_000002.png").unlink()  # record 2 loses its image
    lines.insert(1, '{"messages": [broken json')
    path.write_text("\n".join(lines) + "\n\n")
    ds = ChatDataset(path)
    assert len(ds) == 4 and ds.image_root == str(tmp_path)
    first = ds[0]
    assert first["index"] == 0
    assert first["messages"][0]["content"][0]["image"] == str(tmp_path / "images" / "train_000000.png")
    broken = ds[1]
    assert broken["messages"] is None and "line 2" in broken["error"] and ds.num_invalid == 1
    collator = BardVLCollator(processor=tiny_processor, block_size=B)
    batch = collator([ds[i] for i in range(len(ds))])
    assert batch["num_samples"] == 2 and batch["num_skipped"] == 2
    reasons = dict(batch["skipped"])
    assert "line 2" in reasons[1] and "invalid JSON" in reasons[1]
    assert "image file not found" in reasons[3] and "train_000002.png" in reasons[3]
    with pytest.raises(ValueError, match="line 2"):
        ChatDataset(path, strict=True)[1]
    # image_root given explicitly: paths resolve against it
    moved = ChatDataset(path, image_root="/elsewhere")
    assert moved[0]["messages"][0]["content"][0]["image"] == "/elsewhere/images/train_000000.png"


def test_saved_hf_dataset(tmp_path, tiny_processor):
    import datasets

    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 10, 10)).save(buf, format="PNG")
    (tmp_path / "img.png").write_bytes(buf.getvalue())
    rows = [
        {"messages": [{"role": "user", "content": [{"type": "image", "image": "img.png", "text": None},
                                                   {"type": "text", "image": None, "text": "color?"}]},
                      {"role": "assistant", "content": [{"type": "text", "image": None, "text": "red"}]}]},
    ]  # fmt: skip
    datasets.Dataset.from_list(rows * 2).save_to_disk(str(tmp_path / "ds"))
    ds = ChatDataset(tmp_path / "ds", image_root=str(tmp_path))
    assert len(ds) == 2 and ds[1]["index"] == 1
    batch = BardVLCollator(processor=tiny_processor, block_size=B)([ds[0], ds[1]])
    assert batch["num_samples"] == 2 and batch["image_grid_thw"].shape == (2, 3)


def test_shapes_chat_dataset_and_doctests():
    ds = ShapesChatDataset(split="heldout", size=2, seed=0)
    rec = ds[-1]
    assert rec["index"] == 1 and rec["messages"][1]["role"] == "assistant"
    assert json.dumps(rec["messages"][1])  # text-only answer turn is JSON-serialisable
    result = doctest.testmod(chat_dataset, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0



def test_block_padding_flag_marks_targets_after_the_response(tiny_processor, records):
    batch = BardVLCollator(processor=tiny_processor, block_size=16, seed=1)(records)
    im_end = tiny_processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    is_pad = batch["loss_is_block_pad"]
    assert is_pad.dtype == torch.bool and is_pad.shape == batch["loss_targets"].shape
    assert is_pad.any() and (~is_pad).any()
    L = batch["input_ids"].shape[1]
    for row in range(batch["input_ids"].shape[0]):  # one sample per row (no packing)
        own = batch["loss_sample_index"] == row
        tt = batch["token_type"][row]
        response = batch["input_ids"][row][tt == int(TokenType.CLEAN)]
        true_len = int((response == im_end).nonzero()[0]) + 1  # up to the response's own <|im_end|>
        offsets = batch["loss_positions"][own] - row * L - int((tt == int(TokenType.NOISY)).nonzero()[0])
        assert torch.equal(is_pad[own], offsets >= true_len)
        assert (batch["loss_targets"][own][is_pad[own]] == im_end).all()


def test_max_loss_weight_caps_the_elbo_weight_and_nothing_else(tiny_processor, records):
    """Same noise and targets; weights equal min(1/t, cap) (x pad_weight at block padding)."""
    base = BardVLCollator(processor=tiny_processor, block_size=2, seed=3)(records)
    capped = BardVLCollator(processor=tiny_processor, block_size=2, seed=3, max_loss_weight=1.5)(records)
    for key in ("input_ids", "loss_positions", "loss_targets", "noise_levels"):
        assert torch.equal(base[key], capped[key]), key
    pad = base["loss_is_block_pad"]
    unpadded = torch.where(pad, base["loss_weights"] / 0.5, base["loss_weights"])
    want = torch.where(pad, unpadded.clamp(max=1.5) * 0.5, unpadded.clamp(max=1.5))
    torch.testing.assert_close(capped["loss_weights"], want)
    assert bool((unpadded > 1.5).any())  # the cap did something on these records
    with pytest.raises(ValueError, match="max_loss_weight"):
        BardVLCollator(processor=tiny_processor, block_size=2, max_loss_weight=0)


def test_shapes_dataset_offset_reads_fresh_samples_and_seeds_noise_by_task_index():
    """offset k: record i is task sample k + i (the same image and answer), and its index (which seeds
    the noise) is k + i; disjoint offsets share nothing."""
    plain = ShapesChatDataset(split="train", size=8, seed=0)
    assert len(ShapesChatDataset(split="train", size=4, offset=10**9)) == 4
    shifted = ShapesChatDataset(split="train", size=4, seed=0, offset=4)
    for i in range(4):
        a, b = plain[4 + i], shifted[i]
        assert b["index"] == 4 + i
        assert a["messages"][1] == b["messages"][1]
        assert a["messages"][0]["content"][0]["image"].tobytes() == b["messages"][0]["content"][0]["image"].tobytes()
    far = ShapesChatDataset(split="train", size=4, seed=0, offset=10**12)
    assert [json.dumps(far[i]["messages"][1]) for i in range(4)] != [json.dumps(plain[i]["messages"][1]) for i in range(4)]
    with pytest.raises(IndexError):
        shifted[4]
    with pytest.raises(ValueError, match="offset"):
        ShapesChatDataset(split="train", size=4, offset=-1)


def test_level_range_bounds_the_masked_share_of_every_block(tiny_processor):
    from nemo_automodel_bard.data.census import census_dataset

    ds = census_dataset("train", size=8, seed=0)
    collator = BardVLCollator(processor=tiny_processor, block_size=16, level_range=[0.1, 0.5])
    batch = collator([ds[i] for i in range(8)])
    mask_id = collator.mask_token_id
    shares = []
    for row in range(8):
        _, _, noisy = _segments(batch, row)
        ids = batch["input_ids"][row, noisy].reshape(-1, 16)
        shares += ((ids == mask_id).float().mean(dim=1)).tolist()
    # each token is masked with its block's level (drawn in [0.1, 0.5], mean 0.3): the shares scatter around it
    assert 0.2 < sum(shares) / len(shares) < 0.4 and min(shares) > 0.0
    with pytest.raises(ValueError, match="complementary=True cannot be combined with level_range"):
        BardVLCollator(processor=tiny_processor, block_size=4, level_range=[0.1, 0.5], complementary=True)
