"""Continuous batching at block granularity for block-diffusion decoding.

Requests that decode with the same options (block size, steps, rule, threshold, sampling settings: a
*cohort*) share one batch and one KV cache. The batch advances one block at a time; between two blocks
the batcher

* **admits** waiting requests: each new prompt is prefilled on its own (batch 1, the same forward as
  ``generate`` at batch 1) and its cache rows are merged into the cohort's cache, left-padded with keys
  that no query may see;
* **retires** requests whose block held their EOS, that reached their ``max_new_tokens`` or that were
  cancelled: their cache rows are dropped, and cache columns that no remaining request can see are cut.

A request therefore joins at the next block boundary and leaves when it ends; it never waits for the
whole batch. Requests with different options go to different cohorts, which take turns block by block.

Within a block the loop is the decoding engine's (:mod:`nemo_automodel_bard.decoding.engine`): fused
commit (the previous block's K/V are written by the next block's first forward), the engine's
unmasking rules (:func:`~nemo_automodel_bard.decoding.unmasking.propose_tokens`,
:func:`~nemo_automodel_bard.decoding.unmasking.select_commits`), end-of-answer exit. Every per-request
decision is taken from that request's own rows, and keys of other requests or padding are hidden by
the attention mask, so with greedy decoding a request's tokens do not depend on its batch mates: they
are the tokens ``model.generate`` gives for it alone (the tests check this). With sampling
(``temperature > 0``) the random draws are shared by the cohort, so answers depend on the schedule.

Only dense attention (SDPA / eager) is supported here (the server loads the model with SDPA).
"""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from nemo_automodel_bard.decoding.inputs import media_inputs
from nemo_automodel_bard.decoding.unmasking import propose_tokens, select_commits, transfer_schedule

#: ``f(new_token_ids, finished)`` after each committed block of a request (ids cut at EOS / max_new_tokens)
BlockListener = Callable[[list[int], bool], None]


class QueueFull(RuntimeError):
    """The batcher's waiting queue is at its bound; retry later."""


class BatcherStopped(RuntimeError):
    """The batcher was shut down."""


@dataclass
class Request:
    """One prompt to decode: the processor output for a single, unpadded prompt and resolved options.

    ``options`` is a :class:`~nemo_automodel_bard.decoding.engine.DecodingOptions` (its
    ``max_new_tokens`` is this request's own). Results are filled in by the batcher; ``done`` is set
    when ``tokens`` / ``stats`` (or ``error``) are final.
    """

    inputs: dict[str, Any]
    options: Any
    on_block: BlockListener | None = None
    on_done: Callable[[], None] | None = None
    tokens: list[int] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)
    cancelled: bool = False
    submitted_at: float = field(default_factory=time.perf_counter)

    def cancel(self) -> None:
        """Leave at the next block boundary (e.g. the client went away, or a stop string was seen)."""
        self.cancelled = True

    def wait(self, timeout: float | None = None) -> list[int]:
        if not self.done.wait(timeout):
            raise TimeoutError("the request did not finish in time")
        if self.error is not None:
            raise self.error
        return self.tokens


def cohort_key(opts: Any) -> tuple:
    """Options that must be equal for requests to share a batch (everything but ``max_new_tokens``)."""
    if getattr(opts, "revise", False) or not getattr(opts, "fused_commit", True) or not getattr(opts, "eos_exit", True):
        raise ValueError("the batcher decodes with fused_commit=True, eos_exit=True and without revision")
    return (
        opts.block_size,
        opts.denoising_steps,
        opts.remasking_strategy,
        float(opts.confidence_threshold),
        float(opts.temperature),
        int(opts.top_k),
        float(opts.top_p),
        opts.mask_token_id,
        tuple(opts.eos_token_ids),
        opts.pad_token_id,
    )


@dataclass
class _Member:
    request: Request
    start: int  # first response position
    num_blocks: int
    blocks_done: int = 0
    pending: torch.Tensor | None = None  # last block, K/V not yet in the cache (fused commit)
    steps: list[int] = field(default_factory=list)
    batch_sizes: list[int] = field(default_factory=list)
    first_block_at: float | None = None
    started_at: float = 0.0


def _layers(cache: Any) -> list[Any]:
    layers = getattr(cache, "layers", None)
    if not layers:
        raise TypeError("the batcher needs a transformers DynamicCache with per-layer keys/values")
    return layers


