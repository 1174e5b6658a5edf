"""reblock: a row's block ids for another block size equal a fresh layout at that size."""

from __future__ import annotations

import random

import torch

from nemo_automodel_bard.diffusion import TokenType, pack_layouts, reblock, sample_layout


def test_reblock_single_sample_matches_sample_layout():
    for prompt_len, response_len in [(3, 4), (5, 8), (8, 16), (1, 32), (17, 32)]:
        token_type, _ = sample_layout(prompt_len, response_len, 32 if response_len == 32 else response_len)
        for block in (1, 2, 4):
            if response_len % block:
                continue
            expected_type, expected = sample_layout(prompt_len, response_len, block)
            assert torch.equal(token_type, expected_type)
            assert torch.equal(reblock(token_type, torch.zeros_like(token_type), block), expected)


def test_reblock_packed_rows_with_padding():
    rng = random.Random(0)
    for _ in range(50):
        student, teacher = rng.choice([(4, 2), (8, 4), (16, 4), (32, 4), (8, 8)])
        layouts_s, layouts_t = [], []
        for _ in range(rng.randint(1, 4)):
            p, r = rng.randint(1, 20), student * rng.randint(1, 3)
            layouts_s.append(sample_layout(p, r, student))
            layouts_t.append(sample_layout(p, r, teacher))
        total = sum(t.numel() for t, _ in layouts_s) + rng.randint(0, 5)
        token_type, _, doc_ids = pack_layouts(layouts_s, total)
        _, expected, _ = pack_layouts(layouts_t, total)
        got = reblock(token_type[None], doc_ids[None], teacher)[0]
        real = token_type != int(TokenType.PAD)
        assert torch.equal(got[real], expected[real])
