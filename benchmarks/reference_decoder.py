"""A straightforward batch-1 implementation of the *published* Bard-VL decoding algorithm.

Written independently of :mod:`nemo_automodel_bard.decoding.engine` (it imports the model and the
token-proposal math of :mod:`nemo_automodel_bard.decoding.unmasking`, nothing else), as plainly
as possible, so that the engine can be checked against it and benchmarked against it:

1. prefill the prompt with the block-causal prompt mask (prompt position ``p`` in block ``p // B``);
2. for each block: ``B`` MASK tokens; up to ``denoising_steps`` forwards that *read* the cache
   (their K/V are dropped again); each step commits ``k`` tokens (an even split of the block over
   the steps) — ``low_confidence_static``: the ``k`` most confident masked positions;
   ``low_confidence_dynamic``: every masked position with confidence above the threshold, and
   at least the ``k`` most confident; committed tokens are final;
3. a **separate commit forward** writes the finished block's K/V into the cache;
4. stop after a block that contains EOS.

Conventions shared with the engine (so outputs can be compared token for token): MASK is never
proposed; ``denoising_steps > B`` is clamped to ``B``; ties in confidence go to the leftmost
position; the commit forward after the *last* block is skipped (nothing would read it — this only
makes the baseline cheaper); the output stops at the first EOS (inclusive).

Run ``python benchmarks/reference_decoder.py MODEL_DIR`` to decode one text prompt.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import torch

from nemo_automodel_bard.decoding.unmasking import propose_tokens

_SCORES = {"low_confidence_static": False, "low_confidence_dynamic": True}


def _even_split(block_size: int, steps: int) -> list[int]:
    steps = min(steps, block_size)
    counts = []
    for i in range(steps):
        counts.append(block_size // steps + (1 if i < block_size % steps else 0))
    return counts


def _additive(rows: int, cols: int, visible) -> torch.Tensor:  # noqa: ANN001 - a predicate
    hidden = torch.finfo(torch.float32).min
    rows_list = [[0.0 if visible(i, j) else hidden for j in range(cols)] for i in range(rows)]
    return torch.tensor(rows_list, dtype=torch.float32).view(1, 1, rows, cols)


@torch.no_grad()
def reference_generate(
    model: Any,
    inputs: Any,
    max_new_tokens: int,
    block_size: int,
    denoising_steps: int,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    remasking_strategy: str = "low_confidence_dynamic",
    confidence_threshold: float = 0.9,
    mask_token_id: int | None = None,
    eos_token_id: int | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Decode one prompt the published way. Returns ``(ids [1, n], stats)``."""
    from transformers import DynamicCache

    if remasking_strategy not in _SCORES:
        raise ValueError(f"the published algorithm has only {sorted(_SCORES)}, got {remasking_strategy!r}")
    dynamic = _SCORES[remasking_strategy]
    config = model.config
    mask_id = config.mask_token_id if mask_token_id is None else mask_token_id
    eos_id = config.eos_token_id if eos_token_id is None else eos_token_id
    B = block_size
    ids = inputs["input_ids"]
    if ids.shape[0] != 1:
        raise ValueError("the reference decoder handles one prompt at a time")
    if inputs.get("attention_mask") is not None and not bool(inputs["attention_mask"].all()):
        raise ValueError("the reference decoder takes an unpadded prompt")
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    P = ids.shape[1]
    started = time.perf_counter()
    forwards = {"prefill": 0, "denoise": 0, "commit": 0}

    # 1. prefill with the block-causal prompt mask
    positions = model.position_ids_for(
        ids,
        mm_token_type_ids=inputs.get("mm_token_type_ids"),
        image_grid_thw=inputs.get("image_grid_thw"),
        video_grid_thw=inputs.get("video_grid_thw"),
    )
    cache = DynamicCache(config=config.text_config)
    model(
        input_ids=ids.to(device),
        attention_mask=_additive(P, P, lambda i, j: j // B <= i // B).to(device, dtype),
        position_ids=positions.to(device),
        past_key_values=cache,
        use_cache=True,
        pixel_values=inputs.get("pixel_values"),
        pixel_values_videos=inputs.get("pixel_values_videos"),
        image_grid_thw=inputs.get("image_grid_thw"),
        video_grid_thw=inputs.get("video_grid_thw"),
        mm_token_type_ids=inputs.get("mm_token_type_ids"),
        logits_positions=torch.empty(0, dtype=torch.long, device=device),
    )
    forwards["prefill"] += 1
    next_position = int(positions.max()) + 1

    output: list[int] = []
    block_step_counts: list[int] = []
    num_blocks = -(-max_new_tokens // B)
    for b in range(num_blocks):
        x = [mask_id] * B
        pos = torch.arange(next_position + b * B, next_position + (b + 1) * B, device=device)
        pos = pos.view(1, 1, B).expand(3, 1, B)
        steps = 0
        for k in _even_split(B, denoising_steps):
            masked = [i for i in range(B) if x[i] == mask_id]
            if not masked:
                break
            # 2. a denoising forward that reads the cache: the block sees the cache and itself
            length = cache.get_seq_length()
            logits = model(
                input_ids=torch.tensor([x], device=device),
                attention_mask=torch.zeros(1, 1, B, length + B, device=device, dtype=dtype),
                position_ids=pos,
                past_key_values=cache,
                use_cache=True,
                logits_positions=torch.arange(B, device=device),
            ).logits
            cache.crop(-B)  # the published step does not keep the noisy block's K/V
            forwards["denoise"] += 1
            steps += 1
            tokens, confidence, _ = propose_tokens(
                logits[None], temperature=temperature, top_k=top_k, top_p=top_p,
                generator=generator, suppress_token_id=mask_id,
            )
            tokens, confidence = tokens[0].tolist(), confidence[0].tolist()
            ranked = sorted(masked, key=lambda i: -confidence[i])  # stable: leftmost first on ties
            chosen = set(ranked[:k])
            if dynamic:
                chosen |= {i for i in masked if confidence[i] > confidence_threshold}
            for i in chosen:
                x[i] = tokens[i]
        block_step_counts.append(steps)
        output.extend(x)
        if eos_id in x or b == num_blocks - 1:
            break
        # 3. the separate commit forward writes the finished block's K/V
        length = cache.get_seq_length()
        model(
            input_ids=torch.tensor([x], device=device),
            attention_mask=torch.zeros(1, 1, B, length + B, device=device, dtype=dtype),
            position_ids=pos,
            past_key_values=cache,
            use_cache=True,
            logits_positions=torch.empty(0, dtype=torch.long, device=device),
        )
        forwards["commit"] += 1

    blocks_tokens = len(output)
    output = output[:max_new_tokens]
    if eos_id in output:
        output = output[: output.index(eos_id) + 1]
    elapsed = time.perf_counter() - started
    total = sum(forwards.values())
    stats = {
        "block_step_counts": block_step_counts,
        "num_response_tokens": len(output),
        "num_denoising_steps": forwards["denoise"],
        "tpf": len(output) / max(forwards["denoise"], 1),
        # what the published statistics report: every generated block position, denoising steps only
        "published_num_response_tokens": blocks_tokens,
        "published_tpf": blocks_tokens / max(forwards["denoise"], 1),
        "forwards_total": total,
        "prefill_forwards": forwards["prefill"],
        "denoising_forwards": forwards["denoise"],
        "commit_forwards": forwards["commit"],
        "tokens_per_forward": len(output) / max(total, 1),
        "elapsed_s": elapsed,
        "tokens_per_second": len(output) / max(elapsed, 1e-9),
    }
    return torch.tensor([output], dtype=torch.long), stats


def main(argv: list[str] | None = None) -> int:
    """``python benchmarks/reference_decoder.py MODEL_DIR [PROMPT]``: decode one text prompt."""
    from transformers import AutoProcessor

    from nemo_automodel_bard import BardVLForConditionalGeneration

    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print(main.__doc__)
        return 2
    model_dir = Path(argv[0])
    prompt = argv[1] if len(argv) > 1 else "Describe the image."
    model = BardVLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    text = processor.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    batch = processor(text=[text], return_tensors="pt")
    ids, stats = reference_generate(model, batch, max_new_tokens=64, block_size=model.config.block_size,
                                    denoising_steps=model.config.block_size)
    print(processor.tokenizer.decode(ids[0]), stats)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
