"""Plain autoregressive decoding with a KV cache: the cost floor and the AR baseline.

The same network is run *causally*: an explicit causal attention mask (every query sees the
valid keys at or before it) and shifted prediction (the logit at the last position predicts the
next token). For a Bard-VL (non-causal attention, unshifted prediction) this is what its AR
ancestor did — the benchmark uses it as the cost floor of one token per forward; for the
pipeline's autoregressively pre-trained model it is the real AR baseline.

Every forward is counted (the prefill produces the first token; each further token costs one
one-token forward), tokens are counted up to and including EOS, and each sample stops on its own
EOS. Prompts may be left- or right-padded.

Example:
    >>> from nemo_automodel_bard.decoding.autoregressive import ar_generate    # doctest: +SKIP
    >>> ids, stats = ar_generate(model, batch, max_new_tokens=64)              # doctest: +SKIP
    >>> stats["forwards_total"] == stats["num_response_tokens"]                 # doctest: +SKIP
    True
"""

from __future__ import annotations

import functools
import inspect
import time
from typing import Any

import torch

from .inputs import media_inputs
from .static import (StaticKVCache, StepForward, attention_window, compile_for, compiled_step, eager_step, fit_window,
                     static_length)
from .unmasking import propose_tokens


def _accepts_logits_positions(model: Any) -> bool:
    try:
        return "logits_positions" in inspect.signature(type(model).forward).parameters
    except (TypeError, ValueError):  # pragma: no cover - builtins / odd wrappers
        return False


def _prompt_positions(model: Any, data: dict[str, Any], valid: torch.Tensor) -> torch.Tensor:
    kwargs = dict(
        mm_token_type_ids=data.get("mm_token_type_ids"),
        image_grid_thw=data.get("image_grid_thw"),
        video_grid_thw=data.get("video_grid_thw"),
        attention_mask=valid.long(),
    )
    if hasattr(model, "position_ids_for"):
        return model.position_ids_for(data["input_ids"], **kwargs)
    mm = kwargs.pop("mm_token_type_ids")
    if mm is None:
        mm = torch.zeros_like(data["input_ids"], dtype=torch.int32)
    position_ids, _ = model.model.get_rope_index(data["input_ids"], mm, **kwargs)
    return position_ids


