"""Parallel block-wise decoding for Bard-VL.

Algorithm (DESIGN §1) with our improvements (DESIGN §2):

1. **Prefill** the prompt once with the block-causal prompt mask (prompt position ``p`` is in
   block ``p // B``); only K/V are kept, no prompt logits are computed.
2. For each response block: start from ``B`` MASK tokens and run up to ``denoising_steps``
   forwards that read the cache; each step proposes a token per masked position and commits some
   of them (see :mod:`.unmasking`). Committed tokens are final (unless ``revise=True``).
3. **Fused commit**: the finished block's K/V are written during the *next* block's first
   forward — its clean tokens are queries that see the cache and their own block, while the new
   masked block sees the cache, the finished block and itself (the training mask). This saves
   one forward per block against the published algorithm, with the same result
   (``fused_commit=False`` runs the published separate commit forward).
4. Stop a sample after a block containing EOS; stop when every sample has stopped.

Batching: prompts may be left- (or right-) padded; padding keys are masked, positions are per
sample (Qwen3-VL's rope index on the unpadded prompt), each sample stops on its own EOS, and a
sample's output does not depend on what else is in the batch. The only host synchronisation per
step is the "is this block finished" check.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch

from .unmasking import UnmaskingRule, propose_tokens, select_commits, transfer_schedule

_MODEL_INPUT_KEYS = (
    "input_ids",
    "attention_mask",
    "pixel_values",
    "pixel_values_videos",
    "image_grid_thw",
    "video_grid_thw",
    "mm_token_type_ids",
)
_IGNORED_INPUT_KEYS = ("token_type_ids", "second_per_grid_ts", "video_metadata")

BlockCallback = Callable[[int, torch.Tensor, torch.Tensor], None]


@dataclass
class DecodingOptions:
    """Resolved decoding settings (arguments, then generation config, then defaults)."""

    max_new_tokens: int
    block_size: int
    denoising_steps: int
    temperature: float
    top_k: int
    top_p: float
    remasking_strategy: str
    confidence_threshold: float
    mask_token_id: int
    eos_token_ids: tuple[int, ...]
    pad_token_id: int
    fused_commit: bool = True
    revise: bool = False
    revision_threshold: float = 0.9
    max_revision_steps: int = 2
    rule: UnmaskingRule = field(init=False)

    def __post_init__(self) -> None:
        for name in ("max_new_tokens", "block_size", "denoising_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.temperature is None or self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        if self.top_k is None or self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k!r}")
        if self.top_p is None or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.confidence_threshold is None or not math.isfinite(float(self.confidence_threshold)):
            raise ValueError(f"confidence_threshold must be a number, got {self.confidence_threshold!r}")
        if self.max_revision_steps < 0:
            raise ValueError(f"max_revision_steps must be >= 0, got {self.max_revision_steps!r}")
        self.rule = UnmaskingRule.parse(self.remasking_strategy)


@dataclass
class DecodingResult:
    """Generated ids ``[batch, new]`` (right-padded after EOS) and honest step statistics."""

    sequences: torch.Tensor
    stats: dict[str, Any]


def _first(*values: Any) -> Any:
    for value in values:
        if value is not None:
            return value
    return None


def resolve_options(model: Any, generation_config: Any = None, **given: Any) -> DecodingOptions:
    """Merge explicit arguments with the checkpoint's generation config and Bard defaults."""
    from nemo_automodel_bard.models.bard_vl.configuration_bard_vl import DEFAULT_DECODING

    config = model.config
    gen = generation_config if generation_config is not None else getattr(model, "generation_config", None)

    def from_gen(name: str) -> Any:
        return getattr(gen, name, None) if gen is not None else None

    sampling = bool(from_gen("do_sample"))
    block_size = _first(given.get("block_size"), from_gen("block_size"), getattr(config, "block_size", None))
    mask_token_id = _first(given.get("mask_token_id"), getattr(config, "mask_token_id", None), from_gen("mask_token_id"))
    vocab = config.text_config.vocab_size
    if mask_token_id is None:
        raise ValueError("no mask token id: set config.mask_token_id (Bard-VL checkpoints store it) or pass mask_token_id=")
    if not 0 <= int(mask_token_id) < vocab:
        raise ValueError(f"mask_token_id={mask_token_id} is outside the vocabulary (size {vocab})")
    eos = _first(given.get("eos_token_id"), from_gen("eos_token_id"), getattr(config, "eos_token_id", None),
                 getattr(config.text_config, "eos_token_id", None))
    if eos is None:
        raise ValueError("no EOS token id in the arguments, generation config or model config")
    eos_ids = tuple(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]))
    pad = _first(given.get("pad_token_id"), from_gen("pad_token_id"), eos_ids[0])
    return DecodingOptions(
        max_new_tokens=_first(given.get("max_new_tokens"), from_gen("max_new_tokens"), 256),
        block_size=block_size,
        denoising_steps=_first(given.get("denoising_steps"), from_gen("denoising_steps"), block_size),
        temperature=_first(given.get("temperature"), from_gen("temperature") if sampling else 0.0, 0.0),
        top_k=_first(given.get("top_k"), from_gen("top_k") if sampling else 0, 0),
        top_p=_first(given.get("top_p"), from_gen("top_p") if sampling else 1.0, 1.0),
        remasking_strategy=_first(
            given.get("remasking_strategy"), from_gen("remasking_strategy"), DEFAULT_DECODING["remasking_strategy"]
        ),
        confidence_threshold=_first(
            given.get("confidence_threshold"), from_gen("confidence_threshold"), DEFAULT_DECODING["confidence_threshold"]
        ),
        mask_token_id=int(mask_token_id),
        eos_token_ids=eos_ids,
        pad_token_id=int(pad),
        fused_commit=_first(given.get("fused_commit"), True),
        revise=_first(given.get("revise"), False),
        revision_threshold=_first(given.get("revision_threshold"), 0.9),
        max_revision_steps=_first(given.get("max_revision_steps"), 2),
    )


