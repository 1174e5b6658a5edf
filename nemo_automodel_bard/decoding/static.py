"""Static shapes for decoding: a preallocated KV cache and a compiled model step.

A forward of a block step costs little arithmetic at batch 1 (a small model on a CPU, any model on a GPU):
its time goes to Python, module dispatch and kernel launches. Compiling the step removes most of that, but only
if the step has the same shapes every time. The eager decoder's cache grows by concatenation (its length changes
every block), so this module provides:

* :class:`StaticKVCache`: transformers' ``StaticCache`` allocated up front for ``[batch, kv heads, length, head
  dim]`` per layer, where ``length`` is the prompt plus the whole response rounded up to a bucket
  (:func:`static_length`), so that prompts of similar length share one compiled graph. A forward writes its keys
  in place after the last kept position; :meth:`StaticKVCache.drop_last` moves that position back (the noisy
  block's keys are overwritten by the next step). A forward reads a window of the buffer
  (:func:`attention_window`, set from its mask's width by :meth:`StaticKVCache.fit`): the caller's mask hides the
  positions past the end (and the prompt's padding).
* :func:`compiled_step`: ``torch.compile`` of the text-only model forward ``(input_ids, attention_mask,
  position_ids, logits_positions, cache) -> logits``, one per model, with fixed shapes. A new (batch, query
  length, attention window) compiles a new graph once; every later call with those shapes reuses it. The block
  decoder's steady steps (``B`` queries), its fused first step (``2B``) and the AR baseline's one-token step each
  get their graph. The prefill (prompt length varies, images) stays eager.

The compile mode is chosen per device (:data:`COMPILE_MODES`): on CPU inductor's ``max-autotune-no-cudagraphs``
(measured faster than ``default`` for the tiny models; docs/benchmarks/compiled_decoding.md), on CUDA
``reduce-overhead`` (CUDA graphs). Weights are read at every call (no freezing), so a model that is trained
further and decoded again uses its new weights.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from transformers import StaticCache
from transformers.cache_utils import StaticLayer

#: ``torch.compile`` mode of the decoding step per device type
COMPILE_MODES = {"cpu": "max-autotune-no-cudagraphs", "cuda": "reduce-overhead"}
#: graphs one model may hold (dynamo's default of 8 is low for buckets x batch sizes x block sizes)
RECOMPILE_LIMIT = 64
_ATTRIBUTE = "_bard_compiled_step"
#: the compiler :func:`compile_for` applies (``torch.compile``; the tests swap in the identity to check the static
#: cache and masks eagerly)
COMPILER: Callable[..., Any] = torch.compile

#: ``forward(input_ids, attention_mask, position_ids, logits_positions, cache) -> logits``
StepForward = Callable[[torch.Tensor, Any, torch.Tensor, torch.Tensor, Any], torch.Tensor]


def static_length(needed: int) -> int:
    """The cache length for ``needed`` positions: rounded up to a multiple of a quarter of the power of two at or
    below it (at least 64), so prompts of similar length share a compiled graph and less than 25 % is slack.

    >>> [static_length(n) for n in (1, 64, 65, 211, 300, 1100)]
    [64, 64, 80, 224, 320, 1280]
    """
    if needed <= 64:
        return 64
    step = 2 ** (needed.bit_length() - 3)  # a quarter of the power of two at or below needed
    return -(-needed // step) * step


def attention_window(end: int, length: int) -> int:
    """How many keys of a ``length``-long static buffer a forward reads when its row ends at ``end``: ``end`` rounded
    up to a quarter of the buffer (at least 64), at most ``length``. Attention then skips most of the unwritten
    buffer, at the price of at most four graphs per step shape.

    >>> [attention_window(e, 320) for e in (27, 91, 200, 320)]
    [80, 160, 240, 320]
    """
    step = max(64, -(-length // 4))
    return min(length, -(-end // step) * step)


class _WindowedLayer(StaticLayer):
    """A ``StaticLayer`` whose forwards read only the first ``window`` positions of its buffer."""

    window: int

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = super().update(key_states, value_states, *args, **kwargs)
        return keys[:, :, : self.window], values[:, :, : self.window]


class StaticKVCache(StaticCache):
    """A ``StaticCache`` allocated at construction (``[batch, kv heads, length, head dim]`` per layer) that the
    block decoder can roll back: :meth:`drop_last` forgets the last ``n`` written positions (they are overwritten
    by the next forward). ``get_seq_length`` is the number of kept positions. A forward reads the first
    :meth:`fit` positions of the buffer: the width of its attention mask."""

    def __init__(self, text_config: Any, batch: int, length: int, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__(config=text_config, max_cache_len=length)
        if any(type(layer) is not StaticLayer for layer in self.layers):
            raise ValueError("compiled decoding supports full-attention layers only (this model has sliding-window "
                             "or other cache layers); decode with compile=False")
        head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
        self.early_initialization(batch, text_config.num_key_value_heads, head_dim, dtype, device)
        self.length = length
        for layer in self.layers:  # our own layers: no other cache is affected
            layer.__class__ = _WindowedLayer
            layer.window = length

    def drop_last(self, n: int) -> None:
        """Forget the last ``n`` positions of every layer (the next forward writes over them)."""
        for layer in self.layers:
            layer.cumulative_length.sub_(n)

    def fit(self, attention_mask: Any) -> None:
        """Let the next forwards read as many keys as ``attention_mask`` ``[batch, 1, q, keys]`` has columns."""
        window = int(attention_mask.shape[-1])
        for layer in self.layers:
            layer.window = window


def fit_window(cache: Any, attention_mask: Any) -> None:
    """:meth:`StaticKVCache.fit` when ``cache`` is one (a no-op for a growing cache)."""
    if isinstance(cache, StaticKVCache):
        cache.fit(attention_mask)


def compile_for(model: Any, name: str, function: Callable[..., Any]) -> Callable[..., Any]:
    """``function`` compiled for ``model`` (made on first use and kept on the model under ``name``): fixed shapes,
    the device's :data:`COMPILE_MODES` mode, up to :data:`RECOMPILE_LIMIT` graphs.

    Raises:
        ValueError: for a FlexAttention model (its masks are ``BlockMask`` objects built per step, and its
            kernels are compiled already) -- decode with ``compile=False`` or load the model with ``sdpa``.
    """
    cached = model.__dict__.setdefault(_ATTRIBUTE, {})
    if name in cached:
        return cached[name]
    if getattr(model, "uses_flex_attention", False):
        raise ValueError("compile=True needs the dense attention path (attn_implementation 'sdpa' or 'eager'); this "
                         "model uses FlexAttention, whose kernels are compiled already -- decode with compile=False")
    mode = COMPILE_MODES.get(next(model.parameters()).device.type, "default")
    compiled = COMPILER(function, mode=mode, dynamic=False)

    def run(*args: Any, **kwargs: Any) -> Any:
        # the limit applies while this call may compile; set directly (``config.patch`` costs ~0.2 ms per call)
        config = torch._dynamo.config
        before = config.recompile_limit
        config.recompile_limit = max(before, RECOMPILE_LIMIT)
        try:
            return compiled(*args, **kwargs)
        finally:
            config.recompile_limit = before

    cached[name] = run
    return run


def reset_compiled(model: Any) -> None:
    """Forget ``model``'s compiled steps (the next compiled decode compiles again), e.g. after changing its dtype
    or device."""
    model.__dict__.pop(_ATTRIBUTE, None)


def compiled_step(model: Any) -> StepForward:
    """The model's compiled text-only step (:func:`eager_step` through :func:`compile_for`)."""
    return compile_for(model, "step", eager_step(model))


def eager_step(model: Any) -> StepForward:
    """The same call as :func:`compiled_step`, not compiled (the decoder's default)."""

    def forward(input_ids: torch.Tensor, attention_mask: Any, position_ids: torch.Tensor,
                logits_positions: torch.Tensor, cache: Any) -> torch.Tensor:
        return model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                     past_key_values=cache, use_cache=True, logits_positions=logits_positions).logits

    return forward


__all__ = ["attention_window", "fit_window", "COMPILE_MODES", "RECOMPILE_LIMIT", "StaticKVCache", "StepForward", "compile_for", "compiled_step", "eager_step",
           "reset_compiled",
           "static_length"]