@torch.no_grad()
def ar_generate(
    model: Any,
    inputs: Any,
    max_new_tokens: int,
    eos_token_id: int | list[int] | None = None,
    *,
    pad_token_id: int | None = None,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    compile: bool = False,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Greedy (or sampled) autoregressive decoding with a KV cache, the network run causally.

    Args:
        model: a Bard-VL (or Qwen3-VL-like) model taking 4-D additive masks and mRoPE positions.
        inputs: the processor output (``input_ids``, ``attention_mask``, pixel inputs, ...).
        max_new_tokens: upper bound on generated tokens per sample.
        eos_token_id: stop id(s); ``None`` generates exactly ``max_new_tokens`` (benchmarks).
        pad_token_id: fills positions after a sample's EOS (default: the first EOS id, else 0).
        compile: a preallocated KV cache and the one-token step compiled (with greedy decoding, the forward and
            the argmax as one graph): the AR counterpart of the block decoder's ``compile=True``, same tokens.

    Returns:
        ``(ids [batch, n], stats)``; ``stats`` has ``forwards_total``, ``prefill_forwards``,
        ``decode_forwards``, ``num_response_tokens`` (up to EOS), ``response_tokens_per_sample``,
        ``forwards_per_sample`` (forwards until each sample's EOS),
        ``tokens_per_forward``, ``elapsed_s``, ``tokens_per_second``.
    """
    from transformers import DynamicCache

    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    data = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in dict(inputs).items()}
    input_ids = data["input_ids"]
    batch, prompt_len = input_ids.shape
    valid = data.get("attention_mask")
    valid = torch.ones_like(input_ids, dtype=torch.bool) if valid is None else valid.to(torch.bool)
    if not bool(valid.any(-1).all()):
        raise ValueError("every prompt needs at least one non-padding token")
    eos_ids = [] if eos_token_id is None else list(eos_token_id if isinstance(eos_token_id, (list, tuple)) else [eos_token_id])
    eos = torch.tensor(eos_ids, dtype=torch.long, device=device)
    pad = pad_token_id if pad_token_id is not None else (eos_ids[0] if eos_ids else 0)
    use_positions = _accepts_logits_positions(model)
    min_value = torch.finfo(dtype).min
    started = time.perf_counter()

    # key validity for the whole run: prompt padding is invalid, generated tokens are valid
    capacity = prompt_len + max_new_tokens
    if compile:  # a preallocated buffer; each mask covers a window of it, keys past the current token hidden
        capacity = static_length(capacity)
        if not use_positions:
            raise ValueError("compile=True needs a model whose forward takes logits_positions (a Bard-VL model)")
        cache: Any = StaticKVCache(model.config.text_config, batch, capacity, dtype, device)
        step: StepForward = compiled_step(model)
        greedy = compile_for(model, "ar_greedy_step", functools.partial(_greedy_token, eager_step(model)))
    else:
        cache = DynamicCache(config=model.config.text_config)
    key_valid = torch.ones(batch, capacity, dtype=torch.bool, device=device)
    key_valid[:, :prompt_len] = valid
    key_bias = torch.zeros(key_valid.shape, dtype=dtype, device=device).masked_fill_(~key_valid, min_value)
    key_index = torch.arange(capacity, device=device)

    positions = _prompt_positions(model, data, valid)
    causal = torch.ones(prompt_len, capacity, dtype=torch.bool, device=device).tril()
    visible = (key_valid[:, None, :] & causal[None]) | torch.eye(prompt_len, capacity, dtype=torch.bool, device=device)[None]
    visible = visible[:, :, : attention_window(prompt_len, capacity) if compile else prompt_len]
    prefill_mask = torch.zeros(visible.shape, dtype=dtype, device=device).masked_fill_(~visible, min_value)[:, None]
    last = prompt_len - 1 - valid.flip(-1).long().argmax(-1)  # index of each prompt's last real token
    kwargs: dict[str, Any] = {}
    rows = torch.arange(batch, device=device)
    if use_positions:
        kwargs["logits_positions"] = rows * prompt_len + last
    else:
        if not bool((last == prompt_len - 1).all()):
            raise ValueError("right-padded prompts need a model whose forward takes logits_positions")
        kwargs["logits_to_keep"] = 1
    fit_window(cache, prefill_mask)
    out = model(
        input_ids=input_ids,
        attention_mask=prefill_mask,
        position_ids=positions,
        past_key_values=cache,
        use_cache=True,
        **media_inputs(data),
        **kwargs,
    )
    forwards = {"prefill": 1, "decode": 0}
    next_pos = positions.masked_fill(~valid[None], -1).amax(dim=(0, 2)) + 1  # [batch]
    step_kwargs: dict[str, Any] = {"logits_positions": rows} if use_positions else {"logits_to_keep": 1}

    generated = torch.full((batch, max_new_tokens), pad, dtype=torch.long, device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    logits = out.logits.reshape(batch, -1)
    for t in range(max_new_tokens):
        if logits is not None:  # (the compiled greedy step returns the next token itself and no logits)
            token, _, _ = propose_tokens(
                logits[:, None], temperature=temperature, top_k=top_k, top_p=top_p, generator=generator
            )
            token = token[:, 0]
        token = token.masked_fill(finished, pad)
        generated[:, t] = token
        if eos.numel():
            finished = finished | torch.isin(token, eos)
            if bool(finished.all()):
                break
        if t == max_new_tokens - 1:
            break
        kv = prompt_len + t + 1
        step_positions = (next_pos + t)[None, :, None].expand(3, batch, 1)
        forwards["decode"] += 1
        if not compile:
            out = model(input_ids=token[:, None], attention_mask=key_bias[:, None, None, :kv],
                        position_ids=step_positions, past_key_values=cache, use_cache=True, **step_kwargs)
            logits = out.logits.reshape(batch, -1)
            continue
        window = attention_window(kv, capacity)
        step_mask = key_bias[:, :window].masked_fill(key_index[:window] >= kv, min_value)[:, None, None, :]
        cache.fit(step_mask)
        if temperature or top_k or top_p < 1:
            logits = step(token[:, None], step_mask, step_positions, rows, cache).reshape(batch, -1)
        else:
            token, logits = greedy(token[:, None], step_mask, step_positions, rows, cache), None

    if eos.numel():
        is_eos = torch.isin(generated, eos)
        after = (is_eos.long().cumsum(-1) - is_eos.long()) > 0
        generated = generated.masked_fill(after, pad)
        lengths = (~after).sum(-1)
        lengths = torch.minimum(lengths, torch.full_like(lengths, t + 1))
    else:
        lengths = torch.full((batch,), t + 1, dtype=torch.long, device=device)
    width = int(lengths.max())
    elapsed = time.perf_counter() - started
    per_sample = lengths.cpu().tolist()
    num_tokens = int(sum(per_sample))
    total = forwards["prefill"] + forwards["decode"]
    stats = {
        "forwards_total": total,
        "prefill_forwards": forwards["prefill"],
        "decode_forwards": forwards["decode"],
        "num_response_tokens": num_tokens,
        "response_tokens_per_sample": per_sample,
        "forwards_per_sample": [max(n, 1) for n in per_sample],  # prefill gives token 1, one decode per later token
        "tokens_per_forward": num_tokens / max(batch * total, 1),
        "elapsed_s": elapsed,
        "tokens_per_second": num_tokens / max(elapsed, 1e-9),
    }
    return generated[:, :width], stats


def _greedy_token(forward: StepForward, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  position_ids: torch.Tensor, logits_positions: torch.Tensor, cache: Any) -> torch.Tensor:
    """One greedy AR step as a pure function (compiled by ``ar_generate(compile=True)``): the next token ``[batch]``."""
    logits = forward(input_ids, attention_mask, position_ids, logits_positions, cache)
    return propose_tokens(logits[:, None])[0][:, 0]


__all__ = ["ar_generate"]
