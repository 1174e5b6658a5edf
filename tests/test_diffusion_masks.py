"""Tests for the block-diffusion layout and attention visibility rule (docs/training_layout.md)."""

from __future__ import annotations

import ast
import math
import pathlib
import random
import warnings

import pytest
import torch
import torch.nn.functional as F

from nemo_automodel_bard.diffusion import (
    PAD_DOC_ID,
    TokenType,
    dense_attention_mask,
    flex_block_mask,
    mask_mod_fn,
    pack_layouts,
    sample_layout,
    visibility,
)

P, C, N, PAD = (int(TokenType.PROMPT), int(TokenType.CLEAN), int(TokenType.NOISY), int(TokenType.PAD))

# The worked example of docs/training_layout.md: P=3, R=4, B=2. X = visible, o = visible only with the legacy flag.
WORKED_EXAMPLE = """
      P0 P1 P2 C0 C1 C2 C3 N0 N1 N2 N3
  P0   X  X  .  .  .  .  .  .  .  .  .
  P1   X  X  .  .  .  .  .  .  .  .  .
  P2   X  X  X  .  .  .  .  .  .  .  .
  C0   X  X  X  X  X  .  .  o  o  .  .
  C1   X  X  X  X  X  .  .  o  o  .  .
  C2   X  X  X  X  X  X  X  o  o  o  o
  C3   X  X  X  X  X  X  X  o  o  o  o
  N0   X  X  X  .  .  .  .  X  X  .  .
  N1   X  X  X  .  .  .  .  X  X  .  .
  N2   X  X  X  X  X  .  .  .  .  X  X
  N3   X  X  X  X  X  .  .  .  .  X  X
"""


def _parse_table(text: str) -> list[list[str]]:
    rows = [line.split() for line in text.strip().splitlines()]
    return [r[1:] for r in rows[1:]]


def _reference_visibility(tt, bid, doc, legacy=False):
    """Independent, loop-based statement of the rule for one row (lists of ints)."""
    L = len(tt)
    out = torch.zeros(L, L, dtype=torch.bool)
    for q in range(L):
        for k in range(L):
            if tt[q] == PAD:
                out[q, k] = q == k
                continue
            if tt[k] == PAD or doc[q] != doc[k]:
                continue
            qt, kt, qb, kb = tt[q], tt[k], bid[q], bid[k]
            if qt in (P, C):
                vis = kt in (P, C) and kb <= qb
                if legacy and qt == C and kt == N and kb <= qb:
                    vis = True
            else:  # noisy query
                vis = kt == P or (kt == C and kb < qb) or (kt == N and kb == qb)
            out[q, k] = vis
    return out


def _random_rows(rng: random.Random, batch: int, *, max_samples: int = 3, pad_max: int = 5):
    """A batch of packed rows with random P, R, B per sample, right-padded to a common length."""
    rows = []
    for _ in range(batch):
        layouts = []
        for _ in range(rng.randint(1, max_samples)):
            b = rng.choice([1, 2, 3, 4, 8])
            p = rng.randint(0, 13)
            r = b * rng.randint(0 if p else 1, 4)
            layouts.append(sample_layout(p, r, b))
        rows.append(layouts)
    lengths = [sum(t.numel() for t, _ in lay) for lay in rows]
    total = max(lengths) + rng.randint(0, pad_max)
    packed = [pack_layouts(lay, total) for lay in rows]
    return tuple(torch.stack(x) for x in zip(*packed))


# --------------------------------------------------------------------------------------- layout


def test_sample_layout_worked_example():
    tt, bid = sample_layout(3, 4, 2)
    assert tt.dtype == bid.dtype == torch.int64
    assert tt.tolist() == [P, P, P, C, C, C, C, N, N, N, N]
    assert bid.tolist() == [0, 0, 1, 2, 2, 3, 3, 2, 2, 3, 3]


