"""Parallel block-wise decoding for Bard-VL.

Algorithm (docs/decoding.md) with our improvements over the published decoder:

1. **Prefill** the prompt once with the block-causal prompt mask (prompt position ``p`` is in
   block ``p // B``); only K/V are kept, no prompt logits are computed. **Fused prefill**: the first
   response block's MASK tokens go into the same forward (they see every prompt key and each other,
   no prompt query sees them), so the prefill is also block 0's first denoising step -- the same
   logits with one forward fewer per call (``fused_prefill=False`` runs the published separate
   prefill).
2. For each response block: start from ``B`` MASK tokens and run up to ``denoising_steps``
   forwards that read the cache; each step proposes a token per masked position and commits some
   of them (see :mod:`.unmasking`). Committed tokens are final (unless ``revise=True``).
3. **Fused commit**: the finished block's K/V are written during the *next* block's first
   forward — its clean tokens are queries that see the cache and their own block, while the new
   masked block sees the cache, the finished block and itself (the training mask). This saves
   one forward per block against the published algorithm, with the same result
   (``fused_commit=False`` runs the published separate commit forward).
4. Stop a sample after a block containing EOS; stop when every sample has stopped. A block is
   finished for a sample as soon as it holds a committed EOS with every position before it committed
   (the positions after it can never reach the output), not only when every position is committed.

Batching: prompts may be left- (or right-) padded; padding keys are masked, positions are per
sample (Qwen3-VL's rope index on the unpadded prompt), each sample stops on its own EOS, and a
sample's output does not depend on what else is in the batch (every per-sample decision — commits,
revisions, when a block is done — is taken from that sample's own tensors). The only host
synchronisation per denoising step is the "is this block finished for everyone" check.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
from transformers.cache_utils import DynamicLayer

from nemo_automodel_bard.diffusion.masks import (
    PAD_DOC_ID,
    TokenType,
    prompt_block_ids,
    response_block_ids,
    visibility,
)

from .defaults import DEFAULT_DECODING, DEFAULT_MAX_NEW_TOKENS, DEFAULT_REVISION
from .inputs import MEDIA_KEYS, media_inputs
from .static import (StaticKVCache, StepForward, attention_window, compile_for, compiled_step, eager_step, fit_window,
                     static_length)
from .unmasking import UnmaskingRule, propose_tokens, select_commits, transfer_schedule

_MODEL_INPUT_KEYS = ("input_ids", "attention_mask", *MEDIA_KEYS)
_IGNORED_INPUT_KEYS = ("token_type_ids", "second_per_grid_ts", "video_metadata")

#: ``f(block_index, tokens [batch, B], finished [batch])``, called after every block.
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
    fused_prefill: bool = True
    revise: bool = False
    eos_exit: bool = True
    revision_threshold: float = DEFAULT_REVISION["revision_threshold"]
    max_revision_steps: int = DEFAULT_REVISION["max_revision_steps"]
    compile: bool = False
    rule: UnmaskingRule = field(init=False)

    def __post_init__(self) -> None:
        for name in ("max_new_tokens", "block_size", "denoising_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.temperature is None or not math.isfinite(float(self.temperature)) or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature!r}")
        if self.top_k is None or isinstance(self.top_k, bool) or int(self.top_k) != self.top_k or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 disables it), got {self.top_k!r}")
        if self.top_p is None or not 0 < float(self.top_p) <= 1:
            raise ValueError(f"top_p must be in (0, 1] (1 disables it), got {self.top_p!r}")
        if self.confidence_threshold is None or not 0.0 <= float(self.confidence_threshold) <= 1.0:
            raise ValueError(f"confidence_threshold must be in [0, 1] (scores are probabilities; 1 commits only the "
                             f"scheduled minimum), got {self.confidence_threshold!r}")
        if self.revision_threshold is None or not math.isfinite(float(self.revision_threshold)):
            raise ValueError(f"revision_threshold must be a finite number, got {self.revision_threshold!r}")
        if isinstance(self.max_revision_steps, bool) or not isinstance(self.max_revision_steps, int) or self.max_revision_steps < 0:
            raise ValueError(f"max_revision_steps must be an integer >= 0, got {self.max_revision_steps!r}")
        self.top_k = int(self.top_k)
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
    """Merge explicit arguments with the checkpoint's generation config and Bard defaults.

    Precedence: explicit argument, then ``generation_config`` (or ``model.generation_config``:
    ``block_size``, ``denoising_steps``, ``remasking_strategy``, ``confidence_threshold``,
    ``max_new_tokens``, EOS/pad ids and — only when ``do_sample`` is set — ``temperature``,
    ``top_k``, ``top_p``), then ``model.config.block_size`` and the package defaults.

    Raises:
        ValueError: naming the offending option (mask id missing or outside the vocabulary, no
            EOS id, non-positive sizes, ``top_p`` outside (0, 1], unknown rule, ...).
    """
    config = model.config
    gen = generation_config if generation_config is not None else getattr(model, "generation_config", None)

    def from_gen(name: str) -> Any:
        return getattr(gen, name, None) if gen is not None else None

    sampling = bool(from_gen("do_sample"))
    block_size = _first(
        given.get("block_size"), from_gen("block_size"), getattr(config, "block_size", None), DEFAULT_DECODING["block_size"]
    )
    mask_token_id = _first(given.get("mask_token_id"), getattr(config, "mask_token_id", None), from_gen("mask_token_id"))
    vocab = config.text_config.vocab_size
    if mask_token_id is None:
        raise ValueError(
            "no mask token id: set config.mask_token_id (Bard-VL checkpoints store it) or pass mask_token_id="
        )
    if isinstance(mask_token_id, bool) or int(mask_token_id) != mask_token_id or not 0 <= int(mask_token_id) < vocab:
        raise ValueError(f"mask_token_id={mask_token_id!r} is outside the vocabulary (text_config.vocab_size={vocab})")
    eos = _first(
        given.get("eos_token_id"),
        from_gen("eos_token_id"),
        getattr(config, "eos_token_id", None),
        getattr(config.text_config, "eos_token_id", None),
    )
    if eos is None:
        raise ValueError("no EOS token id in the arguments, generation config or model config")
    eos_ids = tuple(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]))
    pad = _first(given.get("pad_token_id"), from_gen("pad_token_id"), eos_ids[0])
    steps_default = block_size if isinstance(block_size, int) else None
    return DecodingOptions(
        max_new_tokens=_first(given.get("max_new_tokens"), from_gen("max_new_tokens"), DEFAULT_MAX_NEW_TOKENS),
        block_size=block_size,
        denoising_steps=_first(given.get("denoising_steps"), from_gen("denoising_steps"), steps_default),
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
        fused_commit=bool(_first(given.get("fused_commit"), True)),
        fused_prefill=bool(_first(given.get("fused_prefill"), True)),
        revise=bool(_first(given.get("revise"), False)),
        eos_exit=bool(_first(given.get("eos_exit"), True)),
        revision_threshold=_first(given.get("revision_threshold"), DEFAULT_REVISION["revision_threshold"]),
        max_revision_steps=_first(given.get("max_revision_steps"), DEFAULT_REVISION["max_revision_steps"]),
        compile=bool(_first(given.get("compile"), False)),
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
        if isinstance(out.get("attention_mask"), torch.Tensor) and out["attention_mask"].ndim == 1:
            out["attention_mask"] = out["attention_mask"].unsqueeze(0)
    if out["input_ids"].ndim != 2 or out["input_ids"].shape[1] == 0:
        raise ValueError(f"input_ids must be [batch, prompt_len] with prompt_len > 0, got {tuple(out['input_ids'].shape)}")
    return out


class _MaskBuilder:
    """Attention masks of the prefill, denoising and commit forwards.

    Dense path (SDPA / eager): an additive float mask. Every key of the response is real, so a
    denoising step's mask is one additive row per sample (``key_bias``: 0 for real keys, ``min``
    for prompt padding) broadcast over the queries — a view, no allocation per step. Only the
    fused first step of a block (clean queries must not see the noisy block) builds a mask.
    FlexAttention path: a ``BlockMask`` from the boolean visibility.

    Static path (``static=True``, a :class:`~.static.StaticKVCache`): a mask spans the first
    :func:`~.static.attention_window` columns of ``key_valid`` (the buffer), and the keys past the end of the
    forward's row are hidden too, so that the steps of a block share their shapes with the other blocks of the
    same window.
    """

    def __init__(self, model: Any, key_valid: torch.Tensor, dtype: torch.dtype, static: bool = False) -> None:
        self.flex = bool(getattr(model, "uses_flex_attention", False))
        self.static = static
        if static and self.flex:
            raise ValueError("static masks are dense; a FlexAttention model decodes with compile=False")
        self.batch = key_valid.shape[0]
        self.device, self.dtype = key_valid.device, dtype
        self.min = torch.finfo(dtype).min
        self.key_valid = key_valid  # [batch, prompt + response capacity]
        self.key_bias = torch.zeros(key_valid.shape, dtype=dtype, device=self.device).masked_fill_(~key_valid, self.min)
        self._tails: dict[tuple[int, int], torch.Tensor] = {}

    def _tail(self, n_clean: int, block: int) -> torch.Tensor:
        """The noisy block's key columns of a fused step: hidden from clean queries, seen by noisy ones."""
        key = (n_clean, block)
        if key not in self._tails:
            tail = torch.zeros(self.batch, 1, n_clean + block, block, dtype=self.dtype, device=self.device)
            tail[:, :, :n_clean] = self.min
            self._tails[key] = tail
        return self._tails[key]

    def _flex(self, visible: torch.Tensor) -> Any:
        from torch.nn.attention.flex_attention import create_block_mask

        dense = visible

        def mask_mod(b, h, q, kv):  # noqa: ANN001 - FlexAttention signature
            return dense[b, q, kv]

        return create_block_mask(mask_mod, self.batch, None, visible.shape[1], visible.shape[2], device=str(self.device))

    def prefill(self, valid: torch.Tensor, prompt_block: torch.Tensor, block: int = 0) -> Any:
        """The training rule (:func:`~nemo_automodel_bard.diffusion.masks.visibility`) on the row ``[prompt]``,
        or with ``block > 0`` ``[prompt | noisy block]`` (a fused prefill): prompt queries see valid keys of
        the same or an earlier prompt block, the noisy block sees every valid prompt key and itself, no prompt
        query sees it. Left padding is row padding (a document of its own that only sees itself).
        """
        token_type = torch.where(valid, int(TokenType.PROMPT), int(TokenType.PAD))
        doc_ids = torch.where(valid, 0, PAD_DOC_ID)
        if block:
            # the noisy block's id is the first response block; only its equality with itself matters here
            first = response_block_ids(valid.sum(-1, keepdim=True), torch.zeros_like(prompt_block[:, :1]), block)
            token_type = torch.cat([token_type, token_type.new_full((self.batch, block), int(TokenType.NOISY))], dim=1)
            prompt_block = torch.cat([prompt_block, first.expand(self.batch, block)], dim=1)
            doc_ids = torch.cat([doc_ids, doc_ids.new_zeros((self.batch, block))], dim=1)
        visible = visibility(token_type, prompt_block, doc_ids)
        if self.flex:
            return self._flex(visible)
        q = visible.shape[-1]
        width = attention_window(q, self.key_valid.shape[1]) if self.static else q
        additive = torch.full((self.batch, q, width), self.min, dtype=self.dtype, device=self.device)
        additive[:, :, :q].masked_fill_(visible, 0.0)
        return additive.unsqueeze(1)

    def step(self, cached: int, n_clean: int, block: int) -> Any:
        """Queries ``[clean block (n_clean) | noisy block (block)]`` over keys ``[cache | clean | noisy]``.

        Clean queries see the cache and the clean block (not the noisy one); noisy queries see
        everything (the training mask). ``block = 0`` gives the separate commit forward's mask.
        """
        q, kv = n_clean + block, cached + n_clean + block
        if self.flex:
            visible = self.key_valid[:, None, :kv].expand(self.batch, q, kv).clone()
            visible[:, :n_clean, cached + n_clean :] = False
            return self._flex(visible)
        if self.static:  # keys past a query's last visible one are hidden: what the buffer holds there is stale
            width = attention_window(kv, self.key_valid.shape[1])
            limit = torch.full((q,), kv, device=self.device)
            limit[:n_clean] = cached + n_clean
            beyond = torch.arange(width, device=self.device)[None, :] >= limit[:, None]  # [q, width]
            return self.key_bias[:, None, None, :width].masked_fill(beyond, self.min)
        if n_clean and block:
            seen = self.key_bias[:, None, None, : cached + n_clean].expand(self.batch, 1, q, cached + n_clean)
            return torch.cat([seen, self._tail(n_clean, block)], dim=-1)
        return self.key_bias[:, None, None, :kv].expand(self.batch, 1, q, kv)


