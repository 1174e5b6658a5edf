"""The decoder's attention masks are the training visibility rule: every mask the decoder builds (prefill, fused
prefill, denoising step, fused commit step, separate commit) equals :func:`visibility` evaluated on the training
row it stands for, on the dense and the FlexAttention path, with left padding and partial prompt blocks."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from nemo_automodel_bard.decoding.engine import _MaskBuilder
from nemo_automodel_bard.diffusion.masks import (
    PAD_DOC_ID,
    TokenType,
    prompt_block_ids,
    response_block_ids,
    sample_layout,
    visibility,
)

B = 4
PROMPT = 7
REAL = torch.tensor([5, 7, 4])  # real prompt tokens per row (left padding before them)
BLOCKS = 3  # response capacity in blocks


def _valid() -> torch.Tensor:
    return torch.arange(PROMPT)[None, :] >= (PROMPT - REAL)[:, None]


def _training_row(clean_blocks: int, noisy: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``[prompt (left-padded) | clean blocks 0..clean_blocks-1 | noisy block clean_blocks]`` of each row."""
    valid = _valid()
    batch = valid.shape[0]
    n_clean, n_noisy = clean_blocks * B, B if noisy else 0
    token_type = torch.cat([torch.where(valid, int(TokenType.PROMPT), int(TokenType.PAD)),
                            torch.full((batch, n_clean), int(TokenType.CLEAN)),
                            torch.full((batch, n_noisy), int(TokenType.NOISY))], dim=1)
    offsets = torch.arange(n_clean + n_noisy)[None].expand(batch, -1)
    block_ids = torch.cat([prompt_block_ids(valid, B), response_block_ids(REAL[:, None], offsets, B)], dim=1)
    doc_ids = torch.cat([torch.where(valid, 0, PAD_DOC_ID), torch.zeros(batch, n_clean + n_noisy, dtype=torch.int64)],
                        dim=1)
    return token_type, block_ids, doc_ids


SLACK = 5  # a static cache's buffer is longer than the row (its length is rounded up to a bucket)


def _builder(flex: bool | str) -> _MaskBuilder:
    """``flex``: True (FlexAttention), False (dense) or ``"static"`` (dense over a static cache's whole buffer)."""
    static = flex == "static"
    flex = flex is True
    key_valid = torch.cat([_valid(), torch.ones(len(REAL), BLOCKS * B + (SLACK if static else 0), dtype=torch.bool)],
                          dim=1)
    builder = _MaskBuilder(SimpleNamespace(uses_flex_attention=flex), key_valid, torch.float32, static=static)
    if flex:
        builder._flex = lambda visible: visible  # the boolean matrix the BlockMask is made from
    return builder


def _seen(mask: torch.Tensor, kv: int | None = None) -> torch.Tensor:
    """Boolean ``[batch, q, kv]`` of an additive ``[batch, 1, q, kv]`` mask or a boolean one. With ``kv`` (a static
    mask over a longer buffer) the columns past ``kv`` must all be hidden, and the first ``kv`` are returned."""
    seen = mask if mask.dtype == torch.bool else (mask[:, 0] == 0)
    if kv is not None:
        assert not seen[..., kv:].any(), "a static mask shows a key past the row's end"
        seen = seen[..., :kv]
    return seen


def test_layout_helpers_are_the_sample_layout_rule():
    for prompt_len in range(0, 11):
        token_type, block_ids = sample_layout(prompt_len, 2 * B, B)
        assert torch.equal(block_ids[:prompt_len], prompt_block_ids(torch.ones(prompt_len, dtype=torch.bool), B))
        response = response_block_ids(prompt_len, torch.arange(2 * B), B)
        assert torch.equal(block_ids[prompt_len:], torch.cat([response, response]))
    # left padding gets block 0 and does not shift the real tokens' blocks
    assert prompt_block_ids(torch.tensor([False, False, True, True, True]), 2).tolist() == [0, 0, 0, 0, 1]


@pytest.mark.parametrize("flex", [False, True, "static"])
def test_prefill_and_fused_prefill_are_the_training_rule(flex):
    builder, valid = _builder(flex), _valid()
    static = flex == "static"
    real = valid[:, :, None]  # padding queries' outputs are never used
    expected = visibility(*_training_row(0, False))
    prefill = _seen(builder.prefill(valid, prompt_block_ids(valid, B)), PROMPT if static else None)
    assert torch.equal(prefill[real.expand(-1, -1, PROMPT)], expected[real.expand(-1, -1, PROMPT)])
    fused = _seen(builder.prefill(valid, prompt_block_ids(valid, B), B), PROMPT + B if static else None)
    expected = visibility(*_training_row(0, True))
    rows = torch.cat([valid, torch.ones(len(REAL), B, dtype=torch.bool)], dim=1)[:, :, None].expand_as(expected)
    assert torch.equal(fused[rows], expected[rows])