def test_sample_layout_block_formula():
    for p, r, b in [(0, 4, 4), (5, 6, 3), (8, 8, 4), (1, 2, 2), (7, 0, 4)]:
        tt, bid = sample_layout(p, r, b)
        assert tt.numel() == p + 2 * r
        assert bid[:p].tolist() == [i // b for i in range(p)]
        resp = [math.ceil(p / b) + i // b for i in range(r)]
        assert bid[p : p + r].tolist() == resp
        assert bid[p + r :].tolist() == resp


def test_sample_layout_rejects_unpadded_response():
    with pytest.raises(ValueError, match="multiple of block_size"):
        sample_layout(3, 5, 2)
    with pytest.raises(ValueError):
        sample_layout(3, 4, 0)


def test_pack_layouts():
    a = sample_layout(3, 4, 2)
    b = sample_layout(2, 2, 2)
    tt, bid, doc = pack_layouts([a, b], 20)
    assert tt.shape == bid.shape == doc.shape == (20,)
    assert tt[:11].tolist() == a[0].tolist() and bid[:11].tolist() == a[1].tolist()
    assert tt[11:17].tolist() == b[0].tolist() and bid[11:17].tolist() == b[1].tolist()
    assert doc[:11].tolist() == [0] * 11 and doc[11:17].tolist() == [1] * 6
    assert tt[17:].tolist() == [PAD] * 3 and bid[17:].tolist() == [0] * 3
    assert doc[17:].tolist() == [PAD_DOC_ID] * 3
    tt2, _, _ = pack_layouts([a, b])
    assert tt2.numel() == 17
    with pytest.raises(ValueError):
        pack_layouts([a, b], 10)


# ------------------------------------------------------------------------------- worked example


@pytest.mark.parametrize("legacy", [False, True])
def test_worked_example_cell_by_cell(legacy):
    expected = _parse_table(WORKED_EXAMPLE)
    tt, bid, doc = pack_layouts([sample_layout(3, 4, 2)])
    vis = visibility(tt, bid, doc, legacy_clean_sees_noisy=legacy)
    assert vis.shape == (1, 11, 11)
    for q in range(11):
        for k in range(11):
            cell = expected[q][k]
            want = cell == "X" or (legacy and cell == "o")
            assert bool(vis[0, q, k]) == want, f"q={q} k={k} legacy={legacy}"


def test_worked_example_dense_values():
    tt, bid, doc = pack_layouts([sample_layout(3, 4, 2)])
    vis = visibility(tt, bid, doc)
    for dtype in (torch.float32, torch.bfloat16):
        dense = dense_attention_mask(tt, bid, doc, dtype=dtype)
        assert dense.shape == (1, 1, 11, 11) and dense.dtype == dtype
        assert torch.equal(dense[:, 0] == 0, vis)
        assert torch.all(dense[:, 0][~vis] == torch.finfo(dtype).min)


# ------------------------------------------------------------------------------ property tests


def test_random_rows_match_loop_reference():
    rng = random.Random(0)
    for legacy in (False, True):
        for _ in range(12):
            tt, bid, doc = _random_rows(rng, 3)
            vis = visibility(tt, bid, doc, legacy_clean_sees_noisy=legacy)
            for b in range(tt.shape[0]):
                ref = _reference_visibility(tt[b].tolist(), bid[b].tolist(), doc[b].tolist(), legacy)
                assert torch.equal(vis[b], ref)


def test_random_rows_properties():
    rng = random.Random(1)
    for _ in range(40):
        tt, bid, doc = _random_rows(rng, 4, max_samples=4)
        vis = visibility(tt, bid, doc)
        legacy = visibility(tt, bid, doc, legacy_clean_sees_noisy=True)
        qt, kt = tt[:, :, None], tt[:, None, :]
        qb, kb = bid[:, :, None], bid[:, None, :]
        same_doc = doc[:, :, None] == doc[:, None, :]
        eye = torch.eye(tt.shape[1], dtype=torch.bool)[None]

        # noisy queries never see clean keys of their own or a later block
        assert not (vis & (qt == N) & (kt == C) & (kb >= qb) & same_doc).any()
        # prompt / clean queries never see noisy keys (default rule)
        assert not (vis & ((qt == P) | (qt == C)) & (kt == N)).any()
        # no visibility across documents
        assert not (vis & ~same_doc).any()
        # padding keys: visible only to the padding query itself
        assert not (vis & (kt == PAD) & ~eye).any()
        # every query sees at least one key (no NaN rows in softmax)
        assert vis.any(dim=-1).all()
        # every non-pad query sees itself
        assert (vis.diagonal(dim1=1, dim2=2) | (tt == PAD)).all()
        # the legacy flag only adds clean -> noisy (same doc, block(k) <= block(q))
        assert not (vis & ~legacy).any()
        extra = legacy & ~vis
        assert torch.equal(extra, (qt == C) & (kt == N) & (kb <= qb) & same_doc)
        # dense mask is the same rule
        dense = dense_attention_mask(tt, bid, doc)
        assert torch.equal(dense[:, 0] == 0, vis)


def test_mask_mod_scalar_and_grid_agree():
    rng = random.Random(2)
    tt, bid, doc = _random_rows(rng, 2)
    mod = mask_mod_fn(tt, bid, doc)
    vis = visibility(tt, bid, doc)
    h = torch.tensor(0)
    for _ in range(200):
        b = rng.randrange(tt.shape[0])
        q, k = rng.randrange(tt.shape[1]), rng.randrange(tt.shape[1])
        assert bool(mod(torch.tensor(b), h, torch.tensor(q), torch.tensor(k))) == bool(vis[b, q, k])


def test_one_dimensional_inputs_are_batch_one():
    tt, bid, doc = pack_layouts([sample_layout(3, 4, 2)], 14)
    assert visibility(tt, bid, doc).shape == (1, 14, 14)
    assert dense_attention_mask(tt, bid, doc).shape == (1, 1, 14, 14)


# ---------------------------------------------------------------------------------- BlockMask


def _tile_any(vis: torch.Tensor, tile: int) -> torch.Tensor:
    b, L, _ = vis.shape
    n = -(-L // tile)
    padded = torch.zeros(b, n * tile, n * tile, dtype=torch.bool)
    padded[:, :L, :L] = vis
    return padded.view(b, n, tile, n, tile).any(dim=4).any(dim=2)


@pytest.mark.parametrize("tile", [16, 128])
def test_block_mask_sparsity_matches_dense(tile):
    rng = random.Random(3)
    for legacy in (False, True):
        tt, bid, doc = _random_rows(rng, 2, max_samples=4)
        vis = visibility(tt, bid, doc, legacy_clean_sees_noisy=legacy)
        bm = flex_block_mask(tt, bid, doc, legacy_clean_sees_noisy=legacy, device="cpu", tile_size=tile)
        L = tt.shape[1]
        assert tuple(bm.shape) == (2, 1, L, L)
        assert torch.equal(bm.to_dense()[:, 0].bool(), _tile_any(vis, tile))


def test_flex_attention_matches_sdpa_with_dense_mask():
    from torch.nn.attention.flex_attention import flex_attention

    rng = random.Random(4)
    gen = torch.Generator().manual_seed(0)
    warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
    for legacy, tile, heads in [(False, 16, None), (True, 16, 2), (False, 128, None), (False, 32, 2)]:
        tt, bid, doc = _random_rows(rng, 2, max_samples=4)
        L = tt.shape[1]
        q, k, v = (torch.randn(2, 2, L, 8, generator=gen) for _ in range(3))
        bm = flex_block_mask(
            tt, bid, doc, legacy_clean_sees_noisy=legacy, num_heads=heads, device="cpu", tile_size=tile
        )
        out_flex = flex_attention(q, k, v, block_mask=bm)
        dense = dense_attention_mask(tt, bid, doc, legacy_clean_sees_noisy=legacy)
        out_sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=dense)
        assert torch.isfinite(out_sdpa).all()
        torch.testing.assert_close(out_flex, out_sdpa, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------ import hygiene


def test_diffusion_package_imports_only_torch_and_stdlib():
    import sys

    pkg = pathlib.Path(__file__).resolve().parents[1] / "nemo_automodel_bard" / "diffusion"
    stdlib = set(sys.stdlib_module_names)
    for path in pkg.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative import inside the package
                    continue
                names = [node.module or ""]
            else:
                continue
            for name in names:
                root = name.split(".")[0]
                assert root == "torch" or root in stdlib, f"{path.name} imports {name}"
