"""Training-row layout and the block-diffusion attention visibility rule.

A training sample is laid out as ``[prompt | clean response | noisy response]``, or with complementary
masking as ``[prompt | clean | noisy | complement noisy]`` (a second corrupted copy whose corrupted
positions are exactly the ones the first copy kept, so every response token is a target once).
Every token carries three integers:

* ``token_type`` -- a :class:`TokenType` (prompt / clean / noisy / complement / row padding);
* ``block_ids`` -- its diffusion block (prompt position ``p -> p // B``; response offset ``r`` of
  any copy ``-> ceil(P / B) + r // B``);
* ``doc_ids`` -- which packed sample of the row it belongs to (row padding: :data:`PAD_DOC_ID`).

The block arithmetic is :func:`prompt_block_ids` and :func:`response_block_ids`, a sample's layout
:func:`sample_layout`, a packed row :func:`pack_layouts` (the collator's rows); the decoder builds its
prefill mask with :func:`visibility` and its per-step masks are checked against it on every layout it builds
(``tests/test_decoder_masks.py``).

:func:`mask_mod_fn` is the *only* place where the visibility rule is written down. The dense
additive mask (:func:`dense_attention_mask`, CPU / SDPA reference path), the boolean matrix
(:func:`visibility`) and the FlexAttention ``BlockMask`` (:func:`flex_block_mask`) are all obtained
by evaluating that one closure, so they cannot drift apart.

This module depends on torch and the standard library only.
"""

from __future__ import annotations

import enum
from typing import Callable, Optional, Sequence, Union

import torch

__all__ = [
    "NOISY_TYPES",
    "TokenType",
    "PAD_DOC_ID",
    "prompt_block_ids",
    "response_block_ids",
    "sample_layout",
    "pack_layouts",
    "reblock",
    "mask_mod_fn",
    "visibility",
    "dense_attention_mask",
    "flex_block_mask",
]

#: document id of row padding (and of a decoder's left padding): seen by no other token
PAD_DOC_ID = -1

MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class TokenType(enum.IntEnum):
    """Role of a token in a training row."""

    PROMPT = 0
    CLEAN = 1
    NOISY = 2
    PAD = 3
    #: the second noisy copy of complementary masking: it sees what a NOISY token sees, and its own copy
    NOISY_COMPLEMENT = 4


#: the token types that are corrupted response copies (queries that predict their clean tokens)
NOISY_TYPES = (TokenType.NOISY, TokenType.NOISY_COMPLEMENT)


def prompt_block_ids(valid: torch.Tensor, block_size: int) -> torch.Tensor:
    """Block ids of prompt tokens: ``p // B`` for the token at position ``p`` among its row's real tokens.

    ``valid``: bool ``[..., P]`` (False: padding, e.g. a decoder's left padding, which gets block 0). The one
    place the prompt's block arithmetic is written; the training layout, the teacher's re-blocking and the
    decoder all use it (or :func:`response_block_ids`).
    """
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    return (valid.long().cumsum(-1) - 1).clamp_min(0) // block_size


def response_block_ids(prompt_len: Union[torch.Tensor, int], offsets: torch.Tensor, block_size: int) -> torch.Tensor:
    """Block ids of response tokens at ``offsets`` (of any copy) after a prompt of ``prompt_len`` tokens:
    ``ceil(P / B) + r // B`` -- the response starts a new block after the (possibly partial) last prompt block."""
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    return (prompt_len + block_size - 1) // block_size + offsets // block_size


