"""A few seconds of block-diffusion training, to make tiny models worth decoding from.

Decoder tests and benchmarks need a model whose confidences *mean* something: one that has learnt
a handful of prompt -> response pairs, emits EOS where the response ends, and is confident about
some positions and unsure about others. Random weights give near-uniform confidences (every rule
degenerates to "commit k per step") and never stop. :func:`train_toy` fine-tunes a tiny Bard-VL on
a few :class:`ToyExample` rows with the block-diffusion objective (docs/training_layout.md: ``[prompt | clean |
noisy]`` rows, the consistent visibility rule of :mod:`nemo_automodel_bard.diffusion.masks`, the noisy
copy reusing the clean copy's positions, unshifted targets at MASK positions).

This is a fixture, not the training recipe: plain mean cross-entropy (no 1/t weight), one sample
(several noise draws) per step, MASK noise only.

Example:
    >>> from nemo_automodel_bard.decoding.toy import make_example, train_toy  # doctest: +SKIP
    >>> ex = make_example(processor, "Say hello.", "hello world")             # doctest: +SKIP
    >>> losses = train_toy(model, [ex], steps=40)                             # doctest: +SKIP
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from nemo_automodel_bard.diffusion.masks import TokenType, dense_attention_mask


@dataclass
class ToyExample:
    """One training pair: a processor output for a single, unpadded prompt and the response ids."""

    inputs: dict[str, torch.Tensor]
    response: torch.Tensor  # [R] int64, usually ending with EOS
    text: str = ""  # the chat-formatted prompt (to re-batch several examples with the processor)
    images: list[Any] | None = None


def make_example(
    processor: Any,
    prompt: str,
    response: str,
    *,
    image: Any = None,
    add_eos: bool = True,
) -> ToyExample:
    """Build a :class:`ToyExample` from text (and an optional PIL image) with the chat template."""
    content: list[dict[str, Any]] = []
    if image is not None:
        content.append({"type": "image"})
    content.append({"type": "text", "text": prompt})
    text = processor.apply_chat_template(
        [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
    )
    kwargs: dict[str, Any] = {"text": [text], "return_tensors": "pt"}
    if image is not None:
        kwargs["images"] = [image]
    inputs = dict(processor(**kwargs))
    ids = processor.tokenizer(response, add_special_tokens=False)["input_ids"]
    if add_eos:
        ids = ids + [processor.tokenizer.eos_token_id]
    return ToyExample(
        inputs=inputs,
        response=torch.tensor(ids, dtype=torch.long),
        text=text,
        images=[image] if image is not None else None,
    )


def batch_examples(processor: Any, examples: Sequence[ToyExample]) -> dict[str, torch.Tensor]:
    """One padded processor batch of several examples' prompts (the tokenizer's padding side)."""
    images = [im for ex in examples for im in (ex.images or [])]
    kwargs: dict[str, Any] = {"text": [ex.text for ex in examples], "padding": True, "return_tensors": "pt"}
    if images:
        kwargs["images"] = images
    return dict(processor(**kwargs))


def _row(
    model: Any,
    ex: ToyExample,
    block: int,
    copies: int,
    window: int | None,
    generator: torch.Generator,
) -> dict[str, Any]:
    """Inputs, mask, positions and targets of ``copies`` noise draws of one example."""
    cfg = model.config
    pad_id = cfg.block_pad_token_id
    mask_id = cfg.mask_token_id
    prompt = ex.inputs["input_ids"][0]
    P = prompt.numel()
    resp = ex.response
    R = math.ceil(resp.numel() / block) * block
    resp = torch.cat([resp, resp.new_full((R - resp.numel(),), pad_id)])
    n_blocks = R // block
    first, last = 0, n_blocks
    if window is not None and n_blocks > window:
        first = int(torch.randint(n_blocks - window + 1, (1,), generator=generator))
        last = first + window
    clean = resp[: last * block]
    noisy_span = slice(first * block, last * block)
    n_clean, n_noisy = clean.numel(), last * block - first * block

    prompt_blocks = torch.arange(P) // block
    base = math.ceil(P / block)
    token_type = torch.cat(
        [
            torch.full((P,), int(TokenType.PROMPT)),
            torch.full((n_clean,), int(TokenType.CLEAN)),
            torch.full((n_noisy,), int(TokenType.NOISY)),
        ]
    )
    block_ids = torch.cat(
        [prompt_blocks, base + torch.arange(n_clean) // block, base + torch.arange(noisy_span.start, noisy_span.stop) // block]
    )
    mask = dense_attention_mask(token_type, block_ids, torch.zeros_like(token_type), dtype=model.dtype)

    prompt_pos = model.position_ids_for(
        ex.inputs["input_ids"],
        mm_token_type_ids=ex.inputs.get("mm_token_type_ids"),
        image_grid_thw=ex.inputs.get("image_grid_thw"),
        video_grid_thw=ex.inputs.get("video_grid_thw"),
    )  # [3, 1, P]
    start = int(prompt_pos.max()) + 1
    resp_pos = start + torch.arange(R)
    pos = torch.cat([prompt_pos[:, 0], resp_pos[:n_clean].expand(3, -1), resp_pos[noisy_span].expand(3, -1)], dim=1)

    target = resp[noisy_span]
    level = 0.05 + 0.95 * torch.rand(copies, n_noisy // block, generator=generator)
    corrupt = torch.rand(copies, n_noisy, generator=generator) < level.repeat_interleave(block, dim=1)
    forced = torch.randint(n_noisy, (copies,), generator=generator)
    corrupt[torch.arange(copies), forced] = True
    noisy = torch.where(corrupt, torch.full_like(target, mask_id), target.expand(copies, -1))
    ids = torch.cat([prompt.expand(copies, -1), clean.expand(copies, -1), noisy], dim=1)
    L = ids.shape[1]
    flat = (torch.arange(copies)[:, None] * L + (P + n_clean) + torch.arange(n_noisy)).masked_select(corrupt)
    out: dict[str, Any] = {
        "input_ids": ids,
        "attention_mask": mask.expand(copies, -1, -1, -1),
        "position_ids": pos[:, None].expand(3, copies, L),
        "logits_positions": flat,
        "labels": target.expand(copies, -1).masked_select(corrupt),
    }
    mm = ex.inputs.get("mm_token_type_ids")
    if mm is not None:
        out["mm_token_type_ids"] = torch.cat([mm[0], mm.new_zeros(L - P)]).expand(copies, -1)
    for key, grid_key in (("pixel_values", "image_grid_thw"), ("pixel_values_videos", "video_grid_thw")):
        if ex.inputs.get(key) is not None:
            out[key] = ex.inputs[key].repeat(copies, 1)
            out[grid_key] = ex.inputs[grid_key].repeat(copies, 1)
    return out


def train_toy(
    model: Any,
    examples: Sequence[ToyExample],
    *,
    block_sizes: Sequence[int] = (2, 4, 8),
    steps: int = 60,
    copies: int = 4,
    lr: float = 3e-3,
    warmup: int = 10,
    window: int | None = None,
    seed: int = 0,
    final_lr_ratio: float = 0.1,
) -> list[float]:
    """Fine-tune ``model`` in place on ``examples`` with the block-diffusion loss; return the losses.

    Each step takes the next example (round robin), a block size drawn from ``block_sizes`` and
    ``copies`` independent MASK-noise draws (per block level ``t ~ U(0.05, 1)``); AdamW with a
    linear warm-up and a cosine decay to ``final_lr_ratio * lr`` (1.0: constant). ``window`` limits
    the noisy copy to that many consecutive blocks (random start) to keep long responses cheap.
    Leaves the model in eval mode.
    """
    if not examples:
        raise ValueError("train_toy needs at least one example")
    generator = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    def factor(s: int) -> float:  # linear warm-up, then cosine down to final_lr_ratio
        if s < warmup:
            return (s + 1) / warmup
        progress = (s - warmup) / max(steps - warmup, 1)
        return final_lr_ratio + (1.0 - final_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    sched = torch.optim.lr_scheduler.LambdaLR(optim, factor)
    model.train()
    losses = []
    for step in range(steps):
        ex = examples[step % len(examples)]
        block = int(block_sizes[int(torch.randint(len(block_sizes), (1,), generator=generator))])
        row = _row(model, ex, block, copies, window, generator)
        labels = row.pop("labels")
        logits = model(**row).logits
        loss = F.cross_entropy(logits.float(), labels)
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optim.step()
        sched.step()
        losses.append(float(loss.detach()))
    model.eval()
    return losses


__all__ = ["ToyExample", "batch_examples", "make_example", "train_toy"]