def _drop_last(cache: Any, n: int) -> None:
    """Remove the last ``n`` positions of every layer (``DynamicCache.crop(-n)`` without its overhead)."""
    if isinstance(cache, StaticKVCache):
        cache.drop_last(n)
        return
    layers = getattr(cache, "layers", None)
    if not layers or any(type(layer) is not DynamicLayer for layer in layers):
        cache.crop(-n)  # other layer types (sliding window, offloaded, ...) know best
        return
    for layer in layers:
        keep = layer.keys.shape[-2] - n
        layer.keys = layer.keys[:, :, :keep]
        layer.values = layer.values[:, :, :keep]


class _BlockDecoder:
    """State of one ``generate`` call: the KV cache, which cache keys are real, masks, counters."""

    def __init__(
        self,
        model: Any,
        data: dict[str, Any],
        opts: DecodingOptions,
        device: torch.device,
        dtype: torch.dtype,
        generator: torch.Generator | None,
    ) -> None:
        from transformers import DynamicCache

        self.model, self.data, self.opts, self.device, self.generator = model, data, opts, device, generator
        input_ids = data["input_ids"]
        self.batch, self.prompt_len = input_ids.shape
        self.B = B = opts.block_size
        self.num_blocks = math.ceil(opts.max_new_tokens / B)
        self.schedule = transfer_schedule(B, opts.denoising_steps)
        self.rule = opts.rule
        self.eos = torch.tensor(opts.eos_token_ids, device=device)
        self.arange_b = torch.arange(B, device=device)
        self.mask_block = torch.full((self.batch, B), opts.mask_token_id, dtype=torch.long, device=device)
        self.pad_block = torch.full((self.batch, B), opts.pad_token_id, dtype=torch.long, device=device)
        valid = data.get("attention_mask")
        valid = torch.ones_like(input_ids, dtype=torch.bool) if valid is None else valid.to(torch.bool)
        if valid.shape != input_ids.shape:
            raise ValueError(f"attention_mask {tuple(valid.shape)} does not match input_ids {tuple(input_ids.shape)}")
        if not bool(valid.any(-1).all()):
            raise ValueError("every prompt needs at least one non-padding token")
        self.valid = valid
        # which cache keys are real: the prompt's padding is not; every response key is
        total = self.prompt_len + self.num_blocks * B
        if opts.compile:  # preallocated cache, every step's shapes fixed, the step compiled
            total = static_length(total)
            self.forward: StepForward | None = compiled_step(model)
            self.cache = StaticKVCache(model.config.text_config, self.batch, total, dtype, device)
        else:
            self.forward = None
            self.cache = DynamicCache(config=model.config.text_config)
        self.key_valid = torch.ones(self.batch, total, dtype=torch.bool, device=device)
        self.key_valid[:, : self.prompt_len] = valid
        self.cached = 0  # number of keys in the cache
        self.masks = _MaskBuilder(model, self.key_valid, dtype, static=opts.compile)
        self.forwards = {"prefill": 0, "denoise": 0, "commit": 0}
        self.revision_forwards = torch.zeros((), dtype=torch.long, device=device)
        self._empty = torch.empty(0, dtype=torch.long, device=device)
        self._prompt: tuple[torch.Tensor, torch.Tensor] | None = None  # prompt positions/blocks awaiting a fused prefill
        self.prefill_run = False  # the running block's first forward is the fused prefill
        # flat logits rows of the noisy block, for q = B (separate) and q = 2B (fused first step)
        rows = torch.arange(self.batch, device=device)[:, None]
        self.noisy_rows = {
            0: (rows * B + self.arange_b).reshape(-1),
            B: (rows * 2 * B + B + self.arange_b).reshape(-1),
        }

    # -------------------------------------------------------------------------------- forwards
    def prefill(self) -> None:
        """Positions of the response; the prompt's forward itself unless ``fused_prefill`` (then block 0's
        first denoising forward also writes the prompt's K/V: :meth:`_fused_prefill_inputs`)."""
        data, B = self.data, self.B
        input_ids = data["input_ids"]
        prompt_pos = self.model.position_ids_for(
            input_ids,
            mm_token_type_ids=data.get("mm_token_type_ids"),
            image_grid_thw=data.get("image_grid_thw"),
            video_grid_thw=data.get("video_grid_thw"),
            attention_mask=self.valid.long(),
        )
        self.response_start = prompt_pos.masked_fill(~self.valid[None], -1).amax(dim=(0, 2)) + 1  # [batch]
        offsets = torch.arange(self.num_blocks * B, device=self.device)
        self.response_positions = self.response_start[:, None] + offsets  # [batch, capacity]
        prompt_block = prompt_block_ids(self.valid, B)
        if self.opts.fused_prefill:
            self._prompt = (prompt_pos, prompt_block)
            return
        mask = self.masks.prefill(self.valid, prompt_block)
        fit_window(self.cache, mask)
        self.model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=prompt_pos,
            past_key_values=self.cache,
            use_cache=True,
            **media_inputs(data),
            logits_positions=self._empty,
        )
        self.forwards["prefill"] += 1
        self.cached = self.prompt_len

    def _fused_prefill_inputs(self, block: torch.Tensor) -> dict[str, Any]:
        """Model inputs of the fused prefill: ``[prompt | block 0]`` in one forward, logits of the noisy block.

        The prompt's queries see what they see in a prefill of their own and the noisy block's what they
        see in a denoising step after it, so the logits equal those of prefill + first step; one forward
        fewer per ``generate``."""
        prompt_pos, prompt_block = self._prompt
        self._prompt = None
        P, B, data = self.prompt_len, self.B, self.data
        media = media_inputs(data)
        if media.get("mm_token_type_ids") is not None:  # the MASK tokens are text
            types = media["mm_token_type_ids"]
            media["mm_token_type_ids"] = torch.cat([types, types.new_zeros(self.batch, B)], dim=1)
        rows = torch.arange(self.batch, device=self.device)[:, None]
        return {
            "input_ids": torch.cat([data["input_ids"], block], dim=1),
            "attention_mask": self.masks.prefill(self.valid, prompt_block, B),
            "position_ids": torch.cat([prompt_pos, self.positions(0)[None].expand(3, self.batch, B)], dim=-1),
            "logits_positions": (rows * (P + B) + P + self.arange_b).reshape(-1),
            **media,
        }

    def positions(self, k: int) -> torch.Tensor:
        """Response positions ``[batch, B]`` of block ``k`` (text positions continue after the prompt)."""
        return self.response_positions[:, k * self.B : (k + 1) * self.B]

    def commit(self, tokens: torch.Tensor, positions: torch.Tensor) -> None:
        """The published separate commit forward: write a finished block's K/V, no logits."""
        commit_block(self.model, self.cache, self.masks, self.cached, tokens, positions)
        self.forwards["commit"] += 1
        self.cached += self.B

    def steps_per_sample(self, histories: list[list[torch.Tensor]]) -> torch.Tensor:
        """Denoising steps per block and sample ``[batch, blocks]`` from the per-step histories (a few ops in all)."""
        block_of_step = torch.tensor([k for k, h in enumerate(histories) for _ in h], device=self.device)
        flat = torch.stack([t for h in histories for t in h])  # [steps, batch(, B)]
        working = flat if self.opts.revise else flat.any(-1)
        counts = torch.zeros(len(histories), self.batch, dtype=torch.long, device=self.device)
        return counts.index_add_(0, block_of_step, working.long()).T

    # -------------------------------------------------------------------------------- inner loop
    def denoise_block(
        self,
        k: int,
        finished: torch.Tensor,
        pending: torch.Tensor | None,
        record: bool = False,
    ) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor | None, torch.Tensor | None]:
        """Denoise block ``k``; ``pending`` = tokens of the finished block ``k - 1`` to write first (fused).

        Runs :meth:`start_block`'s :class:`BlockRun` to the end (one forward per :meth:`BlockRun.step`);
        the only host sync per step is the run's "anyone still working on this block" check.

        Returns:
            ``(tokens [batch, B], history, committed_at [batch, B] | None, confidence [batch, B] | None)``:
            ``history`` holds one tensor per step telling which samples were still working (masked
            positions ``[batch, B]``, or ``[batch]`` with revision; see :meth:`steps_per_sample`);
            the last two only with ``record``.
        """
        run = self.start_block(k, finished, pending, record)
        while not run.step():
            pass
        self.end_block(run)
        return run.block, run.history, run.committed_at, run.confidence

    def start_block(self, k: int, finished: torch.Tensor, pending: torch.Tensor | None,
                    record: bool = False) -> "BlockRun":
        """The :class:`BlockRun` of block ``k`` (the fused prefill with block 0 when it is pending, the fused
        commit of ``pending`` otherwise); call :meth:`end_block` when it is done."""
        B, batch = self.B, self.batch
        block = torch.where(finished[:, None], self.pad_block, self.mask_block)
        masked = ~finished[:, None].expand(batch, B)
        if self._prompt is not None:  # block 0's first step is the fused prefill: the prompt is its clean part
            first = self._fused_prefill_inputs(block)
            steady = block_inputs(self.masks, self.prompt_len, self.positions(0))[1]
            n_clean, self.prefill_run = self.prompt_len, True
        else:
            clean_pos = self.positions(k - 1) if pending is not None else None
            first, steady = block_inputs(self.masks, self.cached, self.positions(k), pending, clean_pos)
            n_clean, self.prefill_run = (B if pending is not None else 0), False
        self.cached += n_clean  # the clean queries' K/V stay in the cache after the first forward
        return BlockRun(self.model, self.cache, self.opts, first, steady, block, masked, schedule=self.schedule,
                        eos=self.eos, generator=self.generator, active=~finished if self.opts.revise else None,
                        record=record, forward=self.forward, eager_first=self.prefill_run)

    def end_block(self, run: "BlockRun") -> None:
        """Count a finished run's forwards (its first is the prefill with a fused prefill)."""
        first = "prefill" if self.prefill_run else "denoise"
        self.forwards[first] += min(run.forwards, 1)
        self.forwards["denoise"] += max(run.forwards - 1, 0)
        self.revision_forwards += run.revision_forwards
        self.prefill_run = False