def sample_layout(
    prompt_len: int, response_len: int, block_size: int, complementary: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Layout of one sample ``[prompt (P) | clean response (R) | noisy response (R)]`` (with
    ``complementary``: ``[... | complement noisy (R)]`` appended, of type ``NOISY_COMPLEMENT``).

    ``response_len`` must already be a multiple of ``block_size`` (the response is right-padded with
    the block-padding token beforehand).

    Returns:
        ``(token_type, block_ids)``, both int64 of shape ``[P + 2R]`` (``[P + 3R]``). Prompt position ``p``
        gets block ``p // B`` (the last prompt block may be partial); response offset ``r`` (of any copy)
        gets block ``ceil(P / B) + r // B``.
    """
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    if prompt_len < 0 or response_len < 0:
        raise ValueError(f"lengths must be >= 0, got prompt_len={prompt_len}, response_len={response_len}")
    if response_len % block_size != 0:
        raise ValueError(
            f"response_len ({response_len}) must be a multiple of block_size ({block_size}); "
            "pad the response with the block-padding token first"
        )
    prompt_blocks = prompt_block_ids(torch.ones(prompt_len, dtype=torch.bool), block_size)
    response_blocks = response_block_ids(prompt_len, torch.arange(response_len, dtype=torch.int64), block_size)
    copies = [TokenType.CLEAN, TokenType.NOISY] + ([TokenType.NOISY_COMPLEMENT] if complementary else [])
    block_ids = torch.cat([prompt_blocks] + [response_blocks] * len(copies))
    token_type = torch.cat(
        [torch.full((prompt_len,), int(TokenType.PROMPT), dtype=torch.int64)]
        + [torch.full((response_len,), int(kind), dtype=torch.int64) for kind in copies]
    )
    return token_type, block_ids


def reblock(token_type: torch.Tensor, doc_ids: torch.Tensor, block_size: int) -> torch.Tensor:
    """Block ids of the same rows for another block size (e.g. a small-block teacher's view).

    Recovers each token's prompt index / response offset within its document from ``token_type``
    and ``doc_ids`` (``[batch, L]`` or ``[L]``; documents are contiguous runs laid out as
    ``[prompt | clean | noisy (| complement)]``), then applies :func:`sample_layout`'s rule with ``block_size``.
    Padding tokens get block 0.
    """
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    squeeze = token_type.ndim == 1
    token_type, doc_ids = (token_type[None], doc_ids[None]) if squeeze else (token_type, doc_ids)
    length = token_type.shape[-1]
    new_run = torch.ones_like(token_type, dtype=torch.bool)
    new_run[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    index = torch.arange(length, device=token_type.device).expand_as(token_type)
    run_start = torch.cummax(torch.where(new_run, index, torch.zeros_like(index)), dim=-1).values

    def offset_in_run(kind: TokenType) -> torch.Tensor:
        is_kind = (token_type == int(kind)).long()
        before = is_kind.cumsum(-1) - is_kind  # count strictly before each token
        return before - before.gather(-1, run_start)

    prompt_offset = offset_in_run(TokenType.PROMPT)
    is_prompt = token_type == int(TokenType.PROMPT)
    # every prompt token of a document precedes its response, so for a response token the
    # document's prompt length is the number of prompt tokens seen since the run started
    prompt_len = prompt_offset + is_prompt.long()
    out = torch.where(is_prompt, prompt_offset // block_size, torch.zeros_like(token_type))
    for kind in (TokenType.CLEAN, *NOISY_TYPES):
        is_kind = token_type == int(kind)
        out = torch.where(is_kind, response_block_ids(prompt_len, offset_in_run(kind), block_size), out)
    return out[0] if squeeze else out


def pack_layouts(
    layouts: Sequence[tuple[torch.Tensor, torch.Tensor]],
    total_len: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Concatenate per-sample layouts into one packed row.

    Args:
        layouts: ``(token_type [L_i], block_ids [L_i])`` per sample, e.g. from :func:`sample_layout`.
            Each sample keeps its own block numbering.
        total_len: row length; the tail is filled with ``TokenType.PAD`` (block id 0, doc id
            :data:`PAD_DOC_ID`). ``None`` means no padding.

    Returns:
        ``(token_type, block_ids, doc_ids)``, int64 ``[total_len]``; sample ``i`` gets doc id ``i``.
    """
    types, blocks, docs = [], [], []
    for i, (tt, bid) in enumerate(layouts):
        tt = torch.as_tensor(tt, dtype=torch.int64).reshape(-1)
        bid = torch.as_tensor(bid, dtype=torch.int64).reshape(-1)
        if tt.shape != bid.shape:
            raise ValueError(f"layout {i}: token_type {tuple(tt.shape)} and block_ids {tuple(bid.shape)} differ")
        types.append(tt)
        blocks.append(bid)
        docs.append(torch.full_like(tt, i))
    used = sum(int(t.numel()) for t in types)
    if total_len is None:
        total_len = used
    if total_len < used:
        raise ValueError(f"packed samples need {used} positions but total_len is {total_len}")
    pad = total_len - used
    types.append(torch.full((pad,), int(TokenType.PAD), dtype=torch.int64))
    blocks.append(torch.zeros(pad, dtype=torch.int64))
    docs.append(torch.full((pad,), PAD_DOC_ID, dtype=torch.int64))
    return torch.cat(types), torch.cat(blocks), torch.cat(docs)


def _as_batched(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """Make every per-token tensor int64 ``[batch, L]`` (a 1-D ``[L]`` input becomes batch 1)."""
    out = []
    for x in tensors:
        x = torch.as_tensor(x)
        if x.dim() == 1:
            x = x.unsqueeze(0)
        if x.dim() != 2:
            raise ValueError(f"expected per-token tensors of shape [batch, L] or [L], got {tuple(x.shape)}")
        out.append(x.to(torch.int64))
    if any(x.shape != out[0].shape for x in out):
        raise ValueError(f"token_type/block_ids/doc_ids shapes differ: {[tuple(x.shape) for x in out]}")
    return out


def mask_mod_fn(
    token_type: torch.Tensor,
    block_ids: torch.Tensor,
    doc_ids: torch.Tensor,
    legacy_clean_sees_noisy: bool = False,
) -> MaskMod:
    """Return the FlexAttention ``mask_mod(b, h, q_idx, kv_idx) -> bool`` of the visibility rule.

    The closure indexes the per-token tensors (``[batch, L]`` int; ``[L]`` is taken as batch 1) and
    works both on scalar indices (FlexAttention, under ``vmap``) and on broadcastable index grids.
    Query ``q`` sees key ``k`` iff they share a doc id and

    * ``q`` PROMPT/CLEAN: ``k`` PROMPT/CLEAN with ``block(k) <= block(q)``;
    * ``q`` NOISY (or NOISY_COMPLEMENT): ``k`` PROMPT (any block), CLEAN with ``block(k) < block(q)``, or
      a token of the query's own copy (same type) with ``block(k) == block(q)`` -- the two noisy copies of
      complementary masking never see each other;
    * ``legacy_clean_sees_noisy``: additionally ``q`` CLEAN sees NOISY ``k`` with ``block(k) <= block(q)``
      (the published training mask);
    * PAD keys are seen by nobody, except that a PAD query sees itself (no all-masked rows).
    """
    tt, bid, doc = _as_batched(token_type, block_ids, doc_ids)
    prompt, clean, noisy, pad = (int(TokenType.PROMPT), int(TokenType.CLEAN), int(TokenType.NOISY), int(TokenType.PAD))
    complement = int(TokenType.NOISY_COMPLEMENT)
    legacy = bool(legacy_clean_sees_noisy)

    def mask_mod(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        q_type, k_type = tt[b, q_idx], tt[b, kv_idx]
        q_block, k_block = bid[b, q_idx], bid[b, kv_idx]
        same_doc = doc[b, q_idx] == doc[b, kv_idx]

        q_context = (q_type == prompt) | (q_type == clean)
        k_context = (k_type == prompt) | (k_type == clean)
        context_rule = q_context & k_context & (k_block <= q_block)

        noisy_rule = ((q_type == noisy) | (q_type == complement)) & (
            (k_type == prompt)
            | ((k_type == clean) & (k_block < q_block))
            | ((k_type == q_type) & (k_block == q_block))
        )
        allowed = context_rule | noisy_rule
        if legacy:
            allowed = allowed | ((q_type == clean) & (k_type == noisy) & (k_block <= q_block))

        pad_self = (q_type == pad) & (q_idx == kv_idx)
        return (same_doc & allowed) | pad_self

    return mask_mod


def visibility(
    token_type: torch.Tensor,
    block_ids: torch.Tensor,
    doc_ids: torch.Tensor,
    *,
    legacy_clean_sees_noisy: bool = False,
) -> torch.Tensor:
    """Boolean visibility ``[batch, L, L]`` (``[b, q, k]`` True = q may attend to k).

    Computed by evaluating :func:`mask_mod_fn` on broadcast index grids (no Python loop over ``L``).
    """
    tt, bid, doc = _as_batched(token_type, block_ids, doc_ids)
    mask_mod = mask_mod_fn(tt, bid, doc, legacy_clean_sees_noisy)
    batch, length = tt.shape
    device = tt.device
    b = torch.arange(batch, device=device).view(batch, 1, 1)
    q = torch.arange(length, device=device).view(1, length, 1)
    k = torch.arange(length, device=device).view(1, 1, length)
    h = torch.zeros((), dtype=torch.int64, device=device)
    out = mask_mod(b, h, q, k)
    return out.expand(batch, length, length)


def dense_attention_mask(
    token_type: torch.Tensor,
    block_ids: torch.Tensor,
    doc_ids: torch.Tensor,
    *,
    legacy_clean_sees_noisy: bool = False,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Additive attention mask ``[batch, 1, L, L]`` for SDPA / eager attention.

    ``0.0`` where visible, ``torch.finfo(dtype).min`` where not. Derived from :func:`visibility`.
    """
    vis = visibility(token_type, block_ids, doc_ids, legacy_clean_sees_noisy=legacy_clean_sees_noisy)
    mask = torch.zeros(vis.shape, dtype=dtype, device=vis.device)
    mask.masked_fill_(~vis, torch.finfo(dtype).min)
    return mask.unsqueeze(1)


def flex_block_mask(
    token_type: torch.Tensor,
    block_ids: torch.Tensor,
    doc_ids: torch.Tensor,
    *,
    legacy_clean_sees_noisy: bool = False,
    num_heads: Optional[int] = None,
    device: Optional[Union[str, torch.device]] = None,
    tile_size: int = 128,
):
    """Block-sparse FlexAttention ``BlockMask`` of shape ``[batch, num_heads or 1, L, L]``.

    Built with ``torch.nn.attention.flex_attention.create_block_mask`` from :func:`mask_mod_fn`
    (works with ``device="cpu"`` too). ``tile_size`` is FlexAttention's block-sparsity tile (its
    ``BLOCK_SIZE``), not the diffusion block size. ``L`` need not be a multiple of it: the per-token tensors
    are padded internally with PAD tokens so that indices of the last, partial tile stay in range; the mask is created with the true length and padded positions are visible to no
    real token, so results do not change.
    """
    from torch.nn.attention.flex_attention import create_block_mask

    tt, bid, doc = _as_batched(token_type, block_ids, doc_ids)
    device = torch.device(device) if device is not None else tt.device
    batch, length = tt.shape
    padded = -(-max(length, 1) // tile_size) * tile_size
    extra = padded - length
    if extra:
        tt = torch.cat([tt, tt.new_full((batch, extra), int(TokenType.PAD))], dim=1)
        bid = torch.cat([bid, bid.new_zeros((batch, extra))], dim=1)
        doc = torch.cat([doc, doc.new_full((batch, extra), PAD_DOC_ID)], dim=1)
    mask_mod = mask_mod_fn(tt.to(device), bid.to(device), doc.to(device), legacy_clean_sees_noisy)
    return create_block_mask(
        mask_mod,
        B=batch,
        H=num_heads,
        Q_LEN=length,
        KV_LEN=length,
        device=device,
        BLOCK_SIZE=tile_size,
    )