class _Cohort:
    """The running batch of one option set: members, their shared KV cache and which keys are real."""

    def __init__(self, model: Any, opts: Any, generator: torch.Generator | None) -> None:
        self.model, self.opts, self.generator = model, opts, generator
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.min = torch.finfo(self.dtype).min
        self.B = opts.block_size
        self.schedule = transfer_schedule(self.B, opts.denoising_steps)
        self.eos = torch.tensor(opts.eos_token_ids, device=self.device)
        self.members: list[_Member] = []
        self.cache: Any = None
        self.key_valid: torch.Tensor | None = None  # [batch, cached]
        self.forwards = 0

    # ------------------------------------------------------------------------------ joining
    def prefill(self, request: Request) -> tuple[Any, int]:
        """Prefill one prompt alone (exactly ``generate``'s prefill at batch 1); return (cache, start)."""
        from transformers import DynamicCache

        model, B = self.model, self.B
        data = {k: (v.to(self.device) if isinstance(v, torch.Tensor) else v) for k, v in request.inputs.items()}
        ids = data["input_ids"]
        if ids.ndim != 2 or ids.shape[0] != 1 or ids.shape[1] == 0:
            raise ValueError(f"a request holds one unpadded prompt, got input_ids of shape {tuple(ids.shape)}")
        mask = data.get("attention_mask")
        if mask is not None and not bool(mask.bool().all()):
            raise ValueError("a request's prompt must not be padded")
        from nemo_automodel_bard.decoding.engine import check_model_inputs

        check_model_inputs(model, data)
        valid = torch.ones_like(ids, dtype=torch.bool)
        positions = model.position_ids_for(
            ids,
            mm_token_type_ids=data.get("mm_token_type_ids"),
            image_grid_thw=data.get("image_grid_thw"),
            video_grid_thw=data.get("video_grid_thw"),
            attention_mask=valid.long(),
        )
        start = int(positions.amax()) + 1
        P = ids.shape[1]
        block = torch.arange(P, device=self.device) // B
        visible = block[None, :] <= block[:, None]
        additive = torch.zeros(1, 1, P, P, dtype=self.dtype, device=self.device).masked_fill_(~visible, self.min)
        cache = DynamicCache(config=model.config.text_config)
        model(
            input_ids=ids,
            attention_mask=additive,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            **media_inputs(data),
            logits_positions=torch.empty(0, dtype=torch.long, device=self.device),
        )
        return cache, start

    def admit(self, request: Request) -> None:
        """Prefill ``request`` and add it to the batch (at a block boundary)."""
        started = time.perf_counter()
        cache, start = self.prefill(request)
        length = _layers(cache)[0].keys.shape[-2]
        valid = torch.ones(1, length, dtype=torch.bool, device=self.device)
        if self.cache is None:
            self.cache, self.key_valid = cache, valid
        else:
            cached = self.key_valid.shape[1]
            width = max(cached, length)
            for mine, theirs in zip(_layers(self.cache), _layers(cache)):
                mine.keys = torch.cat([_left_pad(mine.keys, width), _left_pad(theirs.keys, width)], dim=0)
                mine.values = torch.cat([_left_pad(mine.values, width), _left_pad(theirs.values, width)], dim=0)
            pad_mine = self.key_valid.new_zeros(self.key_valid.shape[0], width - cached)
            pad_new = valid.new_zeros(1, width - length)
            self.key_valid = torch.cat(
                [torch.cat([pad_mine, self.key_valid], 1), torch.cat([pad_new, valid], 1)], dim=0
            )
        opts = request.options
        member = _Member(request=request, start=start, num_blocks=-(-opts.max_new_tokens // self.B), started_at=started)
        self.members.append(member)

    # ------------------------------------------------------------------------------ leaving
    def retire(self, keep: list[int]) -> None:
        """Keep only the members at ``keep``; drop their cache rows and the columns nobody can see."""
        if len(keep) == len(self.members):
            return
        self.members = [self.members[i] for i in keep]
        if not keep:
            self.cache = self.key_valid = None
            return
        index = torch.tensor(keep, device=self.device)
        key_valid = self.key_valid.index_select(0, index)
        seen = key_valid.any(0)
        first = int(seen.nonzero()[0]) if bool(seen.any()) else 0  # leading columns no member can see
        self.key_valid = key_valid[:, first:]
        for layer in _layers(self.cache):
            layer.keys = layer.keys.index_select(0, index)[:, :, first:]
            layer.values = layer.values.index_select(0, index)[:, :, first:]

    # ------------------------------------------------------------------------------ one block
    def run_block(self) -> list[_Member]:
        """Denoise the next block of every member; return the members that finished with it."""
        opts, B, model, cache = self.opts, self.B, self.model, self.cache
        members = self.members
        batch = len(members)
        device = self.device
        arange = torch.arange(B, device=device)
        noisy_pos = torch.tensor([m.start + m.blocks_done * B for m in members], device=device)[:, None] + arange
        block = torch.full((batch, B), opts.mask_token_id, dtype=torch.long, device=device)
        masked = torch.ones(batch, B, dtype=torch.bool, device=device)
        has_pending = [m.pending is not None for m in members]
        cached = self.key_valid.shape[1]
        if any(has_pending):
            clean = torch.stack(
                [m.pending if m.pending is not None else block.new_full((B,), opts.pad_token_id) for m in members]
            )
            # a member that just joined has no finished block to write: its clean slot is padding nobody sees
            clean_pos = torch.stack(
                [noisy_pos[i] - B if has_pending[i] else noisy_pos[i] for i in range(batch)]
            )
            clean_valid = torch.tensor(has_pending, device=device)[:, None].expand(batch, B)
            key_valid = torch.cat([self.key_valid, clean_valid], dim=1)
            bias = torch.zeros(key_valid.shape, dtype=self.dtype, device=device).masked_fill_(~key_valid, self.min)
            tail = torch.zeros(batch, 1, 2 * B, B, dtype=self.dtype, device=device)
            tail[:, :, :B] = self.min  # clean queries do not see the noisy block
            mask = torch.cat([bias[:, None, None, :].expand(batch, 1, 2 * B, cached + B), tail], dim=-1)
            tokens_in = torch.cat([clean, block], dim=1)
            pos_in = torch.cat([clean_pos, noisy_pos], dim=1)
            n_clean = B
        else:
            key_valid = self.key_valid
            tokens_in, pos_in, n_clean, mask = block, noisy_pos, 0, None
        rows = torch.arange(batch, device=device)[:, None]
        step = 0
        steps = torch.zeros(batch, dtype=torch.long, device=device)
        while True:
            q = tokens_in.shape[1]
            if mask is None:
                bias = torch.zeros(key_valid.shape, dtype=self.dtype, device=device).masked_fill_(~key_valid, self.min)
                full = torch.cat([bias, bias.new_zeros(batch, B)], dim=1)
                mask = full[:, None, None, :].expand(batch, 1, q, full.shape[1])
            logits = model(
                input_ids=tokens_in,
                attention_mask=mask,
                position_ids=pos_in[None].expand(3, batch, q),
                past_key_values=cache,
                use_cache=True,
                logits_positions=(rows * q + n_clean + arange).reshape(-1),
            ).logits.view(batch, B, -1)
            self.forwards += 1
            for layer in _layers(cache):  # drop the noisy block's K/V; a fused clean block's K/V stay
                keep = layer.keys.shape[-2] - B
                layer.keys = layer.keys[:, :, :keep]
                layer.values = layer.values[:, :, :keep]
            if n_clean:
                n_clean, tokens_in, pos_in = 0, block, noisy_pos
                self.key_valid = key_valid
            mask = None if q != B else mask  # the steady mask is rebuilt once after the fused step
            proposal, score, _ = propose_tokens(
                logits,
                temperature=opts.temperature,
                top_k=opts.top_k,
                top_p=opts.top_p,
                score=opts.rule.score,
                generator=self.generator,
                suppress_token_id=opts.mask_token_id,
            )
            k_min = self.schedule[min(step, len(self.schedule) - 1)]
            commit = select_commits(score, masked, k_min, dynamic=opts.rule.dynamic, threshold=opts.confidence_threshold,
                                    budget=opts.rule.budget)
            steps += masked.any(-1).long()
            block = torch.where(commit, proposal, block)
            masked = masked ^ commit
            open_before = (masked.long().cumsum(-1) - masked.long()) > 0
            closed = (torch.isin(block, self.eos) & ~masked & ~open_before).any(-1)
            masked = masked & ~closed[:, None]
            step += 1
            if not bool(masked.any()):
                break
            tokens_in = block
        self.key_valid = key_valid
        return self._finish_block(block, steps.tolist(), batch)

    def _finish_block(self, block: torch.Tensor, steps: list[int], batch: int) -> list[_Member]:
        now = time.perf_counter()
        eos = set(self.opts.eos_token_ids)
        ended: list[_Member] = []
        rows = block.tolist()
        for member, row, n_steps in zip(self.members, rows, steps):
            request = member.request
            room = request.options.max_new_tokens - member.blocks_done * self.B
            new = row[:room]
            hit = next((i for i, t in enumerate(new) if t in eos), None)
            if hit is not None:
                new = new[: hit + 1]
            member.blocks_done += 1
            member.steps.append(n_steps)
            member.batch_sizes.append(batch)
            member.first_block_at = member.first_block_at or now
            request.tokens.extend(new)
            finished = hit is not None or member.blocks_done >= member.num_blocks
            if request.on_block is not None:
                try:
                    request.on_block(list(new), finished)
                except Exception:  # noqa: BLE001 - a broken listener (gone client) only ends its own request
                    request.cancel()
            if finished or request.cancelled:
                ended.append(member)
        index = {id(m) for m in ended}
        for i, member in enumerate(self.members):
            if id(member) not in index:
                member.pending = block[i]
        return ended


def _left_pad(tensor: torch.Tensor, width: int) -> torch.Tensor:
    """Left-pad ``[batch, heads, seq, dim]`` with zeros to ``seq = width``."""
    missing = width - tensor.shape[-2]
    if missing <= 0:
        return tensor
    pad = tensor.new_zeros(*tensor.shape[:-2], missing, tensor.shape[-1])
    return torch.cat([pad, tensor], dim=-2)


def _member_stats(member: _Member, cohort: _Cohort) -> dict[str, Any]:
    request = member.request
    forwards = 1 + sum(member.steps)  # its prefill and every denoising step it took part in
    n = len(request.tokens)
    elapsed = time.perf_counter() - member.started_at
    return {
        "num_response_tokens": n,
        "block_step_counts": list(member.steps),
        "num_blocks": member.blocks_done,
        "forwards": forwards,
        "tokens_per_forward": n / forwards,
        "block_size": cohort.B,
        "denoising_steps": cohort.opts.denoising_steps,
        "remasking_strategy": cohort.opts.remasking_strategy,
        "confidence_threshold": float(cohort.opts.confidence_threshold),
        "mean_batch_size": sum(member.batch_sizes) / max(len(member.batch_sizes), 1),
        "queue_s": member.started_at - request.submitted_at,
        "first_block_s": (member.first_block_at or time.perf_counter()) - request.submitted_at,
        "decode_s": elapsed,
        "tokens_per_second": n / max(elapsed, 1e-9),
        "cancelled": bool(request.cancelled),
    }


class ContinuousBatcher:
    """A worker thread that decodes submitted :class:`Request` s with continuous batching.

    Args:
        model: a Bard-VL model with dense attention, in eval mode.
        max_batch: most requests in one cohort's batch (more wait for a place).
        max_queue: most requests waiting to start; :meth:`submit` raises :class:`QueueFull` beyond it.
        seed: seed of the sampling generator (``temperature > 0`` only).
    """

    def __init__(self, model: Any, *, max_batch: int = 16, max_queue: int = 64, seed: int = 0) -> None:
        if getattr(model, "uses_flex_attention", False):
            raise ValueError("the continuous batcher needs dense attention (load the model with SDPA or eager)")
        if max_batch < 1 or max_queue < 0:
            raise ValueError("max_batch must be >= 1 and max_queue >= 0")
        self.model, self.max_batch, self.max_queue, self.seed = model, max_batch, max_queue, seed
        self.waiting: collections.deque[Request] = collections.deque()
        self.cohorts: dict[tuple, _Cohort] = {}
        self.lock = threading.Condition()
        self.stopped = False
        self.blocks_run = 0
        self.busy = False
        self.thread = threading.Thread(target=self._loop, name="bard-vl-batcher", daemon=True)
        self.thread.start()

    # ------------------------------------------------------------------------------ API
    def submit(self, request: Request) -> Request:
        """Queue ``request`` (it joins a batch at the next block boundary). Raises :class:`QueueFull`."""
        cohort_key(request.options)  # refuse unsupported option sets here, not in the worker
        with self.lock:
            if self.stopped:
                raise BatcherStopped("the batcher is shut down")
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are waiting (the bound is {self.max_queue}); retry later")
            request.submitted_at = time.perf_counter()
            self.waiting.append(request)
            self.lock.notify()
        return request

    def generate(self, request: Request, timeout: float | None = None) -> list[int]:
        """Submit and wait (for callers on other threads)."""
        return self.submit(request).wait(timeout)

    @property
    def queued(self) -> int:
        return len(self.waiting)

    @property
    def running(self) -> int:
        return sum(len(c.members) for c in list(self.cohorts.values()))

    def shutdown(self, timeout: float = 10.0) -> None:
        with self.lock:
            self.stopped = True
            self.lock.notify_all()
        self.thread.join(timeout)

    # ------------------------------------------------------------------------------ worker
    def _generator(self) -> torch.Generator:
        device = next(self.model.parameters()).device
        return torch.Generator(device=device).manual_seed(self.seed)

    def _take_waiting(self) -> list[tuple[Request, tuple]]:
        """Pop the waiting requests that have a place (cohort below ``max_batch``), in arrival order."""
        taken: list[tuple[Request, tuple]] = []
        with self.lock:
            while not self.stopped and not self.waiting and not self.cohorts:
                self.lock.wait()
            if self.stopped:
                return []
            room: dict[tuple, int] = {k: self.max_batch - len(c.members) for k, c in self.cohorts.items()}
            left: collections.deque[Request] = collections.deque()
            while self.waiting:
                request = self.waiting.popleft()
                if request.cancelled:
                    _fail(request, None, cancelled=True)
                    continue
                key = cohort_key(request.options)
                if room.setdefault(key, self.max_batch) > 0:
                    room[key] -= 1
                    taken.append((request, key))
                else:
                    left.append(request)
            self.waiting = left
        return taken

    def _loop(self) -> None:
        with torch.no_grad():
            while True:
                taken = self._take_waiting()
                if self.stopped:
                    break
                for request, key in taken:
                    cohort = self.cohorts.get(key)
                    if cohort is None:
                        cohort = _Cohort(self.model, request.options, self._generator())
                    try:
                        cohort.admit(request)
                    except Exception as exc:  # noqa: BLE001 - a bad prompt fails only its own request
                        _fail(request, exc)
                        continue
                    self.cohorts[key] = cohort
                for key, cohort in list(self.cohorts.items()):
                    self.busy = True
                    try:
                        ended = cohort.run_block()
                    except Exception as exc:  # noqa: BLE001 - fail this batch, keep serving the others
                        for member in cohort.members:
                            _fail(member.request, exc)
                        del self.cohorts[key]
                        continue
                    finally:
                        self.busy = False
                    self.blocks_run += 1
                    if ended:
                        gone = {id(m) for m in ended}
                        for member in ended:
                            member.request.stats = _member_stats(member, cohort)
                        cohort.retire([i for i, m in enumerate(cohort.members) if id(m) not in gone])
                    if not cohort.members:
                        del self.cohorts[key]
                    # completed only now: a client that sees its request done sees the batcher without it
                    for member in ended or ():
                        _complete(member.request)
            # shutting down: nothing more will run
            with self.lock:
                pending = list(self.waiting) + [m.request for c in self.cohorts.values() for m in c.members]
                self.waiting.clear()
                self.cohorts.clear()
            for request in pending:
                _fail(request, BatcherStopped("the server is shutting down"))


def _fail(request: Request, exc: BaseException | None, cancelled: bool = False) -> None:
    if cancelled:
        request.stats = {"num_response_tokens": len(request.tokens), "cancelled": True}
    else:
        request.error = exc
    _complete(request)


def _complete(request: Request) -> None:
    request.done.set()
    if request.on_done is not None:
        try:
            request.on_done()
        except Exception:  # noqa: BLE001 - a listener's failure must not stop the worker
            pass


__all__ = ["BatcherStopped", "BlockListener", "ContinuousBatcher", "QueueFull", "Request", "cohort_key"]