@pytest.mark.parametrize("flex", [False, True, "static"])
@pytest.mark.parametrize("kind,k", [(kind, k) for kind in ("step", "fused", "commit") for k in range(BLOCKS)
                                    if not (kind == "fused" and k + 1 >= BLOCKS)])  # the last block has no next one
def test_denoising_and_commit_masks_are_the_training_rule(flex, k, kind):
    """Block ``k`` denoised (``step``: its queries over cache + itself), committed together with block ``k+1``'s
    first step (``fused``: clean block ``k`` and noisy block ``k+1``), or committed alone (``commit``)."""
    builder = _builder(flex)
    if kind == "step":  # cache: prompt + blocks < k; queries: noisy block k
        mask, row, queries = builder.step(PROMPT + k * B, 0, B), _training_row(k, True), slice(PROMPT + k * B, None)
    elif kind == "fused":  # cache: prompt + blocks < k; queries: clean block k, noisy block k + 1
        mask, row, queries = builder.step(PROMPT + k * B, B, B), _training_row(k + 1, True), slice(PROMPT + k * B, None)
    else:  # cache: prompt + blocks < k; queries: clean block k
        mask, row, queries = builder.step(PROMPT + k * B, B, 0), _training_row(k + 1, False), slice(PROMPT + k * B, None)
    expected = visibility(*row)[:, queries, :]
    seen = _seen(mask, expected.shape[-1] if flex == "static" else None)
    assert seen.shape == expected.shape
    assert torch.equal(seen, expected)


def test_server_cohort_masks_are_the_training_rule():
    """A server cohort holds requests with different prompt lengths at different blocks in one left-padded cache;
    the masks of its block run (fused commit of each member's pending block + its next noisy block, then the
    steady steps) are the training rule on each member's own row."""
    from nemo_automodel_bard.decoding.engine import DecodingOptions
    from nemo_automodel_bard.serving.batching import _Cohort, _Member

    model = SimpleNamespace(parameters=lambda: iter([torch.zeros(1)]), uses_flex_attention=False)
    opts = DecodingOptions(max_new_tokens=64, block_size=B, denoising_steps=B, temperature=0.0, top_k=0, top_p=1.0,
                           remasking_strategy="low_confidence_dynamic", confidence_threshold=0.9, mask_token_id=9,
                           eos_token_ids=(1,), pad_token_id=1)
    cohort = _Cohort(model, opts, None)
    prompts, done = [5, 7, 3], [1, 3, 2]  # each member's prompt length and blocks decoded (the last one pending)
    cached = [p + (d - 1) * B for p, d in zip(prompts, done)]  # its pending block is not in the cache yet
    width = max(cached)
    cohort.key_valid = torch.arange(width)[None, :] >= (width - torch.tensor(cached))[:, None]
    cohort.members = [_Member(request=None, start=p, num_blocks=8, prefill_forwards=0, blocks_done=d,
                              pending=torch.full((B,), 3)) for p, d in zip(prompts, done)]
    cohort.start_block()

    def row(i: int, clean_blocks: int) -> tuple[torch.Tensor, ...]:
        """Member ``i``'s training row ``[left pad | prompt | clean blocks | noisy block]``."""
        pad, prompt = width - cached[i], prompts[i]
        width_clean = clean_blocks * B
        token_type = torch.tensor([int(TokenType.PAD)] * pad + [int(TokenType.PROMPT)] * prompt
                                  + [int(TokenType.CLEAN)] * width_clean + [int(TokenType.NOISY)] * B)
        valid = torch.tensor([False] * pad + [True] * prompt)
        block_ids = torch.cat([prompt_block_ids(valid, B),
                               response_block_ids(prompt, torch.arange(width_clean + B), B)])
        doc_ids = torch.cat([torch.where(valid, 0, PAD_DOC_ID), torch.zeros(width_clean + B, dtype=torch.int64)])
        return token_type, block_ids, doc_ids

    first, steady = cohort.run.inputs["attention_mask"], cohort.run.steady["attention_mask"]
    for i in range(len(prompts)):
        fused = visibility(*row(i, done[i]))[0, -2 * B:, :]  # queries: pending clean block, noisy block
        assert torch.equal(_seen(first)[i], fused)
        later = visibility(*row(i, done[i]))[0, -B:, :]  # queries: the noisy block over the cache with the pending one
        assert torch.equal(_seen(steady)[i], later)
    # positions: the pending block right after the earlier blocks, the noisy block after it
    positions = cohort.run.inputs["position_ids"][0]
    for i, (p, d) in enumerate(zip(prompts, done)):
        assert positions[i].tolist() == list(range(p + (d - 1) * B, p + (d + 1) * B))