def _model_inputs(inputs: Any, extra: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    if isinstance(inputs, torch.Tensor):
        data: dict[str, Any] = {"input_ids": inputs}
    elif inputs is None:
        data = {}
    elif isinstance(inputs, Mapping) or hasattr(inputs, "keys"):
        data = {k: inputs[k] for k in inputs.keys()}
    else:
        raise TypeError(f"generate expects the processor's BatchFeature, a dict or an input_ids tensor, got {type(inputs)}")
    data.update(extra)
    unknown = set(data) - set(_MODEL_INPUT_KEYS) - set(_IGNORED_INPUT_KEYS)
    if unknown:
        raise TypeError(f"generate got unexpected inputs {sorted(unknown)}; expected {list(_MODEL_INPUT_KEYS)}")
    if data.get("input_ids") is None:
        raise ValueError("generate needs input_ids (pass the processor output)")
    out = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in data.items() if k in _MODEL_INPUT_KEYS}
    if out["input_ids"].ndim == 1:
        out["input_ids"] = out["input_ids"].unsqueeze(0)
    return out


class _MaskBuilder:
    """Builds the additive (or BlockMask) attention masks of prefill and denoising forwards."""

    def __init__(self, model: Any, batch: int, device: torch.device, dtype: torch.dtype) -> None:
        self.flex = bool(getattr(model, "uses_flex_attention", False))
        self.batch, self.device, self.dtype = batch, device, dtype

    def finish(self, visible: torch.Tensor) -> Any:
        """``visible`` bool ``[batch, q, kv]`` -> model attention mask."""
        if self.flex:
            from torch.nn.attention.flex_attention import create_block_mask

            dense = visible

            def mask_mod(b, h, q, kv):  # noqa: ANN001 - FlexAttention signature
                return dense[b, q, kv]

            return create_block_mask(
                mask_mod, self.batch, None, visible.shape[1], visible.shape[2], device=str(self.device)
            )
        additive = torch.zeros(visible.shape, dtype=self.dtype, device=self.device)
        return additive.masked_fill_(~visible, torch.finfo(self.dtype).min).unsqueeze(1)

    def prefill(self, valid: torch.Tensor, prompt_block: torch.Tensor) -> Any:
        """Block-causal prompt mask: valid keys of the same or an earlier prompt block."""
        visible = valid[:, None, :] & (prompt_block[:, None, :] <= prompt_block[:, :, None])
        visible |= torch.eye(valid.shape[1], dtype=torch.bool, device=valid.device)[None]
        return self.finish(visible)

    def step(self, cache_valid: torch.Tensor, n_clean: int, block: int) -> Any:
        """Queries ``[clean block (n_clean) | noisy block]`` over keys ``[cache | clean | noisy]``."""
        b, cached = cache_valid.shape
        q, kv = n_clean + block, cached + n_clean + block
        visible = torch.zeros(b, q, kv, dtype=torch.bool, device=cache_valid.device)
        visible[:, :, :cached] = cache_valid[:, None, :]
        visible[:, :, cached : cached + n_clean] = True
        visible[:, n_clean:, cached + n_clean :] = True
        return self.finish(visible)