def block_inputs(masks: _MaskBuilder, cached: int, positions: torch.Tensor, pending: torch.Tensor | None = None,
                 clean_positions: torch.Tensor | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Model inputs of one block's denoising forwards over a cache of ``cached`` keys, masks from ``masks``.

    Returns ``(first, steady)``: ``first`` holds the inputs of the block's first forward without its tokens
    (with ``pending``, the finished previous block at ``clean_positions`` comes first as clean queries: the
    fused commit; its ``input_ids`` are the pending tokens then), ``steady`` those of every later step. Rows
    may sit at different positions (``positions`` is ``[batch, B]``), so the same inputs serve ``generate``
    and the server's cohorts.
    """
    batch, B = positions.shape
    rows = torch.arange(batch, device=positions.device)[:, None]
    arange = torch.arange(B, device=positions.device)
    steady = {"attention_mask": masks.step(cached + (B if pending is not None else 0), 0, B),
              "position_ids": positions[None].expand(3, batch, B), "logits_positions": (rows * B + arange).reshape(-1)}
    if pending is None:
        return dict(steady, attention_mask=masks.step(cached, 0, B)), steady
    both = torch.cat([clean_positions, positions], dim=1)
    first = {"clean_ids": pending, "attention_mask": masks.step(cached, B, B),
             "position_ids": both[None].expand(3, batch, 2 * B), "logits_positions": (rows * 2 * B + B + arange).reshape(-1)}
    return first, steady


def commit_block(model: Any, cache: Any, masks: _MaskBuilder, cached: int, tokens: torch.Tensor,
                 positions: torch.Tensor) -> None:
    """The published separate commit forward (``fused_commit=False``): write the finished block ``tokens``
    ``[batch, B]`` at ``positions`` to the cache of ``cached`` keys, no logits."""
    batch, B = tokens.shape
    mask = masks.step(cached, B, 0)
    fit_window(cache, mask)
    model(input_ids=tokens, attention_mask=mask, position_ids=positions[None].expand(3, batch, B),
          past_key_values=cache, use_cache=True, logits_positions=torch.empty(0, dtype=torch.long, device=tokens.device))


class BlockRun:
    """The denoising of one block for a batch, one forward per :meth:`step`: the decoder's inner loop.

    ``generate`` runs it to the end for each block; the server's batcher steps the runs of several cohorts
    in turn (one forward each), so that a long block does not hold a short one back. Each step proposes a
    token per masked position, commits some (:func:`~.unmasking.select_commits`, at least the schedule's
    minimum), optionally revises committed ones, and ends a sample's block at its end-of-answer (see
    :class:`DecodingOptions`). Every decision is taken from the sample's own rows.

    Args:
        first: inputs of the first forward (:func:`block_inputs`, or the fused prefill's with the block's
            tokens in ``input_ids``); ``steady``: the inputs of every later forward.
        block, masked: ``[batch, B]`` starting tokens and which of them are still to decode.
        active: ``[batch]`` samples still decoding (revision only).
        forward: the step forward (:func:`~.static.compiled_step`) for every forward of the run, the first one
            too unless ``eager_first`` (a fused prefill: its length varies with the prompt, it stays eager);
            ``None``: the model's own forward.
    """

    def __init__(self, model: Any, cache: Any, opts: DecodingOptions, first: dict[str, Any], steady: dict[str, Any],
                 block: torch.Tensor, masked: torch.Tensor, *, schedule: list[int], eos: torch.Tensor,
                 generator: torch.Generator | None = None, active: torch.Tensor | None = None,
                 record: bool = False, forward: StepForward | None = None, eager_first: bool = False) -> None:
        self.model, self.cache, self.opts, self.steady = model, cache, opts, steady
        self.forward, self.eager_first = forward, eager_first
        # greedy decoding without revision or recording: forward and commits as one compiled graph
        self.greedy = self.decision = None
        if forward is not None and not opts.temperature and not opts.revise and not record and opts.rule.score != "random":
            self.greedy = compile_for(model, "greedy_step", functools.partial(greedy_step, eager_step(model)))
            self.decision = dict(dynamic=opts.rule.dynamic, threshold=float(opts.confidence_threshold),
                                 budget=opts.rule.budget, score=opts.rule.score, top_k=opts.top_k, top_p=float(opts.top_p),
                                 mask_token_id=opts.mask_token_id, eos_exit=opts.eos_exit)
        self.schedule, self.eos, self.generator = schedule, eos, generator
        self.block, self.masked, self.active = block, masked, active
        batch, B = block.shape
        self.B = B
        clean = first.pop("clean_ids", None)
        if "input_ids" not in first:
            first["input_ids"] = block if clean is None else torch.cat([clean, block], dim=1)
        self.inputs: dict[str, Any] | None = first
        self.index = 0  # steps taken
        self.forwards = 0
        self.done = False
        self.history: list[torch.Tensor] = []  # per step: who was still working
        self.revision_forwards = torch.zeros((), dtype=torch.long, device=block.device)
        self.extra = torch.zeros(batch, dtype=torch.long, device=block.device) if opts.revise else None
        self.committed_at = self.confidence = None
        if record:
            self.committed_at = torch.full((batch, B), -1, dtype=torch.long, device=block.device)
            self.confidence = torch.zeros(batch, B, dtype=torch.float32, device=block.device)

    def step(self) -> bool:
        """One denoising forward and its commits; ``True`` when the block is finished for every sample."""
        block, masked = self.block, self.masked
        inputs = self.inputs if self.inputs is not None else dict(self.steady, input_ids=block)
        self.inputs = None
        k_min = self.schedule[min(self.index, len(self.schedule) - 1)]
        fit_window(self.cache, inputs["attention_mask"])  # a static cache reads as many keys as the mask covers
        compiled = self.forward is not None and not (self.eager_first and self.index == 0)
        if compiled and self.greedy is not None:  # forward and commits in one compiled graph
            self.history.append(masked)
            self.block, self.masked = self.greedy(inputs["input_ids"], inputs["attention_mask"], inputs["position_ids"],
                                                  inputs["logits_positions"], self.cache, block, masked, self.eos,
                                                  k_min=k_min, **self.decision)
            working = self.masked.any()
        else:
            if compiled:
                logits = self.forward(inputs["input_ids"], inputs["attention_mask"], inputs["position_ids"],
                                      inputs["logits_positions"], self.cache)
            else:
                logits = self.model(**inputs, past_key_values=self.cache, use_cache=True).logits
            working = self._commit(logits.view(*block.shape, -1), k_min)
        _drop_last(self.cache, self.B)  # drop the noisy block's K/V; fused clean (prompt or block) K/V stay
        self.forwards += 1
        self.index += 1
        self.done = not bool(working)
        return self.done

    def _commit(self, logits: torch.Tensor, k_min: int) -> torch.Tensor:
        """Propose from ``logits`` ``[batch, B, V]``, commit (and revise), end answers; returns "anyone still working"."""
        opts, rule, revise = self.opts, self.opts.rule, self.opts.revise
        block, masked = self.block, self.masked
        proposal, score, prob = propose_tokens(logits, temperature=opts.temperature, top_k=opts.top_k, top_p=opts.top_p,
                                               score=rule.score, generator=self.generator,
                                               suppress_token_id=opts.mask_token_id)
        commit = select_commits(score, masked, k_min, dynamic=rule.dynamic, threshold=opts.confidence_threshold,
                                budget=rule.budget)
        if revise:
            active = self.active
            self.history.append(active)
            had_masked = masked.any(-1)
            self.revision_forwards += (~had_masked.any()).long()
            self.extra += (active & ~had_masked).long()
            revised = active[:, None] & ~masked & (proposal != block) & (prob > opts.revision_threshold)
            update = commit | revised
        else:
            self.history.append(masked)
            update = commit
        self.block = block = torch.where(update, proposal, block)
        if self.committed_at is not None:
            self.committed_at = torch.where(update, self.index, self.committed_at)
            self.confidence = torch.where(update, score, self.confidence)
        masked = masked ^ commit  # commit is a subset of masked
        if opts.eos_exit and not revise:
            masked = close_at_eos(block, masked, self.eos)
        self.masked = masked
        if revise:
            self.active = masked.any(-1) | (revised.any(-1) & (self.extra < opts.max_revision_steps))
            return self.active.any()
        return masked.any()

    def steps_per_sample(self) -> torch.Tensor:
        """Denoising steps each sample took part in ``[batch]``."""
        flat = torch.stack(self.history)
        return (flat if self.opts.revise else flat.any(-1)).long().sum(0)


def close_at_eos(block: torch.Tensor, masked: torch.Tensor, eos: torch.Tensor) -> torch.Tensor:
    """End of answer (``eos_exit``): once a sample's block ``[batch, B]`` holds a committed EOS with every position
    before it committed, nothing after it can reach the output (committed tokens are final), so the sample stops
    working on the block -- same output, fewer forwards. Returns the new ``masked`` ``[batch, B]``."""
    open_before = (masked.long().cumsum(-1) - masked.long()) > 0
    closed = (torch.isin(block, eos) & ~masked & ~open_before).any(-1)
    return masked & ~closed[:, None]


def greedy_step(forward: StepForward, input_ids: torch.Tensor, attention_mask: Any, position_ids: torch.Tensor,
                logits_positions: torch.Tensor, cache: Any, block: torch.Tensor, masked: torch.Tensor,
                eos: torch.Tensor, *, k_min: int, dynamic: bool, threshold: float, budget: bool, score: str, top_k: int,
                top_p: float, mask_token_id: int, eos_exit: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """One greedy denoising step as a pure function (what :class:`BlockRun` compiles): the forward, the proposal,
    the commits and the end-of-answer check, the same rules as :meth:`BlockRun.step`. Returns the new
    ``(block, masked)``, both ``[batch, B]``."""
    batch, B = block.shape
    logits = forward(input_ids, attention_mask, position_ids, logits_positions, cache).view(batch, B, -1)
    proposal, value, _ = propose_tokens(logits, top_k=top_k, top_p=top_p, score=score, suppress_token_id=mask_token_id)
    commit = select_commits(value, masked, k_min, dynamic=dynamic, threshold=threshold, budget=budget)
    block = torch.where(commit, proposal, block)
    masked = masked ^ commit
    return block, (close_at_eos(block, masked, eos) if eos_exit else masked)


def check_model_inputs(model: Any, data: Mapping[str, Any]) -> None:
    """Refuse inconsistent inputs with a message naming them (instead of an error deep inside the model):
    an empty batch, ids outside the model's vocabulary, image / video placeholders without pixel inputs or
    pixel inputs without placeholders."""
    ids = data["input_ids"]
    if ids.shape[0] == 0:
        raise ValueError("generate got an empty batch (input_ids of shape [0, ...])")
    vocab = int(model.config.text_config.vocab_size)
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= vocab:
        raise ValueError(f"input_ids hold ids in [{low}, {high}], outside the model's vocabulary of {vocab} "
                         "(a tokenizer that does not belong to this checkpoint?)")
    valid = data.get("attention_mask")
    valid = ids.new_ones(ids.shape, dtype=torch.bool) if valid is None else valid.bool()
    for kind, token_key, pixel_key, grid_key in (("image", "image_token_id", "pixel_values", "image_grid_thw"),
                                                 ("video", "video_token_id", "pixel_values_videos", "video_grid_thw")):
        token_id = getattr(model.config, token_key, None)
        placeholders = int(((ids == token_id) & valid).sum()) if token_id is not None else 0
        has_pixels = data.get(pixel_key) is not None
        if placeholders and not has_pixels:
            raise ValueError(f"input_ids hold {placeholders} {kind} placeholder tokens but no {pixel_key} were given "
                             "(pass the processor's whole output)")
        if has_pixels and not placeholders:
            raise ValueError(f"{pixel_key} were given but input_ids hold no {kind} placeholder tokens")
        if has_pixels and data.get(grid_key) is None:
            raise ValueError(f"{pixel_key} need {grid_key} (pass the processor's whole output)")


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
    fused_prefill: bool | None = None,
    revise: bool | None = None,
    revision_threshold: float | None = None,
    max_revision_steps: int | None = None,
    eos_exit: bool | None = None,
    compile: bool | None = None,
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
        model: a :class:`BardVLForConditionalGeneration` (any model with its forward contract:
            4-D additive masks, ``position_ids_for``, ``logits_positions``).
        inputs: the processor's ``BatchFeature`` (``input_ids``, ``attention_mask``, pixel inputs,
            ``mm_token_type_ids``) or an ``input_ids`` tensor. Left or right padding both work.
        max_new_tokens, block_size, denoising_steps, temperature, top_k, top_p,
        remasking_strategy, confidence_threshold: as in the published API; ``None`` takes the
            value from ``generation_config`` / ``model.generation_config``, then the defaults.
        return_step_stats: also return a statistics dict (published keys ``block_step_counts``,
            ``num_response_tokens``, ``num_denoising_steps``, ``tpf`` plus ``forwards_total``,
            ``tokens_per_forward``, ``forwards_per_sample`` ...), every forward counted and tokens
            counted up to EOS. ``tokens_per_forward`` divides by the batch's forwards (a sample that
            finished early still waits for the others); ``forwards_per_sample`` holds the forwards each
            sample itself took part in until its EOS (prefill included), i.e. what it costs at batch 1.
        fused_commit: write a finished block's K/V in the next block's first forward (default).
        fused_prefill: run the prompt and block 0's first denoising step as one forward (default; same
            output, one forward fewer; ``False``: the published separate prefill forward).
        revise: allow replacing committed tokens of the current block when the model now prefers
            another token with probability above ``revision_threshold``; a sample whose block is
            complete gets at most ``max_revision_steps`` extra forwards per block for that.
        eos_exit: end a block for a sample once it holds a committed EOS with every earlier position
            committed (default; the output is the same as with ``False``, which keeps denoising the
            positions after the EOS as the published decoder does). Not applied with ``revise``.
        compile: decode with a preallocated KV cache and a compiled step (:mod:`.static`): the same tokens, each
            forward cheaper; the first call with a new (batch, block size, cache length bucket) compiles its graphs
            (seconds), later calls reuse them. Needs ``sdpa``/``eager`` attention. Default ``False``.
        mask_token_id, eos_token_id, pad_token_id: override the checkpoint's ids.
        block_callback: ``f(block_index, tokens [batch, B], finished [batch])`` after each block
            (streaming); ``tokens`` are what the output will hold (pad after EOS).
        record_trajectory: store, per block, the step at which each position was committed and
            the score it had (``stats["trajectory"]``; render with :mod:`.trajectory`).
        generator: random generator for sampling / the ``random`` rule (on the model's device).

    Raises:
        ValueError: bad option values (see :func:`resolve_options`) or inputs.

    Example:
        >>> ids, stats = block_diffusion_generate(model, batch, max_new_tokens=64, block_size=8,
        ...                                       return_step_stats=True)   # doctest: +SKIP
        >>> stats["forwards_total"], stats["tokens_per_forward"]            # doctest: +SKIP
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
        fused_prefill=fused_prefill,
        revise=revise,
        revision_threshold=revision_threshold,
        max_revision_steps=max_revision_steps,
        eos_exit=eos_exit,
        compile=compile,
        mask_token_id=mask_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    data = _model_inputs(inputs, model_inputs, device)
    check_model_inputs(model, data)
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
    dec = _BlockDecoder(model, data, opts, device, dtype, generator)
    batch, B = dec.batch, dec.B
    dec.prefill()

    blocks: list[torch.Tensor] = []
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    histories: list[list[torch.Tensor]] = []
    trajectory: list[dict[str, Any]] = []
    pending: torch.Tensor | None = None  # finished block not yet in the cache (fused commit)

    for k in range(dec.num_blocks):
        block, history, committed_at, confidence = dec.denoise_block(k, finished, pending, record_trajectory)
        pending = None
        is_eos = block == opts.eos_token_ids[0] if len(opts.eos_token_ids) == 1 else torch.isin(block, dec.eos)
        if block_callback is not None or record_trajectory:
            # what the output will hold: pad after a sample's first EOS (earlier-finished samples are pad already)
            after = (is_eos.cumsum(-1) - is_eos.long()) > 0
            block = block.masked_fill(after, opts.pad_token_id)
        blocks.append(block)
        histories.append(history)
        if record_trajectory:
            trajectory.append(
                {
                    "block": k,
                    "committed_at": committed_at.cpu(),
                    "confidence": confidence.cpu(),
                    "tokens": block.cpu(),
                    "active": (~finished).cpu(),
                }
            )
        finished = finished | is_eos.any(-1)
        if block_callback is not None:
            block_callback(k, block.clone(), finished.clone())
        if k == dec.num_blocks - 1 or bool(finished.all()):
            break
        if opts.fused_commit:
            pending = block
        else:
            dec.commit(block, dec.positions(k))

    blocks_done = len(blocks)
    generated = torch.cat(blocks, dim=1)[:, : opts.max_new_tokens]
    is_eos = torch.isin(generated, dec.eos)
    after_eos = (is_eos.long().cumsum(-1) - is_eos.long()) > 0  # strictly after the first EOS
    generated = generated.masked_fill(after_eos, opts.pad_token_id)
    lengths = (~after_eos).sum(-1)  # tokens up to and including EOS
    width = int(lengths.max()) if batch else 0
    sequences = generated[:, :width]

    forwards = dec.forwards
    total_forwards = sum(forwards.values())
    block_steps = dec.steps_per_sample(histories).cpu()
    lengths_list = lengths.cpu().tolist()
    num_tokens = int(sum(lengths_list))
    # forwards each sample took part in until its EOS: prefill, its denoising steps, the separate commit
    # forwards between its blocks (not with fused commit), and every revision forward
    active_blocks = (block_steps > 0).sum(-1)
    commits = torch.zeros_like(active_blocks) if opts.fused_commit else (active_blocks - 1).clamp(min=0)
    # a fused prefill is also block 0's first denoising step (counted once, as the prefill)
    fused_steps = int(opts.fused_prefill)
    per_sample_forwards = (forwards["prefill"] + block_steps.sum(-1) - fused_steps + commits
                           + int(dec.revision_forwards))
    stats: dict[str, Any] = {
        # published keys (honest values: tokens up to EOS; batch 1 gives plain ints/lists)
        "block_step_counts": block_steps[0].tolist() if batch == 1 else block_steps.tolist(),
        "num_response_tokens": num_tokens,
        "num_denoising_steps": forwards["denoise"] + fused_steps,
        "tpf": num_tokens / max(batch * (forwards["denoise"] + fused_steps), 1),
        # honest additions
        "forwards_total": total_forwards,
        "prefill_forwards": forwards["prefill"],
        "denoising_forwards": forwards["denoise"],
        "commit_forwards": forwards["commit"],
        "revision_forwards": int(dec.revision_forwards),
        "tokens_per_forward": num_tokens / max(batch * total_forwards, 1),
        "response_tokens_per_sample": lengths_list,
        "forwards_per_sample": per_sample_forwards.tolist(),
        "num_blocks": blocks_done,
        "block_size": B,
        "denoising_steps": opts.denoising_steps,
        "remasking_strategy": opts.remasking_strategy,
        "confidence_threshold": float(opts.confidence_threshold),
        "fused_commit": opts.fused_commit,
        "fused_prefill": opts.fused_prefill,
    }
    if record_trajectory:
        stats["trajectory"] = trajectory
    return DecodingResult(sequences=sequences, stats=stats)


__all__ = ["BlockCallback", "BlockRun", "DecodingOptions", "DecodingResult", "block_diffusion_generate", "block_inputs",
           "commit_block", "resolve_options"]