def _forward(model: Any, **kwargs: Any) -> torch.Tensor:
    return model(**kwargs).logits


def block_diffusion_generate(
    model: Any,
    inputs: Any = None,
    max_new_tokens: int | None = None,
    block_size: int | None = None,
    denoising_steps: int | None = None,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    remasking_strategy: str | None = None,
    confidence_threshold: float | None = None,
    return_step_stats: bool = False,
    *,
    generation_config: Any = None,
    fused_commit: bool | None = None,
    revise: bool | None = None,
    revision_threshold: float | None = None,
    max_revision_steps: int | None = None,
    mask_token_id: int | None = None,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    block_callback: BlockCallback | None = None,
    record_trajectory: bool = False,
    generator: torch.Generator | None = None,
    **model_inputs: Any,
) -> torch.Tensor | tuple[torch.Tensor, dict[str, Any]]:
    """Decode a batch block by block. Returns ids ``[batch, new]`` or ``(ids, stats)``.

    Args:
        model: a :class:`BardVLForConditionalGeneration` (any model with its forward contract).
        inputs: the processor's ``BatchFeature`` (``input_ids``, ``attention_mask``, pixel inputs,
            ``mm_token_type_ids``) or an ``input_ids`` tensor.
        max_new_tokens, block_size, denoising_steps, temperature, top_k, top_p,
        remasking_strategy, confidence_threshold: as in the published API; ``None`` takes the
            value from ``generation_config`` / ``model.generation_config``, then the defaults.
        return_step_stats: also return a statistics dict (published keys ``block_step_counts``,
            ``num_response_tokens``, ``num_denoising_steps``, ``tpf`` plus ``forwards_total``,
            ``tokens_per_forward``, ...), every forward counted and tokens counted up to EOS.
        fused_commit: write a finished block's K/V in the next block's first forward (default).
        revise: allow replacing committed tokens of the current block when the model now prefers
            another token with probability above ``revision_threshold``; at most
            ``max_revision_steps`` extra forwards per block.
        block_callback: ``f(block_index, tokens [batch, B], finished [batch])`` after each block.
        record_trajectory: store, per block, the step at which each position was committed.
        generator: random generator for sampling / the ``random`` rule (on the model's device).
    """
    if not hasattr(model, "config") or not hasattr(model.config, "text_config"):
        raise TypeError("block_diffusion_generate needs a Bard-VL model")
    opts = resolve_options(
        model,
        generation_config,
        max_new_tokens=max_new_tokens,
        block_size=block_size,
        denoising_steps=denoising_steps,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        remasking_strategy=remasking_strategy,
        confidence_threshold=confidence_threshold,
        fused_commit=fused_commit,
        revise=revise,
        revision_threshold=revision_threshold,
        max_revision_steps=max_revision_steps,
        mask_token_id=mask_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    data = _model_inputs(inputs, model_inputs, device)
    started = time.perf_counter()
    with torch.no_grad():
        result = _decode(model, data, opts, device, dtype, block_callback, record_trajectory, generator)
    result.stats["elapsed_s"] = time.perf_counter() - started
    total = result.stats["num_response_tokens"]
    result.stats["tokens_per_second"] = total / max(result.stats["elapsed_s"], 1e-9)
    if return_step_stats:
        return result.sequences, result.stats
    return result.sequences


def _decode(
    model: Any,
    data: dict[str, Any],
    opts: DecodingOptions,
    device: torch.device,
    dtype: torch.dtype,
    block_callback: BlockCallback | None,
    record_trajectory: bool,
    generator: torch.Generator | None,
) -> DecodingResult:
    from transformers import DynamicCache

    input_ids = data["input_ids"]
    batch, prompt_len = input_ids.shape
    B = opts.block_size
    valid = data.get("attention_mask")
    valid = torch.ones_like(input_ids, dtype=torch.bool) if valid is None else valid.to(torch.bool)
    if not bool(valid.any(-1).all()):
        raise ValueError("every prompt needs at least one non-padding token")
    prompt_pos = model.position_ids_for(
        input_ids,
        mm_token_type_ids=data.get("mm_token_type_ids"),
        image_grid_thw=data.get("image_grid_thw"),
        video_grid_thw=data.get("video_grid_thw"),
        attention_mask=valid.long(),
    )
    response_start = prompt_pos.masked_fill(~valid[None], -1).amax(dim=(0, 2)) + 1  # [batch]
    prompt_block = (valid.long().cumsum(-1) - 1).clamp_min(0) // B
    masks = _MaskBuilder(model, batch, device, dtype)
    cache = DynamicCache(config=model.config.text_config)
    eos = torch.tensor(opts.eos_token_ids, device=device)
    arange_b = torch.arange(B, device=device)
    rule = opts.rule

    forwards = {"prefill": 0, "denoise": 0, "commit": 0}
    model(
        input_ids=input_ids,
        attention_mask=masks.prefill(valid, prompt_block),
        position_ids=prompt_pos,
        past_key_values=cache,
        use_cache=True,
        pixel_values=data.get("pixel_values"),
        pixel_values_videos=data.get("pixel_values_videos"),
        image_grid_thw=data.get("image_grid_thw"),
        video_grid_thw=data.get("video_grid_thw"),
        mm_token_type_ids=data.get("mm_token_type_ids"),
        logits_positions=torch.empty(0, dtype=torch.long, device=device),
    )
    forwards["prefill"] += 1
    cache_valid = valid.clone()

    num_blocks = math.ceil(opts.max_new_tokens / B)
    generated = torch.full((batch, num_blocks * B), opts.pad_token_id, dtype=torch.long, device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    steps_per_block: list[torch.Tensor] = []
    trajectory: list[dict[str, torch.Tensor]] = []
    schedule = transfer_schedule(B, opts.denoising_steps)
    pending: tuple[torch.Tensor, torch.Tensor] | None = None  # finished block (tokens, positions) not yet cached
    blocks_done = 0

    for k in range(num_blocks):
        block = torch.full((batch, B), opts.mask_token_id, dtype=torch.long, device=device)
        block.masked_fill_(finished[:, None], opts.pad_token_id)
        masked = ~finished[:, None].expand(batch, B).clone()
        positions = response_start[:, None] + k * B + arange_b  # [batch, B]
        committed_at = torch.full((batch, B), -1, dtype=torch.long, device=device)
        sample_steps = torch.zeros(batch, dtype=torch.long, device=device)
        step, extra_steps = 0, 0
        while True:
            if pending is not None:
                tokens_q = torch.cat([pending[0], block], dim=1)
                pos_q = torch.cat([pending[1], positions], dim=1)
                n_clean = B
            else:
                tokens_q, pos_q, n_clean = block, positions, 0
            q_len = n_clean + B
            noisy_rows = (torch.arange(batch, device=device)[:, None] * q_len + n_clean + arange_b).reshape(-1)
            logits = _forward(
                model,
                input_ids=tokens_q,
                attention_mask=masks.step(cache_valid, n_clean, B),
                position_ids=pos_q[None].expand(3, batch, q_len),
                past_key_values=cache,
                use_cache=True,
                logits_positions=noisy_rows,
            ).view(batch, B, -1)
            forwards["denoise"] += 1
            if n_clean:
                cache_valid = torch.cat([cache_valid, torch.ones(batch, B, dtype=torch.bool, device=device)], 1)
                pending = None
            cache.crop(-B)  # drop the noisy block's K/V; keep the clean block's

            proposal, score, prob = propose_tokens(
                logits, temperature=opts.temperature, top_k=opts.top_k, top_p=opts.top_p,
                score=rule.score, generator=generator,
            )
            was_masked = masked
            sample_steps += was_masked.any(-1).long()
            k_min = schedule[min(step, len(schedule) - 1)]
            commit = select_commits(score, masked, k_min, dynamic=rule.dynamic, threshold=opts.confidence_threshold)
            revised = torch.zeros_like(commit)
            if opts.revise:
                revised = (~masked) & (~finished[:, None]) & (proposal != block) & (prob > opts.revision_threshold)
            update = commit | revised
            block = torch.where(update, proposal, block)
            committed_at = torch.where(update, torch.full_like(committed_at, step), committed_at)
            masked = masked & ~commit
            step += 1
            if bool(masked.any()):
                continue
            if opts.revise and extra_steps < opts.max_revision_steps and bool(revised.any()):
                extra_steps += 1
                continue
            break

        generated[:, k * B : (k + 1) * B] = block
        steps_per_block.append(sample_steps)
        if record_trajectory:
            trajectory.append({"block": k, "committed_at": committed_at.cpu(), "tokens": block.cpu()})
        has_eos = torch.isin(block, eos).any(-1)
        finished = finished | has_eos
        blocks_done = k + 1
        if block_callback is not None:
            block_callback(k, block, finished.clone())
        if k == num_blocks - 1 or bool(finished.all()):
            break
        if opts.fused_commit:
            pending = (block, positions)
        else:
            model(
                input_ids=block,
                attention_mask=masks.step(cache_valid, B, 0),
                position_ids=positions[None].expand(3, batch, B),
                past_key_values=cache,
                use_cache=True,
                logits_positions=torch.empty(0, dtype=torch.long, device=device),
            )
            forwards["commit"] += 1
            cache_valid = torch.cat([cache_valid, torch.ones(batch, B, dtype=torch.bool, device=device)], 1)

    generated = generated[:, : blocks_done * B][:, : opts.max_new_tokens]
    is_eos = torch.isin(generated, eos)
    after_eos = (is_eos.long().cumsum(-1) - is_eos.long()) > 0  # strictly after the first EOS
    generated = generated.masked_fill(after_eos, opts.pad_token_id)
    lengths = (~after_eos).sum(-1)  # tokens up to and including EOS
    width = int(lengths.max()) if batch else 0
    sequences = generated[:, :width]

    total_forwards = sum(forwards.values())
    block_steps = torch.stack(steps_per_block, dim=1).cpu() if steps_per_block else torch.zeros(batch, 0, dtype=torch.long)
    lengths_list = lengths.cpu().tolist()
    num_tokens = int(sum(lengths_list))
    stats: dict[str, Any] = {
        # published keys (honest values: tokens up to EOS; batch 1 gives plain ints/lists)
        "block_step_counts": block_steps[0].tolist() if batch == 1 else block_steps.tolist(),
        "num_response_tokens": num_tokens,
        "num_denoising_steps": forwards["denoise"],
        "tpf": num_tokens / max(batch * forwards["denoise"], 1),
        # honest additions
        "forwards_total": total_forwards,
        "prefill_forwards": forwards["prefill"],
        "denoising_forwards": forwards["denoise"],
        "commit_forwards": forwards["commit"],
        "tokens_per_forward": num_tokens / max(batch * total_forwards, 1),
        "response_tokens_per_sample": lengths_list,
        "num_blocks": blocks_done,
        "block_size": B,
        "fused_commit": opts.fused_commit,
    }
    if record_trajectory:
        stats["trajectory"] = trajectory
    return DecodingResult(sequences=sequences, stats=stats)


__all__ = ["DecodingOptions", "DecodingResult", "block_diffusion_generate", "resolve_options"]
